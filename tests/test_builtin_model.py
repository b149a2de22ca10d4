"""The built-in ShapesDLC model ships with the package and really describes regions."""

from __future__ import annotations

import time

from bench.shapes import EVAL_SEED, evaluate
from dam import DescribeAnything
from dam.describe import BUILTIN_MODEL
from dam.shapes import ATTRIBUTES, SIZES

MAX_PACKAGE_BYTES = 20 * 1024 * 1024
REQUIRED = dict.fromkeys(ATTRIBUTES, 0.90)


def test_builtin_model_is_small_enough_to_ship():
    size = sum(path.stat().st_size for path in BUILTIN_MODEL.iterdir())
    assert size <= MAX_PACKAGE_BYTES, f"{size / 2**20:.1f} MiB"


def test_builtin_model_gets_every_attribute_of_fresh_regions_right():
    # CPU time of this process, not wall time: the budget is the model's, not that of jobs beside it.
    start = time.process_time()
    model = DescribeAnything.from_pretrained()
    report = evaluate(model, num_regions=100, seed=EVAL_SEED + 1)
    elapsed = time.process_time() - start
    accuracy = report["accuracy"]["all"]
    assert all(accuracy[attribute] >= REQUIRED[attribute] for attribute in ATTRIBUTES), accuracy
    assert set(report["accuracy"]) <= {"all", *SIZES}
    assert elapsed < 60, f"{elapsed:.0f} s of CPU"
