#!/usr/bin/env bash
# The GPU checks of the open issues, as one prepared command for a lent GPU machine (one H100/H200,
# 10 minutes per command). Each part runs under its own time limit and writes PART.json and its log
# into $OUT (default out/device); a part that would start after SUITE_DEADLINE seconds is skipped
# and named at the end, so a second call can run just those: `bash bench/device_suite.sh densecap`.
#
#   bash bench/device_wheels.sh                       # here, once: wheels the GPU image lacks -> .whl/
#   bash bench/device_suite.sh                        # there: every part, in priority order
#   SUITE_SMOKE=1 PYTHON=.venv/bin/python bash bench/device_suite.sh   # tiny shapes on the CPU (a test runs this)
#
# The smoke run also passed (2026-12-03) in a venv with the GPU image's transformers 5.17.0,
# huggingface_hub 1.33.0 and tokenizers 0.23.2 and without `datasets`, as the image has them.
#
# Parts (seconds allowed): cuda-tests (120) describe (330) fcln (90) data (150) densecap (240)
# retrieval (120) describe-static (300) train (300, not in the default list: issue 3's MFU; needs
# the deepspeed wheel). A command brings back at most 8 files: the log and seven parts' JSON.
set -u -o pipefail

PYTHON=${PYTHON:-python3}
OUT=${OUT:-out/device}
SMOKE=${SUITE_SMOKE:-0}
DEADLINE=${SUITE_DEADLINE:-570}
DEFAULT_PARTS=(cuda-tests describe fcln data densecap retrieval describe-static)
declare -A LIMIT=([cuda-tests]=120 [describe]=330 [fcln]=90 [data]=150 [densecap]=240 [retrieval]=120
                  [describe-static]=300 [train]=300)

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

part_cuda-tests() {
    "$PYTHON" -m pytest -q -p no:cacheprovider -rs tests/test_fast_generation.py -k cuda
}

part_describe() {  # issues 9 and 10: the DAM-3B shape (converted NVlabs architecture), three modes
    if [ "$SMOKE" = 1 ]; then set -- --shape tiny --regions 8 --new-tokens 4 --batch-size 4
    else set -- --shape dam-3b --regions 256 --new-tokens 128 --batch-size 64; fi
    "$PYTHON" -m bench.speed_describe "$@" --device "$DEVICE" --json "$OUT/describe.json"
}

part_describe-static() {  # issue 10: is the own decode loop faster than transformers' static cache + compile?
    if [ "$SMOKE" = 1 ]; then set -- --shape tiny --regions 4 --new-tokens 4 --batch-size 4
    else set -- --shape dam-3b --regions 128 --new-tokens 128 --batch-size 64; fi
    "$PYTHON" -m bench.speed_describe "$@" --modes batched,static,fast --device "$DEVICE" --json "$OUT/describe-static.json"
}

part_fcln() {  # issue 6: <= 10 ms per 720x600 image, 300 proposals
    if [ "$SMOKE" = 1 ]; then set -- --backbone tiny --iterations 2 --warmup 1
    else set -- --backbone vgg16 --iterations 50; fi
    "$PYTHON" -m bench.speed_fcln "$@" --device "$DEVICE" --json "$OUT/fcln.json"
}

part_data() {  # issue 7: stage 2's models (OWLv2 large, SAM ViT-H, SigLIP so400m)
    if [ "$SMOKE" = 1 ]; then set -- --tiny
    else set -- --owl large; fi
    "$PYTHON" -m bench.speed_data "$@" --cpu none --device "$DEVICE" --json "$OUT/data.json"
}

part_densecap() {  # issue 11: images/s of `dam densecap`, FCLN against SAM + DAM
    if [ "$SMOKE" = 1 ]; then set -- --shape tiny --images 2 --warmup 1 --max-new-tokens 4 --sam-points-per-side 4
    else set -- --shape full --images 32; fi
    "$PYTHON" -m bench.speed_densecap "$@" --device "$DEVICE" --json "$OUT/densecap.json"
}

part_retrieval() {  # issue 11: (region, query) pairs/s, batched against one pair at a time
    local data=/tmp/device_suite_vg
    "$PYTHON" -m data_pipeline.cli synthetic --format visual-genome --num-images 8 --out "$data" --no-progress || return
    "$PYTHON" -m bench.retrieval --gt "$data/region_descriptions.json" --images "$data/images" \
        --model dam builtin --proposer gt --speed --speed-baseline-pairs 32 --device "$DEVICE" --out "$OUT/retrieval.json"
}

part_train() {  # issue 3: MFU of a DeepSpeed ZeRO-2 step
    if [ "$SMOKE" = 1 ]; then set -- --size tiny --steps 2 --warmup-steps 1 --no-deepspeed
    else set -- --size dam-3b --steps 20 --warmup-steps 5; fi
    "$PYTHON" -m bench.speed_train "$@" --device "$DEVICE" --json "$OUT/train.json"
}

parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=("${DEFAULT_PARTS[@]}")
for part in "${parts[@]}"; do
    [ -n "${LIMIT[$part]:-}" ] || { echo "unknown part '$part'; parts: ${!LIMIT[*]}" >&2; exit 2; }
done

if [ "$SMOKE" = 1 ]; then  # this machine's environment already holds every package
    DEVICE=cpu
    export OMP_NUM_THREADS=1
else
    DEVICE=cuda
    if ls .whl/*.whl >/dev/null 2>&1; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || { echo "installing the carried wheels (.whl/) failed" >&2; exit 1; }
        export PYTHONPATH="$PYTHONPATH:/tmp/site"
    fi
fi

mkdir -p "$OUT"
start=$SECONDS
failed=() skipped=()
{
    echo "device suite: parts ${parts[*]}; smoke=$SMOKE device=$DEVICE; $(date -u +%FT%TZ)"
    [ "$SMOKE" = 1 ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/suite.log"
for part in "${parts[@]}"; do
    limit=${LIMIT[$part]}
    if [ "$SMOKE" != 1 ] && [ $((SECONDS - start + limit)) -gt "$DEADLINE" ]; then
        skipped+=("$part")
        continue
    fi
    echo "=== $part (limit ${limit}s, at $((SECONDS - start))s)" | tee -a "$OUT/suite.log"
    part_start=$SECONDS
    # The part runs in a subshell so `timeout` can stop it and everything it started.
    timeout --kill-after=10 "$limit" bash -c "$(declare -f "part_$part"); $(declare -p OUT PYTHON SMOKE DEVICE); part_$part" \
        2>&1 | tee -a "$OUT/suite.log"
    status=$?
    echo "=== $part: exit $status after $((SECONDS - part_start))s" | tee -a "$OUT/suite.log"
    [ "$status" -eq 0 ] || failed+=("$part")
done
echo "suite done in $((SECONDS - start))s; failed: ${failed[*]:-none}; skipped for time: ${skipped[*]:-none}" \
    | tee -a "$OUT/suite.log"
[ ${#failed[@]} -eq 0 ]
