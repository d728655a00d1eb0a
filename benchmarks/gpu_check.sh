#!/usr/bin/env bash
# The repository's device check: one call on a GPU machine with no network (torch, accelerate,
# peft, transformers there; diffusers and torch-fidelity carried as wheels in .whl/: the README's
# "Speed on a GPU"). Runs the `gpu` tests, then DiT-XL/2-shape speed (bf16, random weights)
# through `ditc bench` itself: forward b1/b64 and the DDIM-50 CFG-1.5 loop at b16 for base, d14,
# width0.5, dynwidth0.5, tokens0.5 (CUDA graphs auto); then the base forward against diffusers'
# modules, eager and compiled. Everything lands in $OUT (default gpu-check/): JSON per part, the
# logs (logs.txt, gpu_tests.log), and gpu_check.md, the table the README quotes. About 6 minutes on an H200.
set -u
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 DITC_NO_PROGRESS=1 HF_HUB_OFFLINE=1
PY=${PY:-python3}
# a CPU dry run: CHECK_DEVICE=cpu CHECK_SHAPE=DiT-S/2 CHECK_DTYPE=fp32 CHECK_VARIANTS=d6,... CHECK_STEPS=5
DEV=${CHECK_DEVICE:-cuda} SHAPE=${CHECK_SHAPE:-DiT-XL/2} DT=${CHECK_DTYPE:-bf16} STEPS=${CHECK_STEPS:-50}
V=${CHECK_VARIANTS:-d14,width0.5,dynwidth0.5,tokens0.5}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>&1
$PY -c "import torch; print('torch', torch.__version__)" >> "$OUT/gpu.txt"
s=$SECONDS
timeout 150 $PY -m dit_compress.cli bench --shape $SHAPE --variants $V --device $DEV --dtype $DT \
  --batch-sizes 1,64 --repeats 10 --warmup 3 --json > "$OUT/bench_forward.json" 2>> "$OUT/logs.txt"
echo "bench forward: rc $? in $((SECONDS - s)) s"; s=$SECONDS
timeout 160 $PY -m dit_compress.cli bench --loop --shape $SHAPE --variants $V --device $DEV --dtype $DT \
  --sampler ddim --steps $STEPS --cfg-scale 1.5 --batch-sizes 16 --repeats 3 --warmup 1 --json > "$OUT/bench_loop.json" 2>> "$OUT/logs.txt"
echo "bench loop: rc $? in $((SECONDS - s)) s"; s=$SECONDS
timeout 110 $PY -m pytest -q -rf -m gpu tests/test_gpu.py -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests: rc $? in $((SECONDS - s)) s: $(tail -n 1 "$OUT/gpu_tests.log")"; s=$SECONDS
if [ "$DEV" != cpu ]; then
  timeout 200 $PY benchmarks/gpu_peer.py "$OUT/peer.json" >> "$OUT/logs.txt" 2>&1
  echo "peer: rc $? in $((SECONDS - s)) s"
fi
$PY benchmarks/gpu_report.py "$OUT" | tee "$OUT/gpu_check.md"
