"""High-contribution area ratios and a heatmap of a contribution-score matrix from ``visualize_erf.py``.

The matrix A is normalised as in the original: A <- log10(A + 1), then A <- A / max(A). For each threshold t the
smallest centred square (side 2i+1, i = 1 .. h//2 - 1) whose share of the total exceeds t gives the side length and the
area ratio side^2 / (h * w). The ratio measures how far the high-contribution pixels spread: a larger ratio at a given
t means a wider effective receptive field.

Fixed against the original: the area ratio divided by a hard-coded 1024^2 and is now relative to
the matrix's own size; a threshold that no square reaches reports ``None`` (JSON null) instead of crashing; the
heatmap needs only matplotlib (no seaborn) and writes the PNG with the Agg backend. A file that is not a .npy matrix
and an output path that cannot be written end in one ``error:`` line (as in ``compare_erf.py``).

Non-square matrices (e.g. from a rectangular input): the squares are centred on (h//2, w//2), which is where
``visualize_erf.py`` takes the central output pixel, and grow up to i = min(h, w)//2 - 1.

Example::

    python erf/analyze_erf.py --source SLaK_tiny_erf.npy --heatmap_save SLaK_tiny_heatmap.png --json ratios.json
"""
import argparse
import json
import os
import sys
from typing import Callable, Dict, Optional, Sequence

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from mpl_toolkits.axes_grid1 import make_axes_locatable  # noqa: E402

THRESHOLDS = (0.2, 0.3, 0.5, 0.99)
NPY_MAGIC = b'\x93NUMPY'  # the first bytes of every np.save file


def load_matrix(path: str) -> np.ndarray:
    """A 2-D contribution matrix saved with ``np.save``; a clear ValueError naming the file for anything else."""
    if not os.path.isfile(path):
        raise ValueError(f'{path} not found; create it with erf/visualize_erf.py --save_path {path}')
    with open(path, 'rb') as f:
        is_npy = f.read(len(NPY_MAGIC)) == NPY_MAGIC
    if not is_npy:
        raise ValueError(f'{path} is not a .npy file (np.save format); create it with erf/visualize_erf.py '
                         f'--save_path {path}')
    try:
        matrix = np.load(path)  # allow_pickle=False: an object array is refused, never unpickled
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f'{path} cannot be read as a matrix ({str(e).splitlines()[0]}); create it again with '
                         f'erf/visualize_erf.py --save_path {path}') from None
    if matrix.ndim != 2 or min(matrix.shape) < 3:
        raise ValueError(f'{path} must hold a 2-D matrix of at least 3x3; got shape {matrix.shape}')
    if not np.isfinite(matrix).all() or (matrix < 0).any():
        raise ValueError(f'{path} must hold finite, non-negative contribution scores')
    return matrix


def normalise(matrix: np.ndarray) -> np.ndarray:
    """log10(A + 1) / max, the original's transform (compresses the centre peak so the periphery stays visible)."""
    scaled = np.log10(np.asarray(matrix, dtype=np.float64) + 1)
    peak = scaled.max()
    if not peak > 0:
        raise ValueError('the contribution matrix is all zero: the model\'s output does not depend on the input')
    return scaled / peak


def high_contribution_sides(normalised: np.ndarray, thresholds: Sequence[float] = THRESHOLDS
                            ) -> Dict[float, Optional[int]]:
    """Side of the smallest centred square whose share of the total exceeds each threshold (None if none does).

    All square sums come from one summed-area table instead of the original's loop over i.
    """
    h, w = normalised.shape
    cy, cx = h // 2, w // 2
    radii = np.arange(1, min(h, w) // 2)
    table = np.zeros((h + 1, w + 1))
    table[1:, 1:] = normalised.cumsum(0).cumsum(1)
    top, bottom, left, right = cy - radii, cy + radii + 1, cx - radii, cx + radii + 1
    sums = table[bottom, right] - table[top, right] - table[bottom, left] + table[top, left]
    shares = sums / normalised.sum()
    sides = {}
    for t in thresholds:
        reached = np.nonzero(shares > t)[0]
        sides[t] = int(2 * radii[reached[0]] + 1) if reached.size else None
    return sides


def area_ratios(matrix: np.ndarray, thresholds: Sequence[float] = THRESHOLDS) -> Dict[str, Optional[dict]]:
    """``{"0.2": {"side_length": s, "area_ratio": s^2 / (h * w)}, ...}`` for a raw matrix (None: never reached)."""
    normalised = normalise(matrix)
    h, w = normalised.shape
    return {str(t): None if side is None else {'side_length': side, 'area_ratio': side * side / (h * w)}
            for t, side in high_contribution_sides(normalised, thresholds).items()}


def format_ratios(ratios: Dict[str, Optional[dict]]) -> str:
    """One line per threshold, as the original printed them ('thresh, rectangle side length, area ratio')."""
    lines = []
    for t, r in ratios.items():
        if r is None:
            lines.append(f'thresh {t}: no centred square reaches this share of the total contribution')
        else:
            lines.append(f'thresh, rectangle side length, area ratio: {t} {r["side_length"]} {r["area_ratio"]:.4f}')
    return '\n'.join(lines)


def write_output(path: str, flag: str, write: Callable[[str], None]) -> None:
    """``write(path)``; a folder that does not exist or cannot be written, or a format matplotlib does not know,
    becomes a ValueError naming ``flag`` and ``path`` (one ``error:`` line instead of a traceback). Shared by the ERF
    scripts."""
    try:
        write(path)
    except (OSError, ValueError) as e:
        cause = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise ValueError(f'{flag} {path}: cannot write it ({cause})') from None


def write_json(data, path: str, flag: str = '--json') -> None:
    """``data`` as indented JSON at ``path`` (see :func:`write_output`)."""
    def write(p: str) -> None:
        with open(p, 'w') as f:
            json.dump(data, f, indent=2)
    write_output(path, flag, write)


def centred_colormap(name: str) -> ListedColormap:
    """Upper half of a diverging colour map: what the original's seaborn ``heatmap(center=0)`` showed for [0, 1]."""
    return ListedColormap(plt.get_cmap(name)(np.linspace(0.5, 1, 256)), name=f'{name}_upper')


def draw_heatmap(ax: plt.Axes, data: np.ndarray, cmap, title: Optional[str] = None) -> None:
    """Heatmap without ticks and with a colour bar on the right (5 % width, pad 0.05), as the paper's figures."""
    image = ax.imshow(data, cmap=cmap, interpolation='nearest', vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=10)
    cax = make_axes_locatable(ax).append_axes('right', size='5%', pad=0.05)
    ax.figure.colorbar(image, cax=cax)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('High-contribution area ratios and heatmap of a contribution matrix')
    parser.add_argument('--source', default='temp.npy', type=str, help='matrix saved by visualize_erf.py')
    parser.add_argument('--heatmap_save', default='heatmap.png', type=str, help='PNG to write')
    parser.add_argument('--json', default=None, type=str, help='also write the ratios as JSON')
    parser.add_argument('--cmap', default='coolwarm', type=str,
                        help='matplotlib colour map; its upper half is used, as the original (coolwarm centred at 0)')
    return parser


def main(args: argparse.Namespace) -> None:
    if args.cmap not in plt.colormaps():
        raise ValueError(f'--cmap {args.cmap!r} is not a matplotlib colour map (e.g. coolwarm, pink, viridis)')
    matrix = load_matrix(args.source)
    print(f'max {matrix.max():.6g}, min {matrix.min():.6g}, shape {matrix.shape}')
    ratios = area_ratios(matrix)
    print(format_ratios(ratios))
    if args.json:
        write_json(ratios, args.json)
    fig, ax = plt.subplots(figsize=(6, 6))
    draw_heatmap(ax, normalise(matrix), centred_colormap(args.cmap))
    try:
        write_output(args.heatmap_save, '--heatmap_save', lambda p: fig.savefig(p, dpi=100, bbox_inches='tight'))
    finally:
        plt.close(fig)
    print(f'heatmap saved to {args.heatmap_save}')


def run_cli(main_fn, parser: argparse.ArgumentParser) -> int:
    """Parse the command line and run ``main_fn``; a ``ValueError`` (bad input) becomes one ``error:`` line and exit
    code 2 instead of a traceback. Shared by the three ERF scripts."""
    try:
        main_fn(parser.parse_args())
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(run_cli(main, get_args_parser()))
