"""DLC-Bench scoring: ask the judge every question about every caption, score regions, total.

Per region the recognition question comes first; if the judge says the caption names the
wrong kind of object ("No"), every positive and negative score of the region is clamped to
min(0, s), so a caption cannot earn points for details of the wrong object. All questions of
all regions are sent concurrently (bounded by the judge's concurrency); eval.json is written
atomically as regions finish, and a rerun reuses its stored responses instead of asking again.

The judge is an OpenAI-compatible endpoint (--base-url, --judge-model) or a local transformers
chat model (--judge-path; bench/dlc/local_judge.py). Run as `dam-bench dlc-score ...` or
`python -m bench.dlc.scoring ...`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from dam.errors import DamInputError
from dam.jsonio import read_json

from bench.dlc.judge import Judge, OpenAIJudge, add_client_options
from bench.dlc.parsing import parse_answer
from bench.dlc.protocol import RECOGNITION_INCORRECT, build_prompt, recognition_question
from bench.harness import ResumableResults, check_predictions, gather_with_flush, run_benchmark, run_closing

logger = logging.getLogger(__name__)

TOTAL_KEYS = ("avg_pos", "avg_neg")


@dataclass
class DlcResult:
    """Benchmark totals: Pos, Neg and their mean Avg, plus the per-region eval.json content."""

    pos: float
    neg: float
    regions: dict[str, dict[str, Any]]
    requests: int = 0

    @property
    def avg(self) -> float:
        return (self.pos + self.neg) / 2

    def summary(self) -> str:
        return f"DLC-Bench: pos={self.pos:.3f} neg={self.neg:.3f} avg={self.avg:.3f}"


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def region_questions(questions: Sequence[Mapping[str, Any]], class_name: str) -> list[dict[str, Any]]:
    """The region's questions in protocol order: recognition first, then qa.json's own."""
    return [recognition_question(class_name), *[dict(q) for q in questions]]


def score_region(
    pred: str,
    questions: Sequence[Mapping[str, Any]],
    responses: Sequence[str | None],
    prompts: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The eval.json entry of one region from its questions (recognition first) and the judge's
    raw responses, in the same order; `prompts` are the messages sent (built when not given)."""
    if prompts is None:
        prompts = [build_prompt(pred, q["question"], q["choices"]) for q in questions]
    details_recognition: list[dict[str, Any]] = []
    details_positives: list[dict[str, Any]] = []
    details_negatives: list[dict[str, Any]] = []
    recognition_result: str | None = None
    for q, response in zip(questions, responses, strict=True):
        choices = q["choices"]
        idx = parse_answer(response, choices)
        answer = choices[idx][0] if idx is not None else None
        # An unparseable answer scores 0: it neither earns nor loses points.
        score = choices[idx][1] if idx is not None else 0
        detail = {"question": q["question"], "choices": choices, "response": response, "answer": answer, "score": score}
        if "subtype" in q:
            detail["subtype"] = q["subtype"]
        qtype = q.get("type")
        if qtype == "recognition":
            recognition_result = score if idx is not None else None
            details_recognition.append(detail)
        elif qtype == "positive":
            details_positives.append(detail)
        elif qtype == "negative":
            details_negatives.append(detail)
        else:
            raise DamInputError(
                f"question {q['question']!r} has type {qtype!r}; qa.json types must be 'positive' or 'negative'"
            )
    if recognition_result == RECOGNITION_INCORRECT:
        for detail in details_positives + details_negatives:
            detail["score"] = min(0, detail["score"])
    pos_scores = [float(d["score"]) for d in details_positives]
    neg_scores = [float(d["score"]) for d in details_negatives]
    all_scores = pos_scores + neg_scores
    return {
        "pred": pred,
        "details_positives": details_positives,
        "details_negatives": details_negatives,
        "details_recognition": details_recognition,
        "prompt": list(prompts),
        "response": list(responses),
        "score": _mean(all_scores) if all_scores else 0.0,
        "score_pos": _mean(pos_scores),
        "score_neg": _mean(neg_scores),
        "neg_valid_num": len(neg_scores),
        "recognition_result": recognition_result,
    }


def totals(regions: Mapping[str, Mapping[str, Any]]) -> tuple[float, float]:
    """(Pos, Neg): mean region pos over regions with positives, mean region neg over regions
    with negatives."""
    pos = _mean([r["score_pos"] for r in regions.values() if r["score_pos"] is not None])
    neg = _mean([r["score_neg"] for r in regions.values() if r["neg_valid_num"] > 0])
    return (pos or 0.0, neg or 0.0)


def _cached_responses(entry: Mapping[str, Any] | None) -> dict[str, str]:
    """prompt -> response from a previous eval.json entry (only complete, string responses)."""
    if not isinstance(entry, Mapping):
        return {}
    prompts, responses = entry.get("prompt"), entry.get("response")
    if not isinstance(prompts, list) or not isinstance(responses, list) or len(prompts) != len(responses):
        return {}
    return {p: r for p, r in zip(prompts, responses) if isinstance(p, str) and isinstance(r, str)}


async def ascore_dlc(
    preds: Mapping[str, Any],
    qa: Mapping[str, Sequence[Mapping[str, Any]]],
    class_names: Mapping[str, str],
    judge: Judge,
    out: str | Path | None = None,
    *,
    default_prediction: str | None = None,
    flush_interval_s: float = 5.0,
    progress: bool = True,
) -> DlcResult:
    """Score `preds` ({ann_id: caption}) on DLC-Bench with `judge`; see `score_dlc`."""
    if default_prediction is None:
        check_predictions(
            preds, qa, items="regions", id_name="ann_id",
            hint="finish `dam-bench dlc-outputs` or pass --default-prediction TEXT to score them with it.",
        )
    no_class = [ann_id for ann_id in qa if ann_id not in class_names]
    if no_class:
        raise DamInputError(
            f"{len(no_class)} regions of qa.json have no class name (e.g. ann_id {no_class[0]!r}); "
            "pass the class_names.json that comes with this qa.json."
        )

    results = ResumableResults(out, qa, "existing eval")
    requests = 0

    async def run_region(ann_id: str) -> None:
        nonlocal requests
        pred = preds.get(ann_id)
        if not isinstance(pred, str):
            pred = default_prediction
        assert pred is not None
        questions = region_questions(qa[ann_id], class_names[ann_id])
        cache = _cached_responses(results.previous.get(ann_id))
        prompts = [build_prompt(pred, q["question"], q["choices"]) for q in questions]

        async def ask(prompt: str) -> str:
            nonlocal requests
            if prompt in cache:
                return cache[prompt]
            requests += 1
            return await judge.answer(prompt)

        responses = await asyncio.gather(*(ask(p) for p in prompts))
        results.done[ann_id] = score_region(pred, questions, responses, prompts)

    await gather_with_flush(
        results, run_region, desc="DLC-Bench", unit="region", flush_interval_s=flush_interval_s, progress=progress
    )
    # Sum in qa.json order, not completion order, so float totals do not depend on concurrency.
    ordered = results.ordered()
    pos, neg = totals(ordered)
    results.write(dict(zip(TOTAL_KEYS, (pos, neg))))
    logger.info("DLC-Bench: %d regions scored, %d judge requests", len(ordered), requests)
    return DlcResult(pos=pos, neg=neg, regions=ordered, requests=requests)


def score_dlc(
    preds: Mapping[str, Any],
    qa: Mapping[str, Sequence[Mapping[str, Any]]],
    class_names: Mapping[str, str],
    judge: Judge,
    out: str | Path | None = None,
    **kwargs: Any,
) -> DlcResult:
    """Score captions on DLC-Bench with the published protocol.

    Args:
        preds: {ann_id: caption}; other keys (e.g. "query") are ignored.
        qa: qa.json content, {ann_id: [{"question", "choices": [[text, score], ...], "type"}]}.
        class_names: class_names.json content, {ann_id: name}.
        judge: anything with `async answer(prompt) -> str`, e.g. `OpenAIJudge`.
        out: eval.json path; if it exists, its stored responses are reused.
        **kwargs: `default_prediction`, `flush_interval_s`, `progress` (see `ascore_dlc`).
    """

    return run_closing(judge, lambda: ascore_dlc(preds, qa, class_names, judge, out, **kwargs))


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Options of `dam-bench dlc-score` (pass a subparser to add them to it)."""
    p = parser or argparse.ArgumentParser(prog="dam-bench dlc-score", description=__doc__.splitlines()[0])
    p.add_argument("--pred", required=True, help="predictions JSON {ann_id: caption} (from dlc-outputs)")
    p.add_argument("--data-root", help="DLC-bench folder holding qa.json and class_names.json")
    p.add_argument("--qa", help="qa.json (instead of --data-root)")
    p.add_argument("--class-names", help="class_names.json (instead of --data-root)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--base-url", help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1")
    where.add_argument("--judge-path", help="local transformers chat model folder, run in this process instead")
    p.add_argument("--judge-model", help="model name served by the judge endpoint (with --base-url)")
    p.add_argument("--out", required=True, help="eval.json to write (reused on rerun)")
    p.add_argument("--default-prediction", help="caption to use for regions missing from --pred")
    add_client_options(p, "judge requests in flight with --base-url (default 32)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    local = p.add_argument_group("local judge (with --judge-path)")
    local.add_argument("--judge-device", help="torch device (default: cuda when available, else cpu)")
    local.add_argument("--judge-dtype", help="float32, bfloat16 or float16 (default: as saved)")
    local.add_argument("--judge-batch-size", type=int, default=32, help="prompts per generate (default 32)")
    return p


def run_from_args(args: argparse.Namespace) -> int:
    """Run `dlc-score` from parsed arguments; prints the DLC-Bench line last."""
    if args.data_root:
        if args.qa or args.class_names:
            raise DamInputError("pass either --data-root or --qa with --class-names, not both")
        qa_path, names_path = Path(args.data_root) / "qa.json", Path(args.data_root) / "class_names.json"
    elif args.qa and args.class_names:
        qa_path, names_path = Path(args.qa), Path(args.class_names)
    else:
        raise DamInputError("pass --data-root DIR (holding qa.json and class_names.json) or both --qa and --class-names")
    preds = read_json(args.pred, "predictions")
    qa = read_json(qa_path, "DLC-Bench qa")
    class_names = read_json(names_path, "DLC-Bench class names")
    for what, obj, path in (("predictions", preds, args.pred), ("qa", qa, qa_path), ("class names", class_names, names_path)):
        if not isinstance(obj, dict):
            raise DamInputError(f"the {what} file {path!s} must hold a JSON object keyed by ann_id")
    judge: Judge
    if args.judge_path:
        import torch

        from bench.dlc.local_judge import TransformersJudge

        device = args.judge_device or ("cuda" if torch.cuda.is_available() else "cpu")
        judge = TransformersJudge(args.judge_path, device, args.judge_dtype, args.judge_batch_size)
    else:
        if not args.judge_model:
            raise DamInputError("--base-url needs --judge-model NAME (the model name the endpoint serves)")
        judge = OpenAIJudge.from_args(args)
    result = score_dlc(
        preds, qa, class_names, judge, args.out,
        default_prediction=args.default_prediction, progress=not args.no_progress,
    )
    print(result.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    """`dam-bench dlc-score` entry point."""
    return run_benchmark("dam-bench dlc-score", build_parser(), run_from_args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
