#!/usr/bin/env bash
# The GPU benchmarks of README "On a GPU", in one go (about 10 minutes on an H200):
#   bash benchmarks/gpu_benchmarks.sh [LOG_DIR]
# 0. model_flops.py --measure: this card's bf16 matrix-product rate and copy bandwidth, and the
#    MFU ceiling they allow when BatchNorm runs as kernels of its own.
# 1. bf16 at 16x1x480x480: PyTorch AMP (channels_last) eager and torch.compile against unet_jax's
#    plain step and project step with their default levers ('auto' picks XLA's ops on a GPU where
#    the CPU kernels would be slow), 2 alternating rounds.
# 2. profile_step.py jax on the plain step: the all-XLA and the defaults steps' kernel profiles
#    (by kind: convolution, reduction, ...) and the CPU kernels alone on a GPU (mask max-pool,
#    measured on an H100: 1.03x; banded weight gradient, not yet alone), in LOG_DIR/profile/.
# 3. The project step with every lever on XLA's op (--no_levers), the levers' baseline.
# 4. The project step with the CPU kernels named (banded weight gradient, mask max-pool).
# 5. The project step with model.remat: device memory.
# 1, 3, 4, 5 took about 6 minutes on an H200; 2 is limited to 4 more. 3-5 repeat rows measured
# before: a call with a 10-minute limit gets 0-2 first (PARTS=rates,sides,profile with
# VARIANTS=xla,defaults,pool_masks: 6.5 minutes on a fresh H100).
# SIZE, BATCH, ROUNDS, BASE override the shape (small values make a quick CPU smoke test);
# PYTHON the interpreter (python3); PARTS picks parts (rates,sides,profile,all_xla,cpu_kernels,
# remat: all by default) and VARIANTS the profile's variants (profile_step.py).
set -u
LOG=${1:-benchmarks/gpu_logs}
PY=${PYTHON:-python3}
SIZE=${SIZE:-480} BATCH=${BATCH:-16} ROUNDS=${ROUNDS:-2} BASE=${BASE:-64}
PARTS=${PARTS:-rates,sides,profile,all_xla,cpu_kernels,remat}
VARIANTS=${VARIANTS:-xla,defaults,defaults_few_xla,defaults_auto_layout,pool_masks,banded_wgrad}
part() { [[ ",$PARTS," == *",$1,"* ]]; }
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1
# Both sides may reuse compiled kernels across their processes (torch.compile does by default);
# the table quotes the slowest round's first step, i.e. the cold one.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/unet_jax_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
common=(--size "$SIZE" --batch "$BATCH" --base_features "$BASE" --precision bf16)

{ nvidia-smi -L 2>/dev/null || true
  "$PY" -c 'import jax, flax, optax, torch; print("jax", jax.__version__, jax.devices(),
"flax", flax.__version__, "optax", optax.__version__, "torch", torch.__version__)'
} 2>&1 | tee "$LOG/versions.txt"

sides=torch,torch_compile,jax_plain,jax_project
if ! "$PY" -c 'import unet_jax.train' 2>"$LOG/import_error.txt"; then
  echo "unet_jax.train does not import here (see import_error.txt): no jax_project side"
  tail -3 "$LOG/import_error.txt"
  sides=torch,torch_compile,jax_plain
fi

run() {  # name, seconds, args...
  local name=$1 limit=$2; shift 2
  echo "== $name: $*"
  timeout "$limit" "$PY" benchmarks/compare_pytorch.py "${common[@]}" "$@" >"$LOG/$name.log" 2>&1
  echo "exit $?"; grep -v -e '^{' -e '^round' "$LOG/$name.log" | tail -12
}
if part rates; then
  echo "== rates: model_flops.py --measure"
  timeout 60 "$PY" benchmarks/model_flops.py --measure --size "$SIZE" --batch "$BATCH" \
    2>&1 | tee "$LOG/rates.log"
fi
part sides && run bf16_sides 360 --sides "$sides" --repeats "$ROUNDS"
if part profile; then
  echo "== profile: plain step, kernel profiles and single levers ($VARIANTS)"
  SIZE=$SIZE BATCH=$BATCH BASE=$BASE VARIANTS=$VARIANTS \
    timeout 240 "$PY" benchmarks/profile_step.py jax "$LOG/profile" >"$LOG/profile.log" 2>&1
  echo "exit $?"; grep -E '^[a-z_]+: compile|failed|^\{' "$LOG/profile.log"
fi
part all_xla && run bf16_all_xla 100 --sides jax_project --no_levers --repeats 1
part cpu_kernels && run bf16_cpu_kernels 100 --sides jax_project --conv_weight_grad banded \
  --max_pool masks --repeats 1
part remat && run bf16_remat 100 --sides jax_project --remat --repeats 1
