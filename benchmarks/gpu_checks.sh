#!/usr/bin/env bash
# Issue 6's GPU figures in one run, for a machine with a CUDA GPU: the CUDA test, model-only and
# end-to-end translate throughput (benchmarks/translate.py), how fast the host side could feed the
# GPU (benchmarks/pipeline.py) and training step time (benchmarks/train_step.py), each logged.
#
#     bash benchmarks/gpu_checks.sh [OUTDIR]        # logs in OUTDIR (default: $OUT, else /tmp/gpu_checks)
#     DEVICE=cpu SIZES=2048 STEPS=2 bash benchmarks/gpu_checks.sh   # the same on the CPU, to check the script
#
# On a machine whose Python has torch but not this project's other dependencies (this workplace's
# device machines: Python 3.12, no rasterio or pyproj, no network), `make gpu-bundle` here first
# packs the missing wheels into .gpu/site312.tar.xz (git-ignored; carry `.gpu` with the run); the
# script unpacks it and runs the project from the checkout without installing it. The bundle is
# 31.5 MB; with the checkout (34.6 MB in session 8) it just fits the device's 64 MiB transfer.
# Checked without a GPU (session 10): unpacked for Python 3.12.1 beside numpy 2.5.2, click, attrs,
# certifi and pyparsing (the device has them), rasterio wrote and read a ZSTD GeoTIFF with
# overviews, pyproj transformed a point and shapely built a box; torch on 3.12 was not tried here.
set -uo pipefail
out=${1:-${OUT:-/tmp/gpu_checks}}
device=${DEVICE:-cuda}
sizes=${SIZES:-8192,16384}
steps=${STEPS:-20}
mkdir -p "$out"
py=${PYTHON:-python3}
if ! "$py" -c "import rasterio" 2>/dev/null && [ -f .gpu/site312.tar.xz ]; then
    tar -C /tmp -xJf .gpu/site312.tar.xz
    ln -sfn "$PWD/cli" /tmp/site312/geosat2map_cli
    export PYTHONPATH="/tmp/site312:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
status=0
step() {  # step NAME COMMAND...: run, log to OUTDIR/NAME.log, keep going after a failure
    local name=$1; shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || { echo "== $name failed (exit $rc)"; status=1; }
}
step environment "$py" -c "import torch, rasterio; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
    torch.cuda.get_device_name(0) if torch.cuda.is_available() else '', '| rasterio', rasterio.__version__,
    'GDAL', rasterio.__gdal_version__)"
if [ "$device" = cuda ]; then
    step cuda_test "$py" -m pytest -q -rs -p no:cacheprovider tests/test_translate.py -k cuda
fi
step translate "$py" benchmarks/translate.py --device "$device" --backend torch --sizes "$sizes" --repeat 2
step pipeline "$py" benchmarks/pipeline.py --size "${sizes%%,*}" --repeat 2
# translate --tta-median: the 18 views and their median on the device
step translate_median "$py" benchmarks/translate.py --device "$device" --backend torch --sizes "${sizes%%,*}" \
    --tta median --repeat 1
# translate's default for fine scenes: resampled to the model's resolution (read in strips, one thread per core)
step translate_model_res "$py" benchmarks/translate.py --device "$device" --backend torch --sizes "$sizes" \
    --resolution model --repeat 2
step pipeline_model_res "$py" benchmarks/pipeline.py --size "${sizes##*,}" --resolution model --repeat 2
for ngf in 32 64; do
    step "train_step_ngf$ngf" "$py" benchmarks/train_step.py --device "$device" --ngf "$ngf" --steps "$steps"
done
exit $status
