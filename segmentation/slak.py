"""Register the SLaK backbone and the layer-decay optimizer constructor in MMSegmentation 1.x.

Configs load this with ``custom_imports=dict(imports=['segmentation.slak'], allow_failed_imports=False)``; run
mmseg's ``tools/train.py`` / ``tools/test.py`` with this repository's root on ``PYTHONPATH``. Only mmseg (not mmdet)
is imported. With mmcv-lite, ``mmcv._ext`` is replaced by a small stand-in first (``mmcv_ext_fallback``).
"""
try:
    from segmentation import mmcv_ext_fallback
    mmcv_ext_fallback.install()
    import mmseg.engine  # noqa: F401  registers mmseg's own constructors first, so ours can replace its namesake
    import mmseg.models  # noqa: F401
    from mmseg.registry import MODELS, OPTIM_WRAPPER_CONSTRUCTORS
except ImportError as e:
    raise ImportError(f'segmentation/ needs MMSegmentation 1.x ({e}): install requirements-mm.txt '
                      f'(pip install -r requirements-mm.txt)') from e

from segmentation.layer_decay_optimizer_constructor import LearningRateDecayOptimizerConstructor
from segmentation.slak_backbone import SLaK

__all__ = ['SLaK', 'LearningRateDecayOptimizerConstructor']

MODELS.register_module(name='SLaK', module=SLaK, force=True)
OPTIM_WRAPPER_CONSTRUCTORS.register_module(name='LearningRateDecayOptimizerConstructor',
                                           module=LearningRateDecayOptimizerConstructor, force=True)
