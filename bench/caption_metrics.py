"""Caption metrics: BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE when its jars are given).

Scores are pycocoevalcap 1.2's, computed as its COCOEvalCap does: every caption is PTB-tokenized
with the Stanford PTBTokenizer jar that pycocoevalcap ships (lower-cased, punctuation tokens
removed), then each scorer runs over all items. Two things differ from calling COCOEvalCap,
neither in the numbers:

- Java starts as few times as possible: predictions and references are tokenized in ONE
  PTBTokenizer run, and ONE METEOR JVM (pycocoevalcap's `Meteor`, which keeps its subprocess
  and scores all items in one EVAL exchange) serves the whole run, so a run costs two JVM
  starts (three with SPICE) whatever the number of items. The tokenizer reads its input as
  UTF-8 from a temporary file outside the package folder, and line breaks inside a caption
  (including Unicode ones such as U+2028, which Java also splits lines on) become spaces so
  every caption stays one line.
- SPICE needs Stanford CoreNLP 3.6.0, which pycocoevalcap downloads at run time; nothing here
  downloads. With --spice-jars DIR holding stanford-corenlp-3.6.0.jar and
  stanford-corenlp-3.6.0-models.jar, pycocoevalcap's spice-1.0.jar runs with them (and every
  other jar in DIR) on its class path. SPICE 1.0 writes its per-item JSON through the Nashorn
  JavaScript engine, which Java 15+ lacks: then the overall SPICE is read from its printed
  summary (3 decimals) and per-item SPICE is left out, unless DIR also holds the standalone
  nashorn-core jar and its asm jars. Without --spice-jars, "SPICE" is reported as unavailable,
  never dropped silently.

Inputs:
    --pred  {id: caption}, or COCO results [{"image_id", "caption"}, ...]
    --refs  {id: [reference captions]} ({id: caption} also works), or a COCO captions file
            {"annotations": [{"image_id", "caption"}, ...], ...}
Ids are compared as strings; every reference id needs a prediction.

Run as `dam-bench caption-metrics --pred preds.json --refs refs.json --out result.json`
or `python -m bench.caption_metrics ...`; it needs `java` (8 or newer) on PATH.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from dam.errors import DamInputError
from dam.jsonio import read_json, write_json_atomic

from bench.harness import check_predictions, run_benchmark

logger = logging.getLogger(__name__)

METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
SPICE_UNAVAILABLE = "unavailable (pass --spice-jars with Stanford CoreNLP 3.6.0 jars)"

# Everything Java's line reader or str.splitlines() treats as a line break.
_LINE_BREAKS = re.compile("[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


def _require_java(java: str = "java") -> str:
    path = shutil.which(java)
    if path is None:
        raise DamInputError(
            f"caption metrics need Java on PATH ({java!r} not found): pycocoevalcap's PTB tokenizer and METEOR "
            "are Java programs; install a JRE (e.g. `apt-get install default-jre-headless`)"
        )
    return path


def _spice_dir() -> Path:
    """pycocoevalcap's spice/ folder (spice-1.0.jar and lib/); pycocoevalcap itself is a namespace
    package without __file__."""
    try:
        from pycocoevalcap.spice import spice
    except ImportError:
        raise DamInputError(
            "caption metrics need pycocoevalcap; `pip install pycocoevalcap` (part of the toolkit's [bench] extra)"
        ) from None
    return Path(spice.__file__).resolve().parent


def ptb_tokenize(captions: Mapping[str, Sequence[str]], java: str = "java") -> dict[str, list[str]]:
    """PTB-tokenize {key: [captions]} in one Java run, exactly as pycocoevalcap's PTBTokenizer
    (same jar, flags and punctuation filter); returns {key: [tokenized captions]}."""
    from pycocoevalcap.tokenizer import ptbtokenizer as ptb

    java_path = _require_java(java)
    jar = Path(ptb.__file__).resolve().parent / ptb.STANFORD_CORENLP_3_4_1_JAR
    keys = [k for k, caps in captions.items() for _ in caps]
    lines = [_LINE_BREAKS.sub(" ", c) for caps in captions.values() for c in caps]
    with tempfile.TemporaryDirectory(prefix="dam-ptb-") as tmp:
        source = Path(tmp) / "captions.txt"
        source.write_text("\n".join(lines), encoding="utf-8")
        cmd = [
            java_path, "-Dfile.encoding=UTF-8", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer",
            "-preserveLines", "-lowerCase", "-encoding", "UTF-8", str(source),
        ]  # fmt: skip
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if proc.returncode != 0:
        raise DamInputError(
            f"the PTB tokenizer (Java) failed with exit code {proc.returncode}: "
            f"{proc.stderr.decode(errors='replace').strip()[-500:]}"
        )
    out_lines = proc.stdout.decode("utf-8", errors="replace").split("\n")
    if len(out_lines) < len(lines):
        raise DamInputError(
            f"the PTB tokenizer returned {len(out_lines)} lines for {len(lines)} captions; "
            "a caption holds a character it splits lines on"
        )
    result: dict[str, list[str]] = {k: [] for k in captions}
    for key, line in zip(keys, out_lines):
        result[key].append(" ".join(w for w in line.rstrip().split(" ") if w not in ptb.PUNCTUATIONS))
    return result


@contextlib.contextmanager
def meteor_session() -> Iterator[Any]:
    """One pycocoevalcap `Meteor` (one JVM) for the block; the JVM is shut down at exit."""
    from pycocoevalcap.meteor.meteor import Meteor

    _require_java()
    meteor = Meteor()
    try:
        yield meteor
    finally:
        with meteor.lock:
            proc = meteor.meteor_p
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None and not stream.closed:
                    stream.close()
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def meteor_scores(meteor: Any, gts: dict[str, list[str]], res: dict[str, list[str]]) -> tuple[float, list[float]]:
    """(corpus METEOR, [METEOR of each id in `gts` order]) of `res` {id: [caption]} against `gts`
    {id: [references]}, in one EVAL exchange with the JVM of `meteor_session`."""
    try:
        return meteor.compute_score(gts, res)
    except ValueError as exc:  # the JVM died and answered nothing parseable
        err = ""
        if meteor.meteor_p.poll() is not None and meteor.meteor_p.stderr is not None:
            err = meteor.meteor_p.stderr.read().decode(errors="replace").strip()[-500:]
        raise DamInputError(f"the METEOR JVM stopped answering ({exc}); its error output: {err or '(none)'}") from exc


def spice_classpath(spice_jars: str | Path) -> list[Path]:
    """The class path for SPICE: pycocoevalcap's spice-1.0.jar, its lib/ jars and every jar of
    `spice_jars`, which must hold the Stanford CoreNLP 3.6.0 code and models jars."""
    folder = Path(spice_jars)
    if not folder.is_dir():
        raise DamInputError(f"--spice-jars {str(folder)!r} is not a folder; pass the folder holding {' and '.join(SPICE_JARS)}")
    missing = [name for name in SPICE_JARS if not (folder / name).is_file()]
    if missing:
        raise DamInputError(
            f"--spice-jars {str(folder)!r} lacks {', '.join(missing)}; put the jars of Stanford CoreNLP 3.6.0 "
            "(stanford-corenlp-full-2015-12-09) there"
        )
    spice_dir = _spice_dir()
    own = sorted(p for p in folder.glob("*.jar") if p.is_file())
    return [spice_dir / "spice-1.0.jar", *own, *sorted((spice_dir / "lib").glob("*.jar"))]


_SPICE_SUMMARY = re.compile(r"All tuples\s*\n\s*f-score:\s*([0-9.]+|NaN)", re.S)


def run_spice(
    gts: Mapping[str, list[str]], res: Mapping[str, list[str]], spice_jars: str | Path, java: str = "java"
) -> tuple[float, dict[str, float] | None]:
    """(mean SPICE F-score, {id: SPICE} or None) from one SPICE JVM over tokenized captions.

    The mean is over items as pycocoevalcap's Spice computes it when per-item scores come back;
    when SPICE cannot write them (Java 15+ without Nashorn) it is SPICE's own printed mean."""
    classpath = spice_classpath(spice_jars)
    java_path = _require_java(java)
    ids = list(gts)
    data = [{"image_id": i, "test": res[i][0], "refs": gts[i]} for i in ids]
    with tempfile.TemporaryDirectory(prefix="dam-spice-") as tmp:
        in_file, out_file = Path(tmp) / "input.json", Path(tmp) / "output.json"
        in_file.write_text(json.dumps(data), encoding="utf-8")
        cmd = [
            java_path, "-Xmx8G", "-Dfile.encoding=UTF-8", "-cp", ":".join(str(p) for p in classpath),
            "edu.anu.spice.SpiceScorer", str(in_file), "-out", str(out_file), "-subset",
        ]  # fmt: skip
        logger.info("running SPICE on %d items (parses every caption with CoreNLP; minutes)", len(ids))
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        text = out_file.read_text(encoding="utf-8") if out_file.exists() else ""
    stdout = proc.stdout.decode(errors="replace")
    if text.strip():
        results = json.loads(text)
        per_item = {str(r["image_id"]): _float(r["scores"]["All"]["f"]) for r in results}
        scores = [per_item[i] for i in ids]
        return sum(scores) / len(scores), per_item
    match = _SPICE_SUMMARY.search(stdout)
    if match is None:
        raise DamInputError(
            f"SPICE failed (exit code {proc.returncode}): {proc.stderr.decode(errors='replace').strip()[-800:]}"
        )
    logger.warning(
        "SPICE could not write per-item scores (Java 15+ has no Nashorn JavaScript engine; put the nashorn-core "
        "jar and its asm jars in --spice-jars for them); using its printed mean, 3 decimals"
    )
    return _float(match.group(1)), None


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


@dataclass
class CaptionMetricsResult:
    """Corpus-level metrics (pycocoevalcap's scale, [0, 1] except CIDEr) and per-item scores."""

    metrics: dict[str, float | str]
    items: dict[str, dict[str, Any]] = field(default_factory=dict)

    def summary(self) -> str:
        parts = [f"{k}={100 * v:.2f}" if isinstance(v, float) else f"{k}: {v}" for k, v in self.metrics.items()]
        return "Caption metrics (x100): " + " ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "benchmark": "caption-metrics",
            "num_items": len(self.items),
            **self.metrics,
            "scale": "pycocoevalcap's (BLEU/METEOR/ROUGE-L/SPICE in [0, 1], CIDEr-D in [0, 10]); papers print x100",
            "items": self.items,
        }


def check_inputs(preds: Mapping[str, Any], refs: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """{id: prediction} for every reference id; a clear error for missing ones."""
    if not refs:
        raise DamInputError("the references hold no items; expected {id: [reference captions]}")
    check_predictions(
        preds, refs, items="reference ids", prediction="predicted caption",
        hint="the predictions file must map every reference id to a caption",
    )
    extra = [k for k in preds if k not in refs]
    if extra:
        logger.warning("ignoring %d predictions whose ids have no references (e.g. %r)", len(extra), extra[0])
    return {k: preds[k] for k in refs}


def score_captions(
    preds: Mapping[str, Any],
    refs: Mapping[str, Sequence[str]],
    *,
    spice_jars: str | Path | None = None,
) -> CaptionMetricsResult:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE with `spice_jars`) of {id: caption} against
    {id: [references]}, as pycocoevalcap's COCOEvalCap computes them."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    chosen = check_inputs(preds, refs)
    ids = list(chosen)
    # One tokenizer run for both sides; "r"/"p" prefixes keep the two sets apart.
    joint = {**{f"r{i}": list(refs[i]) for i in ids}, **{f"p{i}": [chosen[i]] for i in ids}}
    tokens = ptb_tokenize(joint)
    gts = {i: tokens[f"r{i}"] for i in ids}
    res = {i: tokens[f"p{i}"] for i in ids}

    metrics: dict[str, float | str] = {}
    per_item: dict[str, dict[str, float]] = {i: {} for i in ids}
    bleu, bleu_items = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        metrics[f"BLEU-{n + 1}"] = float(bleu[n])
        for i, s in zip(ids, bleu_items[n]):
            per_item[i][f"BLEU-{n + 1}"] = float(s)
    with meteor_session() as meteor:
        score, scores = meteor_scores(meteor, gts, res)
    metrics["METEOR"] = float(score)
    for i, s in zip(ids, scores):
        per_item[i]["METEOR"] = float(s)
    for name, scorer in (("ROUGE-L", Rouge()), ("CIDEr", Cider())):
        with contextlib.redirect_stdout(io.StringIO()):
            score_n, scores_n = scorer.compute_score(gts, res)
        metrics[name] = float(score_n)
        for i, s in zip(ids, scores_n):
            per_item[i][name] = float(s)
    if spice_jars is not None:
        spice, spice_items = run_spice(gts, res, spice_jars)
        metrics["SPICE"] = spice
        if spice_items is not None:
            for i in ids:
                per_item[i]["SPICE"] = spice_items[i]
    else:
        metrics["SPICE"] = SPICE_UNAVAILABLE

    items = {
        i: {"pred": chosen[i], "refs": list(refs[i]), "pred_tokenized": res[i][0], "scores": per_item[i]} for i in ids
    }
    return CaptionMetricsResult(metrics=metrics, items=items)


def predictions_from_json(obj: Any, path: str | Path) -> dict[str, Any]:
    """{id: caption} from {id: caption} or COCO results [{"image_id", "caption"}]."""
    if isinstance(obj, dict):
        return {str(k): v for k, v in obj.items()}
    if isinstance(obj, list) and all(isinstance(r, dict) and "image_id" in r and "caption" in r for r in obj):
        preds: dict[str, Any] = {}
        for r in obj:
            key = str(r["image_id"])
            if key in preds:
                raise DamInputError(f"predictions file {str(path)!r} has two captions for image_id {key}; keep one per id")
            preds[key] = r["caption"]
        return preds
    raise DamInputError(
        f"predictions file {str(path)!r} must hold {{id: caption}} or a COCO results list [{{\"image_id\", \"caption\"}}]"
    )


def references_from_json(obj: Any, path: str | Path) -> dict[str, list[str]]:
    """{id: [captions]} from {id: [captions]}, {id: caption} or a COCO captions file."""
    refs: dict[str, list[str]] = {}
    if isinstance(obj, dict) and isinstance(obj.get("annotations"), list):
        for ann in obj["annotations"]:
            if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
                raise DamInputError(
                    f"references file {str(path)!r}: every COCO annotation needs an image_id and a caption string"
                )
            refs.setdefault(str(ann["image_id"]), []).append(ann["caption"])
        return refs
    if isinstance(obj, dict):
        for key, value in obj.items():
            captions = [value] if isinstance(value, str) else value
            if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
                raise DamInputError(
                    f"references file {str(path)!r}: id {key!r} must map to a non-empty list of caption strings"
                )
            refs[str(key)] = captions
        return refs
    raise DamInputError(
        f"references file {str(path)!r} must hold {{id: [captions]}} or a COCO captions file with \"annotations\""
    )


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Options of `dam-bench caption-metrics`."""
    p = parser or argparse.ArgumentParser(prog="dam-bench caption-metrics", description=__doc__.splitlines()[0])
    p.add_argument("--pred", required=True, help="predictions JSON {id: caption} or COCO results list")
    p.add_argument("--refs", required=True, help="references JSON {id: [captions]} or COCO captions annotations")
    p.add_argument("--out", required=True, help="result JSON to write (metrics and per-item scores)")
    p.add_argument(
        "--spice-jars",
        help="folder with stanford-corenlp-3.6.0.jar and stanford-corenlp-3.6.0-models.jar to compute SPICE",
    )
    return p


def run_from_args(args: argparse.Namespace) -> int:
    """Run `caption-metrics` from parsed arguments; prints the metrics line last."""
    preds = predictions_from_json(read_json(args.pred, "predictions"), args.pred)
    refs = references_from_json(read_json(args.refs, "references"), args.refs)
    if args.spice_jars is not None:
        spice_classpath(args.spice_jars)  # fail before the slow part
    result = score_captions(preds, refs, spice_jars=args.spice_jars)
    write_json_atomic(args.out, result.to_json())
    logger.info("caption metrics: %d items scored, details in %s", len(result.items), args.out)
    print(result.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    """`dam-bench caption-metrics` entry point."""
    return run_benchmark("dam-bench caption-metrics", build_parser(), run_from_args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
