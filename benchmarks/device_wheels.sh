#!/usr/bin/env bash
# The wheels the device machine lacks (its image has torch, triton, torchvision, opencv, scipy, ...; see the device
# README), downloaded here for Python 3.12 / x86_64 into .whl/ (main.py: timm, tensorboardX) and .whl_mm/ (the
# OpenMMLab stack for benchmarks/device_downstream.sh). Both folders are git-ignored via .git/info/exclude and
# travel with `carry`. Run once from the repository root on a machine with pip and the package index.
set -eu
mkdir -p .git/info .whl .whl_mm
for d in /.whl/ /.whl_mm/ /.bench/; do grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done
get() {  # folder, requirement...
  local dest=$1; shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d "$dest" "$@"
}
get .whl timm==1.0.31 tensorboardx==2.6.5
get .whl_mm mmengine==0.10.7 mmcv-lite==2.1.0 mmsegmentation==1.2.2 mmdet==3.3.0 ftfy==6.3.1 addict==2.4.0 \
  yapf==0.43.0 platformdirs==4.14.9 termcolor==3.3.0 terminaltables==3.1.10 wcwidth==0.9.5 prettytable==3.19.0 \
  pycocotools==2.0.11 shapely==2.2.0
du -sh .whl .whl_mm
