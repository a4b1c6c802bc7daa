#!/usr/bin/env bash
# GPU integration tests of the local backend (tests/gpu, then the CUDA-only cases of tests/test_local_speed.py)
# and, with TUNEKIT_SERVE_BENCH=1, the serving benchmark (benchmarks/serve_hotswap.py) on the same machine. Run
# it on the GPU machine from the repository root; the packages the machine's image lacks come as wheels in
# WHEEL_DIR (default .whl), installed into TUNEKIT_GPU_SITE (default WHEEL_DIR/site) and put on PYTHONPATH:
#
#   bash scripts/gpu_tests.sh [WHEEL_DIR]                         # tests only
#   TUNEKIT_SERVE_BENCH=1 bash scripts/gpu_tests.sh [WHEEL_DIR]   # tests, then the serving benchmark on the same 8B weights
#
# Environment: OUT (where logs go; default $TMPDIR/tunekit-gpu-out), TUNEKIT_GPU_SITE, TUNEKIT_GPU_NO_INSTALL=1
# (the wheels are installed already), TUNEKIT_GPU_LAYERS (default 32),
# TUNEKIT_GPU_TESTS_TIMEOUT (seconds for pytest, default 420: the five 8B recipes, the serving graphs and FSDP2
# at world size 1), TUNEKIT_GPU_PYTEST_X (default -x; "" runs every test), TUNEKIT_GPU_DEADLINE (seconds for the whole script:
# the benchmark gets what is left, default 540), TUNEKIT_SERVE_BENCH_ARGS (extra benchmark arguments),
# TUNEKIT_SERVE_BENCH_DIR (the benchmark's work directory, default $TMPDIR/tunekit-serve-bench).
# Files under $OUT: env.txt, build.log, gpu_tests.log, gpu_report.jsonl (one JSON line of figures per test),
# serve_hotswap.log (the benchmark's JSON lines). Exit status: pytest's.
set -u -o pipefail
T0=$(date +%s)
TMP=${TMPDIR:-/tmp}
OUT=${OUT:-$TMP/tunekit-gpu-out}
mkdir -p "$OUT"
WHEELS=${1:-.whl}
SITE=${TUNEKIT_GPU_SITE:-$WHEELS/site}

if [ ! -d "$SITE/trl" ] && [ "${TUNEKIT_GPU_NO_INSTALL:-0}" != 1 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl || exit 1
fi
SITE=$(cd "$SITE" 2>/dev/null && pwd || echo "$SITE")
export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TUNEKIT_GPU_SHAPE=${TUNEKIT_GPU_SHAPE:-llama-3.1-8b}
if [ -z "${TUNEKIT_GPU_LAYERS:-}" ]; then  # the shape's own depth
  if [ "$TUNEKIT_GPU_SHAPE" = tiny ]; then export TUNEKIT_GPU_LAYERS=2; else export TUNEKIT_GPU_LAYERS=32; fi
fi
export TUNEKIT_GPU_MODEL_DIR=${TUNEKIT_GPU_MODEL_DIR:-$TMP/tunekit-gpu/$TUNEKIT_GPU_SHAPE-L$TUNEKIT_GPU_LAYERS}
export TUNEKIT_GPU_REPORT=$OUT/gpu_report.jsonl

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, peft, trl, bitsandbytes as b; print('torch', torch.__version__, 'cuda',
torch.version.cuda, '| transformers', transformers.__version__, '| peft', peft.__version__, '| trl', trl.__version__,
'| bitsandbytes', b.__version__)"
  echo "shape=$TUNEKIT_GPU_SHAPE layers=$TUNEKIT_GPU_LAYERS model=$TUNEKIT_GPU_MODEL_DIR"
} 2>&1 | tee "$OUT/env.txt"

# the base model, once (idempotent): random weights from the config, bf16, save_pretrained
python3 -m tests.gpu.model 2>&1 | tee "$OUT/build.log" || exit 1

timeout -k 10 "${TUNEKIT_GPU_TESTS_TIMEOUT:-420}" \
  python3 -m pytest tests/gpu -m gpu -s ${TUNEKIT_GPU_PYTEST_X--x} -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
# the CUDA-only cases of the CPU suite (Liger's kernels, also with 4-bit DoRA; the 4-bit function's rounding on
# cuBLAS; pinned-memory offload and the tiled MLP)
python3 -m pytest tests/test_local_speed.py tests/test_local_longctx.py -k cuda -q -p no:cacheprovider 2>&1 | tee -a "$OUT/gpu_tests.log"
[ "${PIPESTATUS[0]}" = 0 ] || [ "$tests_rc" != 0 ] || tests_rc=1
echo "pytest exit status $tests_rc after $(( $(date +%s) - T0 )) s" | tee -a "$OUT/gpu_tests.log"

if [ "${TUNEKIT_SERVE_BENCH:-0}" = 1 ]; then
  BENCH=${TUNEKIT_SERVE_BENCH_DIR:-$TMP/tunekit-serve-bench}
  M=$TUNEKIT_GPU_MODEL_DIR
  # the benchmark builds the same Llama-3.1-8B config itself; when the full 32-layer model was just built, reuse
  # its weights (links) with the benchmark's own 128256-token tokenizer instead of building and saving 16 GB again
  if [ "$TUNEKIT_GPU_SHAPE" = llama-3.1-8b ] && [ "$TUNEKIT_GPU_LAYERS" = 32 ] \
     && [ ! -e "$BENCH/llama8b-random/config.json" ]; then
    mkdir -p "$BENCH/llama8b-random"
    ln -s "$M"/*.safetensors* "$M/generation_config.json" "$BENCH/llama8b-random/" 2>/dev/null
    python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from serve_hotswap import big_vocab_tokenizer
big_vocab_tokenizer(128256).save_pretrained('$BENCH/llama8b-random')" && cp "$M/config.json" "$BENCH/llama8b-random/"
  fi
  left=$(( ${TUNEKIT_GPU_DEADLINE:-540} - ($(date +%s) - T0) ))
  [ "$left" -lt 60 ] && left=60
  echo "serve_hotswap: ${left}s left" | tee "$OUT/serve_hotswap.log"
  timeout -k 10 "$left" python3 benchmarks/serve_hotswap.py --work "$BENCH" ${TUNEKIT_SERVE_BENCH_ARGS:-} 2>&1 \
    | tee -a "$OUT/serve_hotswap.log"
  echo "serve_hotswap exit status ${PIPESTATUS[0]} after $(( $(date +%s) - T0 )) s" | tee -a "$OUT/serve_hotswap.log"
fi
exit "$tests_rc"
