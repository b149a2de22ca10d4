"""`dam-bench`: the scoring and speed harness; each subcommand is a module of this package."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "speed-describe": "bench.speed_describe",
        "dlc-outputs": "bench.dlc.outputs",
        "dlc-score": "bench.dlc.scoring",
        "speed-dlc": "bench.speed_dlc",
        "speed-serve": "bench.speed_serve",
        "shapes": "bench.shapes",
        "speed-train": "bench.speed_train",
        "speed-fcln": "bench.speed_fcln",
        "speed-densecap": "bench.speed_densecap",
        "speed-data": "bench.speed_data",
        "keywords": "bench.keywords",
        "caption-metrics": "bench.caption_metrics",
        "densecap": "bench.densecap",
        "densecap-run": "bench.densecap_run",
        "retrieval": "bench.retrieval",
        "video": "bench.video_bench",
    }
    parser = argparse.ArgumentParser(prog="dam-bench", description="Benchmarks of the DAM toolkit.")
    parser.add_argument("command", choices=sorted(commands), help="benchmark to run (--help after it for options)")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    command = parser.parse_args(argv[:1]).command
    module = __import__(commands[command], fromlist=["main"])
    try:
        status = module.main(argv[1:])
    except SystemExit as exit_:  # argparse inside the benchmark (--help, bad option)
        return int(exit_.code or 0)
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
