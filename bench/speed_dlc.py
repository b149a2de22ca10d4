"""Speed of DLC-Bench scoring: concurrent judge requests vs the reference's one-at-a-time loop.

Scores the same synthetic predictions against a local fake judge that waits 20 ms per request
(bench/dlc/fake_judge.py, served by its own process so that its Python work does not share
the client's GIL), once with concurrency 1 (the reference script's behaviour) and once
with concurrency 32, checks that the scores are identical and prints the speed-up (goal >= 20x).
Runs on a CPU in seconds:

    python bench/speed_dlc.py --regions 40
"""

from __future__ import annotations

import argparse
import time

from bench.dlc.fake_judge import FakeJudgeProcess
from bench.dlc.judge import OpenAIJudge
from bench.dlc.scoring import score_dlc


def synthetic(regions: int, questions: int) -> tuple[dict, dict, dict]:
    """qa / class names / predictions shaped like DLC-Bench's (positives and negatives)."""
    qa, names, preds = {}, {}, {}
    for i in range(regions):
        a = str(i)
        qa[a] = [
            {
                "question": f"Region {i}, question {j}?",
                "choices": [["Option one.", 1], ["Option two.", 0.5], ["Option three.", -1]],
                "type": "positive" if j % 2 == 0 else "negative",
            }
            for j in range(questions)
        ]
        names[a] = ["mug", "cups", "bus"][i % 3]
        preds[a] = f"A detailed caption of region {i}."
    return qa, names, preds


def run(regions: int, questions: int, delay_s: float, concurrency: int) -> tuple[float, tuple[float, float], int]:
    qa, names, preds = synthetic(regions, questions)
    with FakeJudgeProcess(delay_s=delay_s) as server:
        judge = OpenAIJudge(server.base_url, "fake", concurrency=concurrency)
        start = time.perf_counter()
        result = score_dlc(preds, qa, names, judge, None, progress=False)
        return time.perf_counter() - start, (result.pos, result.neg), server.requests


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--regions", type=int, default=40)
    p.add_argument("--questions", type=int, default=6, help="questions per region (plus recognition)")
    p.add_argument("--delay-ms", type=float, default=20.0, help="judge latency per request")
    p.add_argument("--concurrency", type=int, default=32)
    args = p.parse_args(argv)

    run(2, 1, 0.0, 2)  # warm-up: imports and client set-up are not what is measured
    delay = args.delay_ms / 1000
    t1, s1, n1 = run(args.regions, args.questions, delay, 1)
    tn, sn, nn = run(args.regions, args.questions, delay, args.concurrency)
    print(f"requests: {n1} per run, judge latency {args.delay_ms:.0f} ms")
    print(f"concurrency 1:  {t1:.2f} s  ({n1 / t1:.0f} req/s)")
    print(f"concurrency {args.concurrency}: {tn:.2f} s  ({nn / tn:.0f} req/s)")
    print(f"scores identical: {s1 == sn}  (pos={sn[0]:.3f} neg={sn[1]:.3f})")
    print(f"speed-up: {t1 / tn:.1f}x (goal >= 20x)")
    return 0 if s1 == sn else 1


if __name__ == "__main__":
    raise SystemExit(main())
