#!/usr/bin/env bash
# One device call of issue 19's downstream measurement (see benchmarks/bench_downstream.py):
#   bash benchmarks/device_downstream.sh [bench_downstream.py flags]
#       UperNet and Cascade Mask R-CNN, SLaK-T and the ConvNeXt-T emulation (then Cascade SLaK-T with
#       SLAK_COMPILE_TAIL=0), each through the wheels' tools/train.py; stops starting runs at BUDGET_S (default 420 s);
#       with THEN_DWCONV_S=N, then the dwconv check below until N s after the start
#   bash benchmarks/device_downstream.sh dwconv
#       bench_dwconv.py --detection_shapes: the Triton depthwise convs on detection map sizes vs cuDNN / float64
# Needs the pinned wheels in .whl/ (timm, tensorboardX) and .whl_mm/ (the OpenMMLab stack and the packages it needs
# beyond the machine's image: see the report of issue 19); writes everything under $OUT.
set -u
START=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl .whl_mm/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
python3 -m compileall -q -j 0 /tmp/site > /dev/null 2>&1 || true  # as a user's pip install does (see device_e2e.sh)
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader; nproc;
  python3 -c "import torch, triton, torchvision, timm, mmengine, mmcv, mmseg, mmdet, pycocotools, shapely
import distutils.errors  # mmengine's collect_env needs it: on Python 3.12 only setuptools' shim provides it
print('torch', torch.__version__, 'triton', triton.__version__, 'torchvision', torchvision.__version__, 'timm',
      timm.__version__, 'mmengine', mmengine.__version__, 'mmcv', mmcv.__version__, 'mmseg', mmseg.__version__,
      'mmdet', mmdet.__version__)"
  uptime; ps -eo pid,etimes,pcpu,rss,args --sort=-pcpu | head -8 | cut -c1-160  # left over from a call before?
} 2>&1 | tee "$OUT/machine.txt"
left() { echo $(( $1 - $(date +%s) + START )); }
case "${1:-}" in
  dwconv)
    timeout "$(left 420)" python3 benchmarks/bench_dwconv.py --detection_shapes 2>&1 | tee "$OUT/dwconv_detection.txt" \
      | tail -40 ;;
  *)
    python3 benchmarks/bench_downstream.py --out "$OUT" --data_root "$PWD/.bench/downstream_data" \
      --work_root /tmp/bench_downstream_runs --cache_root "$PWD/.bench/downstream_cache" \
      --budget_s "$(left "${BUDGET_S:-420}")" --run_timeout_s "${RUN_TIMEOUT_S:-200}" "$@" 2>&1 \
      | tee "$OUT/bench_downstream.log" | tail -40
    # THEN_DWCONV_S=590: then the kernels' GPU check on detection's map sizes until that many s since the start
    if [ -n "${THEN_DWCONV_S:-}" ] && [ "$(left "$THEN_DWCONV_S")" -gt 20 ]; then
      timeout "$(left "$THEN_DWCONV_S")" python3 benchmarks/bench_dwconv.py --detection_shapes 2>&1 \
        | tee "$OUT/dwconv_detection.txt" | tail -25
    fi ;;
esac
echo "device_downstream: total $(( $(date +%s) - START )) s"
