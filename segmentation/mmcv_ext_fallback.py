"""A stand-in for ``mmcv._ext`` (mmcv's compiled ops) so that mmcv-lite can run UperNet and Cascade Mask R-CNN on CPU.

``mmcv-lite`` ships mmcv's Python code without the compiled extension, yet ``mmcv.ops`` (imported by
``mmseg.models`` and ``mmdet.models``) resolves every op at import time through
``mmcv.utils.ext_loader.load_ext('_ext', [names])``, which only asserts ``hasattr(ext, name)``. Installing a module
named ``mmcv._ext`` whose attributes resolve lazily therefore makes the frameworks importable; the ops our models
actually run are backed by torchvision:

* ``nms(boxes, scores, iou_threshold=..., offset=...)`` -> ``torchvision.ops.nms`` (``offset=1`` is the legacy
  "+1 pixel" box convention, emulated by widening the boxes);
* ``roi_align_forward(input, rois, output, argmax_y, argmax_x, aligned_height=..., aligned_width=...,
  spatial_scale=..., sampling_ratio=..., pool_mode=..., aligned=...)`` (average mode) -> ``torchvision.ops.roi_align``,
  written into ``output`` in place as the compiled op does. Its backward is not provided: our detection configs set
  ``use_torchvision=True`` on every ``RoIAlign``, which calls torchvision directly (differentiable) and never reaches
  ``mmcv._ext``.

Every other op name resolves to a function raising ``NotImplementedError`` that names the op. The stand-in is only
installed when importing the real ``mmcv._ext`` fails, so a full mmcv build is never shadowed.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import sys
import types

import torch

__all__ = ['install', 'is_fallback_active']

_MODULE_NAME = 'mmcv._ext'
_INSTALL_HINT = 'install requirements-mm.txt (pip install -r requirements-mm.txt)'


def _nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, offset: int = 0) -> torch.Tensor:
    from torchvision.ops import nms
    if offset:
        boxes = torch.cat([boxes[:, :2], boxes[:, 2:4] + offset], dim=1)
    return nms(boxes, scores, float(iou_threshold))


def _roi_align_forward(input: torch.Tensor, rois: torch.Tensor, output: torch.Tensor, argmax_y: torch.Tensor,
                       argmax_x: torch.Tensor, aligned_height: int, aligned_width: int, spatial_scale: float,
                       sampling_ratio: int, pool_mode: int, aligned: bool) -> None:
    if pool_mode != 1:
        raise NotImplementedError('mmcv._ext.roi_align_forward with pool_mode="max" is not available in mmcv-lite; '
                                  'use pool_mode="avg" or install full mmcv (mmcv==2.1.0)')
    from torchvision.ops import roi_align
    output.copy_(roi_align(input, rois, (aligned_height, aligned_width), spatial_scale, sampling_ratio, aligned))


def _missing_op(name: str):
    def op(*args, **kwargs):
        raise NotImplementedError(
            f'mmcv op {name!r} needs the compiled mmcv extension, which mmcv-lite does not have; install full mmcv '
            f'(mmcv==2.1.0, built for your torch) to use it. segmentation/mmcv_ext_fallback.py only provides nms and '
            f'roi_align_forward (set use_torchvision=True on RoIAlign).')
    op.__name__ = name
    return op


def _module_getattr(name: str):
    if name.startswith('__'):
        raise AttributeError(name)
    return _missing_op(name)


def is_fallback_active() -> bool:
    """Whether ``mmcv._ext`` is this module's stand-in (True) or a real build / not loaded (False)."""
    return getattr(sys.modules.get(_MODULE_NAME), '__slak_fallback__', False)


def install() -> bool:
    """Install the stand-in if (and only if) the real ``mmcv._ext`` cannot be imported. Returns True if installed.

    Raises:
        ImportError: mmcv (or mmcv-lite) itself is not installed.
    """
    try:
        importlib.import_module('mmcv')
    except ImportError as e:
        raise ImportError(f'mmcv is not installed: {_INSTALL_HINT}') from e
    if _MODULE_NAME in sys.modules:
        return is_fallback_active()
    try:
        importlib.import_module(_MODULE_NAME)
        return False
    except ImportError:
        pass
    module = types.ModuleType(_MODULE_NAME, 'Stand-in for mmcv._ext (see segmentation/mmcv_ext_fallback.py).')
    module.__spec__ = importlib.machinery.ModuleSpec(_MODULE_NAME, None)
    module.__slak_fallback__ = True
    module.nms = _nms
    module.roi_align_forward = _roi_align_forward
    module.__getattr__ = _module_getattr
    sys.modules[_MODULE_NAME] = module
    import mmcv
    mmcv._ext = module
    return True


def main(argv: list) -> None:
    """Run a framework tool script after installing the stand-in: ``python -m segmentation.mmcv_ext_fallback
    /path/to/mmdetection/tools/train.py CONFIG [args]``. Needed with mmcv-lite because mmdet's tools import
    ``mmdet.utils`` (which imports ``mmcv.ops``) before the config's ``custom_imports`` can install the stand-in.
    """
    import runpy
    if not argv:
        raise SystemExit('usage: python -m segmentation.mmcv_ext_fallback TOOL_SCRIPT.py [tool arguments]')
    install()
    sys.argv = list(argv)
    runpy.run_path(argv[0], run_name='__main__')


if __name__ == '__main__':
    main(sys.argv[1:])
