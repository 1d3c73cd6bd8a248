#!/usr/bin/env bash
# One prepared GPU session for the lent device machine (PyTorch, Triton, Lightning and timm preinstalled there,
# nothing to download). Stages, each under its own time limit so that one failure or overrun leaves the others:
#   checks   parity of the Triton kernels with the float32 reference on CUDA (float32, float16, bfloat16), the
#            2**31-element int64 case, NaN isolation
#   quick    the headline workloads' timings without the torch.compile baseline (fast)
#   bench    the headline workloads (cub448x4, feat56x2, mnist2) with torch.compile (of the PyTorch and the
#            Triton paths) in float32
#   more     projective and spline on cub448x4, without torch.compile
#   profile  the CUDA kernels behind one Triton forward + backward, and host time against GPU time
#   sweep    forward + backward with other backward tiles than the launchers' fixed ones
#   compile  torch.compile(fullgraph=True), opcheck and autocast on the compiled path (tests/..., -k gpu)
#   train    the demo config end to end on the GPU (Triton sampler, `backend="auto"`), then its test set
# Results go to $OUT (one .txt per stage, kernels*.json). Arguments name the stages to run (default: checks
# quick compile more bench train), e.g.
#   bash benchmarks/gpu_session.sh checks quick      # parity + timings without the torch.compile baseline
#   bash benchmarks/gpu_session.sh bench more compile train
#
# The CLI stage needs jsonargparse and mlxtend, which that machine lacks. Here, once per checkout:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl jsonargparse mlxtend docstring_parser typeshed_client
# (.whl/ is git-ignored) and run this script there with `.whl` carried:  bash benchmarks/gpu_session.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

stage() {  # stage NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s)"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start))s" | tee -a "$OUT/$name.txt"
}

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, triton, pytorch_lightning as pl, timm; print('torch', torch.__version__, 'triton', triton.__version__,
'lightning', pl.__version__, 'timm', timm.__version__)"
} 2>&1 | tee "$OUT/versions.txt"
STAGES=${*:-checks quick compile more bench train}
# BENCH_WORKLOADS / BENCH_DTYPES narrow the headline stages (to finish a run that was cut short).
# shellcheck disable=SC2206
HEADLINE=(--workloads ${BENCH_WORKLOADS:-cub448x4 feat56x2 mnist2} --dtypes ${BENCH_DTYPES:-float32 bfloat16} --rep 50)
for name in $STAGES; do
    case $name in
    checks) stage checks "${CHECK_LIMIT:-200}" python3 benchmarks/bench_kernels.py --check-only ;;
    quick) stage quick 90 python3 benchmarks/bench_kernels.py "${HEADLINE[@]}" --skip-compile --json "$OUT/quick.json" ;;
    bench) stage bench 240 python3 benchmarks/bench_kernels.py "${HEADLINE[@]}" --compile-dtypes float32 \
        --json "$OUT/kernels.json" ;;
    more) stage more 60 python3 benchmarks/bench_kernels.py --workloads cub448x4-projective cub448x4-tps16 \
        --dtypes float32 bfloat16 --rep 50 --skip-compile --json "$OUT/kernels-more.json" ;;
    profile) stage profile 60 python3 benchmarks/profile_kernels.py cub448x4 feat56x2 mnist2 ;;
    sweep) stage sweep 120 python3 benchmarks/sweep_tiles.py ;;
    compile) stage compile 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_triton.py -k gpu ;;
    train) stage train 90 python3 train.py fit --config configs/demo.yaml --test_after_fit true \
        --trainer.default_root_dir /tmp/gpu_logs --trainer.enable_progress_bar false ;;
    *) echo "unknown stage $name" ;;
    esac
done
