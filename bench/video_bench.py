"""Video benchmarks: HC-STVG captions (caption metrics) and VideoRefer-Bench-D (LLM judge).

`dam-bench video hcstvg --pred preds.json --anno test_v2.json --out result.json [--spice-jars DIR]`
    Scores {video_id: caption} against the reference sentence of each video of an HC-STVG
    annotation file with `bench.caption_metrics` (BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE or
    "unavailable"). The annotation file is read as HC-STVG distributes it, a JSON object
    {video_name: {..., "English": sentence}}; a record may also carry the sentence under
    "caption" or "sentence", or be the sentence itself, and a list of records with "video_id"
    (or "vid", "video_name", "video", "id") works too. Video ids match with or without their
    file extension ("abc.mp4" == "abc").

`dam-bench video videorefer-d --pred preds.json --anno VideoRefer-Bench-D.json --base-url URL
 --judge-model NAME --out eval.json [--concurrency 32]`
    An LLM judge behind an OpenAI-compatible endpoint (`bench.dlc.judge.OpenAIJudge`: concurrent
    requests, retries, clear errors) compares each predicted description with the reference and
    scores four dimensions from 0 to 5: SC (subject correspondence), AD (appearance
    description), TD (temporal description), HD (hallucination detection). Reported: the mean of
    each dimension over the items where the judge gave it (as VideoRefer's analyze script), and
    Avg = the mean of the four. The annotation file is VideoRefer-Bench-D's list of records, each
    with the reference under "caption" and its id under "id" (else its position in the list,
    as a string); {id: caption} also works. eval.json is written atomically as items finish and
    a rerun reuses the stored judge responses (zero requests for done items).

    The judge prompt follows the published dimensions and the published answer layout of
    VideoRefer's `videorefer/eval/videorefer_bench_d/1.eval_gpt_new.py` (repository
    alibaba-damo-academy/PixelRefer, path VideoRefer/videorefer/eval/videorefer_bench_d/), which
    sends "##Correct answer: {caption}\\n##Predicted answer: {pred}\\n" after a system message read
    from a system.txt that could not be found; the instructions below are our own text, not the
    byte-identical published prompt, and the request uses the toolkit's judge settings (one user
    message, temperature 0, max_tokens 300) instead of the published temperature 0.7 / top_p 0.95.
    Numbers are therefore close to, not identical with, published VideoRefer-Bench-D scores.

Both run as `python -m bench.video_bench {hcstvg,videorefer-d} ...` too.
"""

from __future__ import annotations

import argparse
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from dam.errors import DamInputError
from dam.jsonio import read_json, write_json_atomic

from bench.caption_metrics import CaptionMetricsResult, score_captions
from bench.dlc.judge import Judge, OpenAIJudge, add_client_options
from bench.harness import ResumableResults, check_predictions, gather_with_flush, run_benchmark, run_closing

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov")
_ID_KEYS = ("video_id", "vid", "video_name", "video", "id")
_CAPTION_KEYS = ("English", "caption", "sentence")


# --------------------------------------------------------------------------- HC-STVG


def video_key(video_id: Any) -> str:
    """A video id as a string without its video file extension ("abc.mp4" -> "abc")."""
    key = str(video_id)
    for ext in VIDEO_EXTENSIONS:
        if key.lower().endswith(ext):
            return key[: -len(ext)]
    return key


def _record_caption(record: Any, where: str) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, Mapping):
        for key in _CAPTION_KEYS:
            if isinstance(record.get(key), str):
                return record[key]
    raise DamInputError(f"{where} has no reference sentence; expected a string or a record with one of {_CAPTION_KEYS}")


def hcstvg_references(anno: Any, path: str | Path) -> dict[str, list[str]]:
    """{video key: [reference sentence]} from an HC-STVG annotation file's content."""
    refs: dict[str, list[str]] = {}
    if isinstance(anno, Mapping):
        for vid, record in anno.items():
            refs.setdefault(video_key(vid), []).append(_record_caption(record, f"HC-STVG annotation {vid!r} of {path!s}"))
    elif isinstance(anno, list):
        for n, record in enumerate(anno):
            vid = next((record[k] for k in _ID_KEYS if isinstance(record, Mapping) and k in record), None)
            if vid is None:
                raise DamInputError(f"record {n} of the HC-STVG annotations {path!s} has no video id (one of {_ID_KEYS})")
            refs.setdefault(video_key(vid), []).append(_record_caption(record, f"record {n} of {path!s}"))
    else:
        raise DamInputError(f"the HC-STVG annotation file {path!s} must hold a JSON object keyed by video or a list")
    if not refs:
        raise DamInputError(f"the HC-STVG annotation file {path!s} holds no videos")
    return refs


def score_hcstvg(
    preds: Mapping[str, Any], anno: Any, *, anno_path: str | Path = "annotations", spice_jars: str | Path | None = None
) -> CaptionMetricsResult:
    """Caption metrics of {video_id: caption} against HC-STVG's reference sentences."""
    refs = hcstvg_references(anno, anno_path)
    keyed = {video_key(k): v for k, v in preds.items()}
    return score_captions(keyed, refs, spice_jars=spice_jars)


# --------------------------------------------------------------------------- VideoRefer-Bench-D

DIMENSIONS = ("SC", "AD", "TD", "HD")
DIMENSION_NAMES = {
    "SC": "Subject Correspondence",
    "AD": "Appearance Description",
    "TD": "Temporal Description",
    "HD": "Hallucination Detection",
}

JUDGE_PROMPT = """\
You are an expert grader of video object descriptions. A model was asked to describe one object (the subject) that is marked throughout a video. Compare its description (the predicted answer) with a reference description written by an annotator who watched the video, and judge from the two texts only.

Score the predicted answer on each of the four dimensions below with an integer from 0 (worst) to 5 (best):
1. Subject Correspondence (SC): does the predicted answer describe the same subject as the reference (the same kind of person, animal or object)? 5 = clearly the same subject, 0 = a different subject.
2. Appearance Description (AD): how accurately and completely does it describe the subject's appearance (category, colour, shape, clothing, parts, size) given in the reference?
3. Temporal Description (TD): how accurately does it describe the subject's actions, motion and changes through the video, in the right order?
4. Hallucination Detection (HD): does it avoid content that the reference contradicts or does not support? 5 = nothing invented, 0 = mostly invented.

##Correct answer: {reference}
##Predicted answer: {prediction}

Reply with exactly these four lines and nothing else:
SC: <score>
AD: <score>
TD: <score>
HD: <score>"""

_NUMBER = r"(\d+(?:\.\d+)?)"
_SEP = r"[\s\"'*_`()\[\]|]*(?:[:=\-–]|is)?[\s\"'*_`|]*"
_GAP = r"[\s_-]*"


def _dimension_pattern(dim: str) -> re.Pattern[str]:
    # The abbreviation must be upper case ("an ad" is no score); the full name may be any case.
    name = _GAP.join(DIMENSION_NAMES[dim].split())
    return re.compile(rf"(?:(?-i:\b{dim}\b)|{name}){_SEP}{_NUMBER}(?:\s*/\s*5)?", re.I)


_DIM_PATTERNS = {dim: _dimension_pattern(dim) for dim in DIMENSIONS}


def build_judge_prompt(prediction: str, reference: str) -> str:
    """The judge's user message for one item."""
    return JUDGE_PROMPT.format(reference=reference.strip(), prediction=prediction.strip())


def parse_dimension_scores(response: str | None) -> dict[str, float | None]:
    """{SC, AD, TD, HD: score in [0, 5] or None} from the judge's text.

    Each dimension is found by its abbreviation or full name followed by a number ("SC: 4",
    "**Subject Correspondence**: 4/5", '"HD": 3'); the last mention wins (a judge that reasons
    first states its final scores last). If no dimension is named but the text holds exactly four
    numbers, they are read in SC, AD, TD, HD order. Numbers outside [0, 5] count as missing."""
    scores: dict[str, float | None] = {d: None for d in DIMENSIONS}
    if not isinstance(response, str) or not response.strip():
        return scores
    found = False
    for dim, pattern in _DIM_PATTERNS.items():
        matches = pattern.findall(response)
        if matches:
            found = True
            value = float(matches[-1])
            scores[dim] = value if 0 <= value <= 5 else None
    if not found:
        numbers = re.findall(rf"(?<![\w.]){_NUMBER}(?![\w.])", response)
        if len(numbers) == 4:
            for dim, number in zip(DIMENSIONS, numbers):
                value = float(number)
                scores[dim] = value if 0 <= value <= 5 else None
    return scores


def videorefer_references(anno: Any, path: str | Path) -> dict[str, str]:
    """{id: reference description} from VideoRefer-Bench-D's annotation list or {id: caption}."""
    refs: dict[str, str] = {}
    if isinstance(anno, list):
        for n, record in enumerate(anno):
            if not isinstance(record, Mapping) or not isinstance(record.get("caption"), str):
                raise DamInputError(f"record {n} of the VideoRefer-Bench-D annotations {path!s} has no \"caption\" string")
            key = str(record.get("id", n))
            if key in refs:
                raise DamInputError(f"the VideoRefer-Bench-D annotations {path!s} repeat id {key!r}; ids must be unique")
            refs[key] = record["caption"]
    elif isinstance(anno, Mapping):
        for key, value in anno.items():
            refs[str(key)] = _record_caption(value, f"VideoRefer-Bench-D item {key!r} of {path!s}")
    else:
        raise DamInputError(f"the VideoRefer-Bench-D annotation file {path!s} must hold a list of records or {{id: caption}}")
    if not refs:
        raise DamInputError(f"the VideoRefer-Bench-D annotation file {path!s} holds no items")
    return refs


@dataclass
class VideoReferResult:
    """Per-dimension means (0-5) over the items the judge scored, and the eval.json items."""

    averages: dict[str, float | None]
    items: dict[str, dict[str, Any]]
    requests: int = 0

    @property
    def avg(self) -> float | None:
        values = [v for v in self.averages.values() if v is not None]
        return sum(values) / len(values) if len(values) == len(DIMENSIONS) else None

    def summary(self) -> str:
        parts = [f"{d}={v:.3f}" if v is not None else f"{d}=n/a" for d, v in self.averages.items()]
        avg = f"{self.avg:.3f}" if self.avg is not None else "n/a"
        return "VideoRefer-Bench-D: " + " ".join(parts) + f" avg={avg}"


def dimension_averages(items: Mapping[str, Mapping[str, Any]]) -> dict[str, float | None]:
    """Mean of each dimension over the items whose judge answer gave it."""
    out: dict[str, float | None] = {}
    for dim in DIMENSIONS:
        values = [it["scores"][dim] for it in items.values() if it["scores"].get(dim) is not None]
        out[dim] = sum(values) / len(values) if values else None
    return out


async def ascore_videorefer_d(
    preds: Mapping[str, Any],
    refs: Mapping[str, str],
    judge: Judge,
    out: str | Path | None = None,
    *,
    flush_interval_s: float = 5.0,
    progress: bool = True,
) -> VideoReferResult:
    """Judge every {id: prediction} against refs; see `score_videorefer_d`."""
    check_predictions(
        preds, refs, items="VideoRefer-Bench-D items",
        hint="the predictions file must map every annotation id to a description",
    )
    results = ResumableResults(out, refs, "existing VideoRefer-Bench-D eval")
    requests = 0

    async def run_item(key: str) -> None:
        nonlocal requests
        prompt = build_judge_prompt(preds[key], refs[key])
        old = results.previous.get(key)
        if isinstance(old, dict) and old.get("prompt") == prompt and isinstance(old.get("response"), str):
            response = old["response"]
        else:
            requests += 1
            response = await judge.answer(prompt)
        scores = parse_dimension_scores(response)
        if any(v is None for v in scores.values()):
            logger.warning("item %s: judge answer gave no valid score for %s", key, [d for d, v in scores.items() if v is None])
        results.done[key] = {"pred": preds[key], "reference": refs[key], "prompt": prompt, "response": response, "scores": scores}

    await gather_with_flush(
        results, run_item, desc="VideoRefer-Bench-D", unit="item", flush_interval_s=flush_interval_s, progress=progress
    )
    items = results.ordered()  # annotation order, so totals do not depend on completion order
    result = VideoReferResult(dimension_averages(items), items, requests)
    results.write({"averages": result.averages, "avg": result.avg})
    logger.info("VideoRefer-Bench-D: %d items judged, %d judge requests", len(items), requests)
    return result


def score_videorefer_d(
    preds: Mapping[str, Any], refs: Mapping[str, str], judge: Judge, out: str | Path | None = None, **kwargs: Any
) -> VideoReferResult:
    """Score descriptions {id: text} against references {id: text} on SC/AD/TD/HD with `judge`
    (anything with `async answer(prompt) -> str`); `out` (eval.json) is reused when it exists."""

    return run_closing(judge, lambda: ascore_videorefer_d(preds, refs, judge, out, **kwargs))


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    """Options of `dam-bench video {hcstvg,videorefer-d}`."""
    p = argparse.ArgumentParser(prog="dam-bench video", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="benchmark", required=True)
    h = sub.add_parser("hcstvg", help="HC-STVG captions scored with BLEU/METEOR/ROUGE-L/CIDEr/SPICE")
    h.add_argument("--pred", required=True, help="predictions JSON {video_id: caption}")
    h.add_argument("--anno", required=True, help="HC-STVG annotation JSON ({video: {..., \"English\": sentence}})")
    h.add_argument("--out", required=True, help="result JSON to write")
    h.add_argument("--spice-jars", help="folder with the Stanford CoreNLP 3.6.0 jars to compute SPICE")
    v = sub.add_parser("videorefer-d", help="VideoRefer-Bench-D: LLM-judged SC/AD/TD/HD on 0-5")
    v.add_argument("--pred", required=True, help="predictions JSON {id: description}")
    v.add_argument("--anno", required=True, help="VideoRefer-Bench-D annotation JSON (records with \"caption\")")
    v.add_argument("--base-url", required=True, help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1")
    v.add_argument("--judge-model", required=True, help="model name served by the judge endpoint")
    v.add_argument("--out", required=True, help="eval.json to write (reused on rerun)")
    add_client_options(v, "judge requests in flight (default 32)")
    v.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def _read_dict(path: str, what: str) -> dict[str, Any]:
    obj = read_json(path, what)
    if not isinstance(obj, dict):
        raise DamInputError(f"the {what} file {path} must hold a JSON object keyed by id")
    return {str(k): v for k, v in obj.items()}


def run_from_args(args: argparse.Namespace) -> int:
    """Run a video benchmark from parsed arguments; prints its summary line last."""
    if args.benchmark == "hcstvg":
        preds = _read_dict(args.pred, "predictions")
        result = score_hcstvg(preds, read_json(args.anno, "HC-STVG annotation"), anno_path=args.anno,
                              spice_jars=args.spice_jars)  # fmt: skip
        write_json_atomic(args.out, {**result.to_json(), "benchmark": "hc-stvg"})
        print("HC-STVG " + result.summary())
        return 0
    preds = _read_dict(args.pred, "predictions")
    refs = videorefer_references(read_json(args.anno, "VideoRefer-Bench-D annotation"), args.anno)
    judge = OpenAIJudge.from_args(args)
    result = score_videorefer_d(preds, refs, judge, args.out, progress=not args.no_progress)
    print(result.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    """`dam-bench video` entry point."""
    return run_benchmark(lambda args: f"dam-bench video {args.benchmark}", build_parser(), run_from_args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
