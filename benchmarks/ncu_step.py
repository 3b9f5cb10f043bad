"""Hardware counters of every kernel of one training step (issue 20: the ncu evidence behind the step's floor).

On a GPU machine whose runtime lets ``ncu`` read counters (the device library's KINDS.md says which)::

    ncu --clock-control none --profile-from-start off --csv --page raw --print-units base \\
        --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,\\
    sm__warps_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread \\
        python benchmarks/ncu_step.py run --model "SLaK-T ours" --batch 64 > ncu_step.csv
    python benchmarks/ncu_step.py report ncu_step.csv

``run`` builds a ``bench_throughput.py`` model, takes three AdamW + bf16-autocast steps unprofiled (compiles,
allocations) and one between ``cudaProfilerStart``/``Stop``, so ncu sees exactly one step's kernels, each replayed in
isolation (serialised, caches flushed: the DRAM bytes are what the kernel must fetch cold).

``report`` reads the CSV and prints, per kernel group of ``profile_step.py``: kernels, summed time, DRAM bytes, the
bandwidth they achieved and the time the same bytes take at the card's peak (the group's memory floor), and the
time-weighted achieved occupancy; then the most expensive kernels with grid, registers and occupancy.
"""
import argparse
import csv
import io
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))

TIME, READ, WRITE = 'gpu__time_duration.sum', 'dram__bytes_read.sum', 'dram__bytes_write.sum'
OCCUPANCY, REGISTERS = 'sm__warps_active.avg.pct_of_peak_sustained_active', 'launch__registers_per_thread'
METRICS = (TIME, READ, WRITE, OCCUPANCY, REGISTERS)
_SCALE = {'': 1., 'nsecond': 1e-9, 'usecond': 1e-6, 'msecond': 1e-3, 'second': 1., 'byte': 1., 'kbyte': 1e3,
          'mbyte': 1e6, 'gbyte': 1e9, '%': 1., 'register/thread': 1., 'cycle': 1.}


def _number(text: str, unit: str) -> float:
    unit = unit.strip().lower()
    if unit not in _SCALE:
        raise ValueError(f'ncu CSV: unknown unit {unit!r}; run ncu with --print-units base')
    return float(text.replace(',', '')) * _SCALE[unit]


def parse_csv(text: str) -> List[Dict[str, object]]:
    """The kernels of ``ncu --csv --page raw`` output (lines before its header, e.g. ``==PROF==`` and the program's
    own prints, are skipped): one dict per kernel with ``name``, ``grid``, ``block`` and each of ``METRICS`` in base
    units (seconds, bytes, percent, registers)."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"') and 'Kernel Name' in line), None)
    if start is None:
        raise ValueError('no ncu CSV header ("ID",...,"Kernel Name",...) found: was ncu run with --csv --page raw?')
    rows = list(csv.reader(io.StringIO('\n'.join(lines[start:]))))
    header = rows[0]
    has_units = len(rows) > 1 and not rows[1][0].strip().isdigit()
    units = rows[1] if has_units else [''] * len(header)
    missing = [m for m in METRICS if m not in header]
    if missing:
        raise ValueError(f'ncu CSV lacks the metrics {missing}; pass them to --metrics')
    col = {name: header.index(name) for name in header}
    kernels = []
    for row in rows[1 + has_units:]:
        if len(row) != len(header) or not row[col['ID']].strip().isdigit():
            continue
        k = {'name': row[col['Kernel Name']], 'grid': row[col['Grid Size']] if 'Grid Size' in col else '',
             'block': row[col['Block Size']] if 'Block Size' in col else ''}
        for m in METRICS:
            k[m] = _number(row[col[m]], units[col[m]])
        kernels.append(k)
    if not kernels:
        raise ValueError('the ncu CSV holds no kernel rows: did the profiled step run (cudaProfilerStart)?')
    return kernels


def short_name(name: str) -> str:
    """A kernel's name without ``void``, template arguments and parameter list (ATen's run to hundreds of
    characters)."""
    name = name.replace('(anonymous namespace)', 'anon')
    name = name[5:] if name.startswith('void ') else name
    depth, out = 0, []
    for ch in name:
        if ch == '<':
            depth += 1
        elif ch == '>' and depth:
            depth -= 1
        elif depth == 0:
            out.append(ch)
    return ''.join(out).split('(')[0].strip()


def summarise(kernels: List[Dict[str, object]], peak_bytes_s: float) -> Dict[str, Dict[str, float]]:
    """Per ``profile_step.group_of`` group: kernels, seconds, DRAM bytes, achieved bytes/s, the seconds those bytes
    take at ``peak_bytes_s`` (the floor if the group only moved its bytes), time-weighted occupancy (percent)."""
    import profile_step
    groups: Dict[str, Dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for k in kernels:
        g = groups[profile_step.group_of(k['name'])]
        g['kernels'] += 1
        g['seconds'] += k[TIME]
        g['bytes'] += k[READ] + k[WRITE]
        g['occupancy_x_s'] += k[OCCUPANCY] * k[TIME]
    out = {}
    for name, g in groups.items():
        out[name] = {'kernels': int(g['kernels']), 'seconds': g['seconds'], 'bytes': g['bytes'],
                     'bytes_per_s': g['bytes'] / g['seconds'] if g['seconds'] else 0.,
                     'floor_seconds': g['bytes'] / peak_bytes_s,
                     'occupancy_pct': g['occupancy_x_s'] / g['seconds'] if g['seconds'] else 0.}
    return out


def report(kernels: List[Dict[str, object]], peak_bytes_s: float, top: int = 30) -> str:
    groups = summarise(kernels, peak_bytes_s)
    total_s = sum(g['seconds'] for g in groups.values())
    total_b = sum(g['bytes'] for g in groups.values())
    lines = [f'{len(kernels)} kernels, {total_s * 1e3:.2f} ms serialised, {total_b / 1e9:.2f} GB from/to DRAM '
             f'(at {peak_bytes_s / 1e12:.2f} TB/s: {total_b / peak_bytes_s * 1e3:.2f} ms)',
             f'{"group":58s} {"kernels":>7s} {"ms":>8s} {"GB":>7s} {"TB/s":>6s} {"floor ms":>8s} {"occ %":>6s}']
    for name, g in sorted(groups.items(), key=lambda kv: -kv[1]['seconds']):
        lines.append(f'{name[:58]:58s} {g["kernels"]:7d} {g["seconds"] * 1e3:8.3f} {g["bytes"] / 1e9:7.3f} '
                     f'{g["bytes_per_s"] / 1e12:6.2f} {g["floor_seconds"] * 1e3:8.3f} {g["occupancy_pct"]:6.1f}')
    lines.append(f'top {top} kernels: us, DRAM MB, TB/s, occupancy %, registers, grid x block, name')
    for k in sorted(kernels, key=lambda k: -k[TIME])[:top]:
        moved = k[READ] + k[WRITE]
        lines.append(f'{k[TIME] * 1e6:9.1f} {moved / 1e6:8.1f} {moved / k[TIME] / 1e12 if k[TIME] else 0:5.2f} '
                     f'{k[OCCUPANCY]:5.1f} {k[REGISTERS]:4.0f}  {k["grid"]}x{k["block"]}  {short_name(k["name"])[:80]}')
    return '\n'.join(lines)


def run(model_name: str, batch: int, warmup: int) -> None:
    import torch
    import bench_throughput as bt
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    step = bt.make_train_step(bt.make(model_name).cuda(), batch)
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    step()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print(f'ncu_step: one step of {model_name}, batch {batch}, profiled', file=sys.stderr)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    sub = parser.add_subparsers(dest='cmd', required=True)
    r = sub.add_parser('run', help='one profiled training step (run under ncu --profile-from-start off)')
    r.add_argument('--model', default='SLaK-T ours', help='a bench_throughput.py model name')
    r.add_argument('--batch', type=int, default=64)
    r.add_argument('--warmup', type=int, default=3)
    s = sub.add_parser('report', help='summarise the CSV ncu wrote')
    s.add_argument('csv')
    s.add_argument('--peak_tb_s', type=float, default=3.35, help='DRAM peak of the card, TB/s (H100 SXM: 3.35)')
    s.add_argument('--top', type=int, default=30)
    args = parser.parse_args(argv)
    if args.cmd == 'run':
        run(args.model, args.batch, args.warmup)
    else:
        print(report(parse_csv(Path(args.csv).read_text()), args.peak_tb_s * 1e12, args.top))


if __name__ == '__main__':
    main()
