"""Shared helpers for tests/test_segmentation.py and tests/test_detection.py (OpenMMLab stack, CPU, tiny models)."""
from __future__ import annotations

import importlib
import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

# A SLaK small enough for CPU tests (any config's SLaK-T/S/B becomes this): channels 12/24/48/96, one block per
# stage except 3 in stage 2.
TINY_BACKBONE = dict(dims=[96, 192, 384, 768], width_factor=0.125, kernel_size=[7, 7, 5, 5, 3], depths=[1, 1, 3, 1],
                     drop_path_rate=0.1)
TINY_CHANNELS = [12, 24, 48, 96]


def require(framework: str) -> None:
    """Skip the calling test module unless mmengine, mmcv and ``framework`` (mmseg or mmdet) import."""
    for name in ('mmengine', 'mmcv', framework):
        try:
            importlib.import_module(name)
        except ImportError as e:
            pytest.skip(f'{name} is not importable ({e}); install requirements-mm.txt to run these tests',
                        allow_module_level=True)


def config_path(*parts: str) -> str:
    return os.path.join(REPO_ROOT, *parts)
