"""Optimizer construction: weight-decay groups, ConvNeXt-style layer-wise lr decay, timm optimizers by name.

Same parameter groups and layer ids as the original ``optim_factory.py``. The optimizer itself comes from
timm's registry (``timm.optim.create_optimizer_v2``), so every name timm 1.0.31 knows works, with the original's
``lookahead_`` prefix. Names the original took from its vendored timm map to their current timm classes:
``nadam`` is ``torch.optim.NAdam`` (the old timm class is ``nadamlegacy``), ``radam`` is ``torch.optim.RAdam``
(``radamlegacy``); apex ``fused*`` names need apex installed. An unknown name raises ``ValueError`` (the original
asserted).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch
import timm.optim

SLAK_MODELS = ('SLaK_tiny', 'SLaK_small', 'SLaK_base', 'SLaK_large')


def get_num_layer_for_convnext(var_name: str, num_max_layer: int = 12) -> int:
    """Layer id of a parameter for layer-wise lr decay (the ConvNeXt/SLaK scheme).

    ``downsample_layers.0`` -> 0, ``.1`` -> 2, ``.2`` -> 3, ``.3`` -> ``num_max_layer``; ``stages.0`` -> 1,
    ``stages.1`` -> 2, ``stages.2.{b}`` -> 3 + b // 3, ``stages.3`` -> ``num_max_layer``; anything else (``norm``,
    ``head``) -> ``num_max_layer + 1``. The scheme was designed for 27-block stage 2 (SLaK_small/base): with 12 layers
    SLaK_tiny's 9 blocks use ids 3-5 and ids 6-11 stay empty, as in the original.

    ``var_name`` is a name of the un-wrapped model; callers strip ``module.`` (DDP) or ``backbone.`` (mmseg/mmdet)
    first. The segmentation/detection optimizer constructors call this with ``num_max_layer=num_layers``.
    """
    if var_name.startswith('downsample_layers'):
        stage_id = int(var_name.split('.')[1])
        if stage_id == 0:
            return 0
        if stage_id in (1, 2):
            return stage_id + 1
        return num_max_layer
    if var_name.startswith('stages'):
        stage_id = int(var_name.split('.')[1])
        block_id = int(var_name.split('.')[2])
        if stage_id in (0, 1):
            return stage_id + 1
        if stage_id == 2:
            return 3 + block_id // 3
        return num_max_layer
    return num_max_layer + 1


class LayerDecayValueAssigner:
    """Maps a parameter name to its layer id and a layer id to its lr scale ``values[id]``."""

    def __init__(self, values: Sequence[float]):
        self.values = list(values)

    def get_scale(self, layer_id: int) -> float:
        return self.values[layer_id]

    def get_layer_id(self, var_name: str) -> int:
        return get_num_layer_for_convnext(var_name, len(self.values) - 2)


def build_layer_decay_assigner(model_name: str, layer_decay: float,
                               num_layers: int = 12) -> Optional[LayerDecayValueAssigner]:
    """The original's assigner for ``--layer_decay`` (None when it is 1.0): scales ``layer_decay ** (L + 1 - id)``."""
    if layer_decay == 1.0:
        return None
    if model_name not in SLAK_MODELS:
        raise ValueError(f'--layer_decay is defined for the SLaK models {list(SLAK_MODELS)}; got --model '
                         f'{model_name!r}')
    return LayerDecayValueAssigner([layer_decay ** (num_layers + 1 - i) for i in range(num_layers + 2)])


def get_parameter_groups(model: torch.nn.Module, weight_decay: float = 1e-5, skip_list: Sequence[str] = (),
                         get_num_layer: Optional[Callable[[str], int]] = None,
                         get_layer_scale: Optional[Callable[[int], float]] = None,
                         group_names: Optional[Dict[str, Dict]] = None) -> List[Dict]:
    """Weight-decay (and layer) groups: 1-D tensors, ``*.bias`` and ``skip_list`` names get no weight decay.

    Group names are ``decay``/``no_decay`` or ``layer_{id}_{decay|no_decay}``; each group carries ``weight_decay``,
    ``params`` and ``lr_scale`` (used by the per-step lr update in ``engine.py``). ``group_names``, if given, is filled
    with the same groups holding parameter names (the JSON the original printed; main.py writes it to a file).
    """
    groups: Dict[str, Dict] = {}
    names: Dict[str, Dict] = {} if group_names is None else group_names
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim == 1 or name.endswith('.bias') or name in skip_list:
            group_name, this_weight_decay = 'no_decay', 0.
        else:
            group_name, this_weight_decay = 'decay', weight_decay
        scale = 1.0
        if get_num_layer is not None:
            layer_id = get_num_layer(name)
            group_name = f'layer_{layer_id}_{group_name}'
            if get_layer_scale is not None:
                scale = get_layer_scale(layer_id)
        if group_name not in groups:
            groups[group_name] = {'weight_decay': this_weight_decay, 'params': [], 'lr_scale': scale}
            names[group_name] = {'weight_decay': this_weight_decay, 'params': [], 'lr_scale': scale}
        groups[group_name]['params'].append(param)
        names[group_name]['params'].append(name)
    return list(groups.values())


def _check_optimizer_name(opt: str) -> None:
    tokens = opt.lower().split('_')
    known = set(timm.optim.list_optimizers())
    if tokens[-1] not in known or (len(tokens) > 1 and tokens[0] != 'lookahead') or len(tokens) > 2:
        raise ValueError(f'--opt {opt!r} is not a timm optimizer; use a name such as adamw, sgd, momentum, adam, '
                         f'lamb, lion, rmsproptf, nadam, radam, adamp, sgdp, optionally prefixed lookahead_ '
                         f'(all names: timm.optim.list_optimizers())')


def create_optimizer(args, model: torch.nn.Module, get_num_layer: Optional[Callable[[str], int]] = None,
                     get_layer_scale: Optional[Callable[[int], float]] = None, filter_bias_and_bn: bool = True,
                     skip_list: Optional[Sequence[str]] = None,
                     group_names: Optional[Dict[str, Dict]] = None) -> torch.optim.Optimizer:
    """The optimizer named by ``args.opt`` over the parameter groups of ``model``.

    Uses ``args.lr``, ``args.weight_decay``, ``args.opt_eps``, ``args.opt_betas``, ``args.momentum``. With
    ``filter_bias_and_bn`` (or layer decay) the per-group weight decay rules and the optimizer's own default is 0;
    unlike the original, layer decay also applies when ``--weight_decay 0``. ``group_names``: see
    :func:`get_parameter_groups`.
    """
    _check_optimizer_name(args.opt)
    weight_decay = args.weight_decay
    if filter_bias_and_bn or get_num_layer is not None:
        skip = set(skip_list) if skip_list is not None else set(getattr(model, 'no_weight_decay', lambda: ())())
        parameters = get_parameter_groups(model, weight_decay, skip, get_num_layer, get_layer_scale, group_names)
        weight_decay = 0.
    else:
        parameters = [{'params': [p for p in model.parameters() if p.requires_grad], 'lr_scale': 1.0,
                       'weight_decay': weight_decay}]
    kwargs = {'eps': args.opt_eps}
    if getattr(args, 'opt_betas', None):
        kwargs['betas'] = tuple(args.opt_betas)
    return timm.optim.create_optimizer_v2(parameters, opt=args.opt, lr=args.lr, weight_decay=weight_decay,
                                          momentum=args.momentum, **kwargs)
