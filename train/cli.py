"""`dam-train`: fine-tune a DAM from a YAML config with dotted overrides.

    dam-train --config configs/train/dam_3b_image.yaml training.output_dir=runs/a
    dam-train --config configs/train/dam_3b_image.yaml training.output_dir=runs/a --resume
    torchrun --nproc_per_node 8 -m train.cli --config configs/train/dam_3b_image.yaml
    deepspeed --num_gpus 8 --module train.cli --config configs/train/dam_3b_image.yaml
    dam-train fcln --config configs/train/fcln/vgg16_vg.yaml     # the DenseCap FCLN (train/fcln.py)

Config mistakes (unknown key, missing dataset or model folder, unreadable first rows) print
one line `dam-train: error: ...` naming the key or file and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from dam.errors import DamInputError
from dam.configio import to_dict

_EXIT_USER_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dam-train",
        description="Fine-tune a Describe Anything Model (DeepSpeed, LoRA, resumable).",
        epilog="Overrides: key.sub=value after the options, e.g. training.learning_rate=5e-5 data.datasets.0.weight=2. "
        "The DenseCap FCLN baseline has its own subcommand: dam-train fcln --help",
    )
    parser.add_argument("--config", required=True, help="YAML training config (see configs/train/)")
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="CHECKPOINT",
        help="continue from the newest complete checkpoint in training.output_dir, or the given checkpoint "
        "folder; 'auto': resume if there is a checkpoint, else start (for restartable cluster jobs)",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["fcln"]:
        from train.fcln import main as fcln_main

        return fcln_main(argv[1:])
    args = build_parser().parse_args(argv)
    if isinstance(args.resume, str) and "=" in args.resume and not os.path.exists(args.resume):
        args.overrides.insert(0, args.resume)  # `--resume key=value`: an override, not a checkpoint
        args.resume = True
    if args.local_rank is not None:  # the `deepspeed` launcher passes --local_rank
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from train.config import load_config

    try:
        config = load_config(args.config, args.overrides)
        if args.print_config:
            sys.stdout.write(json.dumps(to_dict(config), indent=2) + "\n")
            return 0
        from train.trainer import run_training

        final = run_training(config, resume=args.resume)
    except DamInputError as error:
        sys.stderr.write(f"dam-train: error: {error}\n")
        return _EXIT_USER_ERROR
    logging.getLogger(__name__).info("done: %s", final)
    return 0


if __name__ == "__main__":
    sys.exit(main())
