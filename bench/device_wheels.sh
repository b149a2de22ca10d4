#!/usr/bin/env bash
# Wheels that bench/device_suite.sh needs and the lent GPU machine's image lacks (it has torch,
# transformers, accelerate, peft and numpy but no pycocotools, segment-anything or deepspeed, and
# cannot reach a package index). Run here, in the repository root; the wheels land in .whl/
# (ignored by git through .git/info/exclude) for the device call to carry. The image's Python is
# 3.12 on x86-64.
set -euo pipefail

PYTHON=${PYTHON:-.venv/bin/python}
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)
# pycocotools: every dam import; segment-anything: SAM in the data and densecap parts;
# deepspeed and what it needs beyond the image: the train part.
BINARY=(pycocotools==2.0.11 pydantic_core==2.50.4)
PURE=(segment-anything==1.0 hjson==3.1.0 pydantic==2.14.3 annotated-types==0.8.0 typing-inspection==0.4.5)

grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
platform_args=()
for platform in "${PLATFORMS[@]}"; do platform_args+=(--platform "$platform"); done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platform_args[@]}" -d .whl "${BINARY[@]}" "${PURE[@]}"
# DeepSpeed ships only a source archive; built here without its CUDA ops (they JIT-compile on use,
# and the suite's train part uses torch's Adam), the wheel is pure Python.
if ! ls .whl/deepspeed-*.whl >/dev/null 2>&1; then
    DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
fi
du -ch .whl/*.whl | tail -1
