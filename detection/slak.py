"""Register the SLaK backbone and the layer-decay optimizer constructor in MMDetection 3.x.

Configs load this with ``custom_imports=dict(imports=['detection.slak'], allow_failed_imports=False)``; run
mmdet's ``tools/train.py`` / ``tools/test.py`` with this repository's root on ``PYTHONPATH``. Only mmdet (not mmseg)
is imported; the implementations live in ``segmentation/`` modules that need nothing but mmengine. With mmcv-lite,
``mmcv._ext`` is replaced by a small stand-in first (``segmentation/mmcv_ext_fallback.py``).
"""
try:
    from segmentation import mmcv_ext_fallback
    mmcv_ext_fallback.install()
    import mmdet.engine  # noqa: F401  registers mmdet's own constructors first, so ours can replace its namesake
    import mmdet.models  # noqa: F401
    from mmdet.registry import MODELS, OPTIM_WRAPPER_CONSTRUCTORS
except ImportError as e:
    raise ImportError(f'detection/ needs MMDetection 3.x ({e}): install requirements-mm.txt '
                      f'(pip install -r requirements-mm.txt)') from e

from segmentation.layer_decay_optimizer_constructor import LearningRateDecayOptimizerConstructor
from segmentation.slak_backbone import SLaK

import SLaK as slak_model

__all__ = ['SLaK', 'LearningRateDecayOptimizerConstructor']

slak_model.prefer_size_agnostic_kernels()  # detection's inputs change size every iteration (see detection/README.md)
MODELS.register_module(name='SLaK', module=SLaK, force=True)
OPTIM_WRAPPER_CONSTRUCTORS.register_module(name='LearningRateDecayOptimizerConstructor',
                                           module=LearningRateDecayOptimizerConstructor, force=True)
