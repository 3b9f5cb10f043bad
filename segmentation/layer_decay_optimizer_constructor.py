"""Layer-wise / stage-wise learning-rate decay for SLaK backbones, as an MMEngine optimizer-wrapper constructor.

A port of the original ``core/optimizers/layer_decay_optimizer_constructor.py`` to MMEngine's
``DefaultOptimWrapperConstructor`` API. It needs only mmengine: ``segmentation/slak.py`` and ``detection/slak.py``
register this one class into ``mmseg.registry.OPTIM_WRAPPER_CONSTRUCTORS`` /
``mmdet.registry.OPTIM_WRAPPER_CONSTRUCTORS`` under the original name ``LearningRateDecayOptimizerConstructor``,
replacing the frameworks' ConvNeXt-only class of that name (same layer-id rules for ConvNeXt-layout parameter
names, plus SLaK).

Config::

    optim_wrapper = dict(constructor='LearningRateDecayOptimizerConstructor',
                         optimizer=dict(type='AdamW', lr=1e-4, weight_decay=0.05),
                         paramwise_cfg=dict(num_layers=6, decay_rate=0.9, decay_type='stage_wise'))

With ``L = num_layers + 2`` layer ids, parameter group ``layer_{id}_{decay|no_decay}`` gets
``lr = base_lr * decay_rate ** (L - id - 1)``; 1-D parameters and biases get weight decay 0.

* ``layer_wise``: backbone parameters take ``optim_factory.get_num_layer_for_convnext(name, num_max_layer=num_layers)``
  (the classification scheme); everything else (necks, heads, the backbone's ``norm{i}``) ``num_layers + 1``.
* ``stage_wise``: ``backbone.downsample_layers.*`` -> 0, ``backbone.stages.{s}`` -> ``s + 1``, anything else
  ``L - 1`` (scale 1).
"""
from __future__ import annotations

import json
from typing import List

import torch.nn as nn
from mmengine.dist import get_rank
from mmengine.logging import print_log
from mmengine.optim import DefaultOptimWrapperConstructor

from optim_factory import get_num_layer_for_convnext

__all__ = ['LearningRateDecayOptimizerConstructor', 'get_layer_id', 'DECAY_TYPES']

DECAY_TYPES = ('layer_wise', 'stage_wise')
_NO_DECAY_NAMES = ('pos_embed', 'cls_token')


def get_layer_id(name: str, num_layers: int, decay_type: str) -> int:
    """Layer id of parameter ``name`` of a whole segmentor/detector (backbone names start with ``backbone.``)."""
    if decay_type == 'layer_wise':
        if name.startswith('backbone.'):
            return get_num_layer_for_convnext(name[len('backbone.'):], num_max_layer=num_layers)
        return num_layers + 1
    if decay_type == 'stage_wise':
        if name.startswith('backbone.downsample_layers'):
            return 0
        if name.startswith('backbone.stages'):
            return int(name.split('.')[2]) + 1
        return num_layers + 1
    raise ValueError(f'paramwise_cfg decay_type must be one of {DECAY_TYPES}; got {decay_type!r}')


class LearningRateDecayOptimizerConstructor(DefaultOptimWrapperConstructor):
    """Parameter groups with per-layer (or per-stage) lr scales; see the module docstring for the rules."""

    def add_params(self, params: List[dict], module: nn.Module, **kwargs) -> None:
        for key in ('num_layers', 'decay_rate'):
            if key not in self.paramwise_cfg:
                raise ValueError(f'paramwise_cfg.{key} is required by LearningRateDecayOptimizerConstructor; '
                                 f'got paramwise_cfg={dict(self.paramwise_cfg)}')
        num_layers = int(self.paramwise_cfg['num_layers'])
        decay_rate = float(self.paramwise_cfg['decay_rate'])
        decay_type = self.paramwise_cfg.get('decay_type', 'layer_wise')
        if decay_type not in DECAY_TYPES:
            raise ValueError(f'paramwise_cfg decay_type must be one of {DECAY_TYPES}; got {decay_type!r}')
        backbone = getattr(module, 'backbone', None)
        if decay_type == 'layer_wise' and not any(n in type(backbone).__name__ for n in ('SLaK', 'ConvNeXt')):
            raise ValueError(f'decay_type="layer_wise" needs a SLaK (or ConvNeXt-layout) backbone; got '
                             f'{type(backbone).__name__}; use decay_type="stage_wise" or the default constructor')
        total_layers = num_layers + 2
        groups = {}
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            if param.ndim == 1 or name.endswith('.bias') or name in _NO_DECAY_NAMES:
                group_kind, weight_decay = 'no_decay', 0.
            else:
                group_kind, weight_decay = 'decay', self.base_wd
            layer_id = get_layer_id(name, num_layers, decay_type)
            group_name = f'layer_{layer_id}_{group_kind}'
            if group_name not in groups:
                scale = decay_rate ** (total_layers - layer_id - 1)
                groups[group_name] = dict(weight_decay=weight_decay, params=[], param_names=[], lr_scale=scale,
                                          group_name=group_name, lr=scale * self.base_lr)
            groups[group_name]['params'].append(param)
            groups[group_name]['param_names'].append(name)
        if get_rank() == 0:
            summary = {k: {key: v[key] for key in ('param_names', 'lr_scale', 'lr', 'weight_decay')}
                       for k, v in groups.items()}
            print_log(f'Param groups = {json.dumps(summary, indent=2)}', logger='current')
        params.extend(groups.values())
