"""Run one layer's Triton depthwise kernels a few times, for Nsight Compute to read their hardware counters.

On a GPU machine whose runtime lets ``ncu`` read counters (the device library's KINDS.md says which), e.g.::

    ncu --clock-control none --kernel-name regex:dwconv_ --launch-skip 2 --launch-count 2 \\
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \\
        python benchmarks/ncu_dwconv.py --layer 124,56,51,5

Each pass launches the forward kernel then the weight-gradient kernel of the layer ``C,map,kh,kw`` (batch 64, bf16,
the launchers' default configurations); the first pass compiles them, so skip it.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dwconv import kern  # noqa: E402  (the kernels, loaded by path as SLaK.py does)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layer", default="124,56,51,5", help="channels,map,kh,kw")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--passes", type=int, default=3)
    a = p.parse_args()
    c, hw, kh, kw = (int(v) for v in a.layer.split(","))
    x = torch.randn(a.batch, c, hw, hw, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(c, 1, kh, kw, device="cuda", dtype=torch.bfloat16)
    path = kern.kernel_path(hw, hw, kh, kw, weight_grad=True)
    for _ in range(a.passes):
        kern.launch_forward(x, w)
        kern._WGRAD_LAUNCH[path](x, x, tuple(w.shape))
    torch.cuda.synchronize()
    fwd = kern.kernel_path(hw, hw, kh, kw)
    print(f"{fwd} forward, {path} weight-gradient kernels of {c}@{hw} {kh}x{kw}, batch {a.batch}: "
          f"{a.passes} passes done")


if __name__ == "__main__":
    main()
