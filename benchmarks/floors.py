"""Floors of a SLaK-T block's large-kernel part (three branch convs + their BatchNorms + the sum), forward and
backward, against what our kernels take (issue 20, item 1). No GPU needed: the numbers are counted, and the measured
column is read from a ``bench_dwconv.py`` table in ``benchmarks/results/``.

Per block, with T = N*C*H*W elements of one feature map (bf16, 2 bytes):

* FLOPs: 2*T*(K*k + k*K + k*k) forward (Decom: K x k, k x K and the k x k small kernel), 3x that forward+backward
  (input and weight gradients).
* Minimum bytes, today's form (one kernel per branch conv, fused branch-BN kernels): per conv 12 B/element forward
  and backward (x and y; dy twice, x, dx: what ``bench_dwconv.py`` counts); the BN forward reads the three outputs
  for its statistics and again to apply and sum them, and writes the sum (14 B); its backward reads dy and the
  outputs for the reductions, then again to write the three output gradients (22 B): **72 B/element**.
* Minimum bytes, fused form (one kernel reads x once for all three branches and writes their outputs with the BN
  statistics in its epilogue; BN apply + sum in the tail's prologue; one backward kernel reading dy, the outputs and
  x for every input and weight gradient after one reduction pass): ~12 B forward + ~20 B backward: **32 B/element**.
* Time floors at the H100's rates: bytes / 3.0 TB/s (device copy, KINDS.md), FLOPs / 790 TFLOP/s (bf16 tensor
  cores, the banded kernels' form, before their padding waste) and FLOPs / 67 TFLOP/s (fp32 CUDA cores, a direct
  kernel).

Run: ``python benchmarks/floors.py [--batch 64] [--measured benchmarks/results/dwconv_round10_plans_h200.txt]``.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HBM = 3.0e12          # bytes/s, H100 device-to-device copy
TENSOR = 790e12       # bf16 tensor-core FLOP/s
CUDA_CORE = 67e12     # fp32 FMA FLOP/s (datasheet)
SLAK_T = [(124, 56, 51, 3), (249, 28, 49, 3), (499, 14, 47, 9), (998, 7, 13, 3)]  # (C, map, K, blocks); k = 5
SMALL = 5
BYTES_TODAY, BYTES_FUSED = 72, 32


def block_floor(n: int, c: int, hw: int, big: int, small: int = SMALL) -> dict:
    """FLOPs, bytes and time floors (ms) of one block's large-kernel part, forward + backward."""
    elements = n * c * hw * hw
    flops = 3 * 2 * elements * (2 * big * small + small * small)
    return {'elements': elements, 'gflop': flops / 1e9,
            'gb_today': elements * BYTES_TODAY / 1e9, 'gb_fused': elements * BYTES_FUSED / 1e9,
            'ms_bytes_today': elements * BYTES_TODAY / HBM * 1e3, 'ms_bytes_fused': elements * BYTES_FUSED / HBM * 1e3,
            'ms_tensor': flops / TENSOR * 1e3, 'ms_cuda_core': flops / CUDA_CORE * 1e3}


def measured_fb(path: Path) -> dict:
    """{(C, map): f+b ms summed over the block's three convs} from a bench_dwconv.py table (the 'T/S' rows)."""
    rows = {}
    pattern = re.compile(r'^T/S\s+(\d+)\s+(\d+)\s+(\d+)x(\d+)\s+\|.*?\|\s+([\d.]+)\s+([\d.]+)')
    for line in path.read_text().splitlines():
        m = pattern.match(line)
        if m:
            c, hw = int(m.group(1)), int(m.group(2))
            ours, cudnn = float(m.group(5)), float(m.group(6))
            total = rows.setdefault((c, hw), [0.0, 0.0])
            total[0] += ours
            total[1] += cudnn
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--batch', type=int, default=64)
    parser.add_argument('--measured', default=str(ROOT / 'benchmarks/results/dwconv_round10_plans_h200.txt'))
    args = parser.parse_args()
    measured = measured_fb(Path(args.measured)) if Path(args.measured).exists() else {}
    print(f'SLaK-T large-kernel part per block, batch {args.batch}, forward+backward; floors at H100 rates '
          f'(ms); measured: our three convs (without the BN kernels), {Path(args.measured).name}')
    print(f'{"stage":5s} {"C@map":>8s} {"GFLOP":>6s} {"GB now":>6s} {"GB fused":>8s} | {"bytes now":>9s} '
          f'{"fused":>6s} {"tensor":>6s} {"CUDA-c":>6s} | {"measured":>8s} {"x floor":>7s} | {"cuDNN":>6s}')
    totals = dict(now=0.0, fused=0.0, tensor=0.0, measured=0.0, cudnn=0.0)
    for stage, (c, hw, big, blocks) in enumerate(SLAK_T):
        f = block_floor(args.batch, c, hw, big)
        floor_now = max(f['ms_bytes_today'], f['ms_tensor'])
        got, cudnn = measured.get((c, hw), (float('nan'), float('nan')))
        print(f'{stage + 1:5d} {f"{c}@{hw}":>8s} {f["gflop"]:6.1f} {f["gb_today"]:6.2f} {f["gb_fused"]:8.2f} | '
              f'{f["ms_bytes_today"]:9.3f} {f["ms_bytes_fused"]:6.3f} {f["ms_tensor"]:6.3f} '
              f'{f["ms_cuda_core"]:6.3f} | {got:8.3f} {got / floor_now:7.1f} | {cudnn:6.2f}')
        totals['now'] += blocks * floor_now
        totals['fused'] += blocks * max(f['ms_bytes_fused'], f['ms_tensor'])
        totals['tensor'] += blocks * f['ms_tensor']
        totals['measured'] += blocks * got
        totals['cudnn'] += blocks * cudnn
    print(f'model (18 blocks): floor today {totals["now"]:.2f} ms, fused {totals["fused"]:.2f} ms '
          f'(tensor-core FLOPs alone {totals["tensor"]:.2f} ms); measured convs {totals["measured"]:.2f} ms, '
          f'cuDNN {totals["cudnn"]:.2f} ms')


if __name__ == '__main__':
    main()
