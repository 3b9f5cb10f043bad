"""Side-by-side ERF heatmaps of several contribution matrices (Figure 3 of the SLaK paper) and a table of their ratios.

Each panel shows one matrix normalised by its own maximum, with its colour bar; by default after the same
log10(A + 1) transform as ``analyze_erf.py`` (``--scale linear`` divides the raw matrix by its max, as the original
Figure-3 script did). The table lists the high-contribution area ratios of ``analyze_erf.area_ratios``.

Replaces the original ``erf_slak51_convnext7_convnext31.py``, which hard-coded three matrices, only called
``plt.show()`` and had to be run from the repo root.

Example (Figure 3)::

    python erf/compare_erf.py convnext7.npy convnext31.npy slak51.npy \\
        --labels "ConvNeXt [7, 7, 7, 7]" "ConvNeXt (RepLKNet) [31, 29, 27, 13]" "SLaK [51, 49, 47, 13]" \\
        --out figure3.png --json figure3.json
"""
import argparse
import os
import sys
from typing import Dict, List, Optional

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from erf.analyze_erf import (THRESHOLDS, area_ratios, draw_heatmap, load_matrix, normalise, run_cli,  # noqa: E402
                             write_json, write_output)

import matplotlib.pyplot as plt  # noqa: E402  (after analyze_erf, which selects the Agg backend)


def format_table(labels: List[str], table: Dict[str, Dict[str, Optional[dict]]]) -> str:
    """Area ratio per threshold and matrix (side length in brackets; '-' where the threshold is never reached)."""
    width = max(len(label) for label in labels) + 2
    lines = [''.ljust(width) + ''.join(f't={t}'.rjust(18) for t in THRESHOLDS)]
    for label in labels:
        cells = []
        for t in THRESHOLDS:
            r = table[label][str(t)]
            cells.append('-'.rjust(18) if r is None else f'{r["area_ratio"]:.4f} ({r["side_length"]})'.rjust(18))
        lines.append(label.ljust(width) + ''.join(cells))
    return '\n'.join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('Compare the ERFs of several models (Figure 3 style)')
    parser.add_argument('sources', nargs='+', help='matrices saved by visualize_erf.py')
    parser.add_argument('--labels', nargs='+', default=None, help='one title per matrix (default: file names)')
    parser.add_argument('--out', default='erf_comparison.png', type=str, help='PNG to write')
    parser.add_argument('--json', default=None, type=str, help='also write {label: ratios} as JSON')
    parser.add_argument('--scale', default='log', choices=['log', 'linear'],
                        help='log: log10(A + 1) / max as analyze_erf.py; linear: A / max as the original Figure 3')
    parser.add_argument('--cmap', default='pink', type=str, help='matplotlib colour map (original Figure 3: pink)')
    return parser


def main(args: argparse.Namespace) -> None:
    labels = args.labels or [os.path.splitext(os.path.basename(p))[0] for p in args.sources]
    if len(labels) != len(args.sources):
        raise ValueError(f'--labels gives {len(labels)} labels for {len(args.sources)} matrices; give one per matrix')
    if len(set(labels)) != len(labels):
        raise ValueError(f'--labels must be distinct (they key the table); got {labels}')
    if args.cmap not in plt.colormaps():
        raise ValueError(f'--cmap {args.cmap!r} is not a matplotlib colour map (e.g. pink, coolwarm, viridis)')
    matrices = [load_matrix(p) for p in args.sources]
    table = {label: area_ratios(m) for label, m in zip(labels, matrices)}
    print(format_table(labels, table))
    if args.json:
        write_json(table, args.json)
    fig, axes = plt.subplots(1, len(matrices), figsize=(4 * len(matrices), 4), squeeze=False)
    for ax, label, matrix in zip(axes[0], labels, matrices):
        shown = normalise(matrix) if args.scale == 'log' else matrix / matrix.max()
        draw_heatmap(ax, shown, args.cmap, title=label)
    fig.tight_layout()
    try:
        write_output(args.out, '--out', lambda p: fig.savefig(p, dpi=100))
    finally:
        plt.close(fig)
    print(f'figure saved to {args.out}')


if __name__ == '__main__':
    sys.exit(run_cli(main, get_args_parser()))
