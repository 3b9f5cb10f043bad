"""optim_factory.py: layer ids, lr scales, weight-decay groups, optimizers by name."""
from __future__ import annotations

import argparse

import pytest
import timm
import torch

import mnist_mini  # noqa: F401  (puts the repo root on sys.path)
import SLaK  # noqa: F401
import optim_factory
from optim_factory import get_num_layer_for_convnext


@pytest.mark.parametrize('name, expected', [
    ('downsample_layers.0.0.weight', 0), ('downsample_layers.0.1.bias', 0),
    ('downsample_layers.1.1.weight', 2), ('downsample_layers.2.0.weight', 3), ('downsample_layers.3.1.weight', 12),
    ('stages.0.2.pwconv1.weight', 1), ('stages.1.0.large_kernel.LoRA1.conv.weight', 2),
    ('stages.2.0.gamma', 3), ('stages.2.2.norm.weight', 3), ('stages.2.3.pwconv2.bias', 4),
    ('stages.2.8.large_kernel.small_conv.bn.weight', 5), ('stages.2.26.gamma', 11),
    ('stages.3.0.pwconv1.weight', 12), ('stages.3.2.gamma', 12), ('norm.weight', 13), ('head.bias', 13),
])
def test_layer_ids_follow_spec_table(name, expected):
    assert get_num_layer_for_convnext(name) == expected
    # the downstream constructors pass num_max_layer explicitly; the scheme shifts with it
    shifted = {12: 20, 13: 21}.get(expected, expected)
    assert get_num_layer_for_convnext(name, num_max_layer=20) == shifted


def test_layer_decay_assigner_values_and_model_check():
    a = optim_factory.build_layer_decay_assigner('SLaK_small', 0.5)
    assert a.values == pytest.approx([0.5 ** (13 - i) for i in range(14)])
    assert a.get_scale(a.get_layer_id('head.weight')) == 1.0
    assert a.get_scale(a.get_layer_id('stages.3.0.gamma')) == 0.5
    assert a.get_scale(a.get_layer_id('downsample_layers.0.0.weight')) == pytest.approx(0.5 ** 13)
    assert optim_factory.build_layer_decay_assigner('resnet50', 1.0) is None
    with pytest.raises(ValueError, match=r"SLaK models \['SLaK_tiny', 'SLaK_small', 'SLaK_base', 'SLaK_large'\]"):
        optim_factory.build_layer_decay_assigner('resnet50', 0.8)


def _tiny():
    return timm.create_model('SLaK_tiny', num_classes=10, width_factor=0.125, kernel_size=[7, 7, 5, 5, 3],
                             Decom=True)


def _args(**kw):
    base = dict(opt='adamw', lr=1e-3, weight_decay=0.05, opt_eps=1e-8, opt_betas=None, momentum=0.9)
    base.update(kw)
    return argparse.Namespace(**base)


def test_parameter_groups_split_decay_and_carry_layer_scale():
    model = _tiny()
    a = optim_factory.build_layer_decay_assigner('SLaK_tiny', 0.9)
    groups = optim_factory.get_parameter_groups(model, 0.05, (), a.get_layer_id, a.get_scale)
    by_param = {id(p): g for g in groups for p in g['params']}
    for name, p in model.named_parameters():
        g = by_param[id(p)]
        no_decay = p.ndim == 1 or name.endswith('.bias')
        assert g['weight_decay'] == (0.0 if no_decay else 0.05), name
        assert g['lr_scale'] == pytest.approx(0.9 ** (13 - get_num_layer_for_convnext(name))), name
    assert sum(len(g['params']) for g in groups) == len(list(model.parameters()))


@pytest.mark.parametrize('opt, cls, extra', [
    ('adamw', torch.optim.AdamW, {'eps': 1e-8}),
    ('sgd', torch.optim.SGD, {'nesterov': True, 'momentum': 0.9}),
    ('momentum', torch.optim.SGD, {'nesterov': False, 'momentum': 0.9}),
])
def test_create_optimizer_by_name(opt, cls, extra):
    model = _tiny()
    o = optim_factory.create_optimizer(_args(opt=opt), model)
    assert type(o) is cls
    assert all(o.defaults[k] == v for k, v in extra.items())
    assert o.defaults['weight_decay'] == 0 and {g['weight_decay'] for g in o.param_groups} == {0.0, 0.05}
    assert all(g['lr_scale'] == 1.0 and g['lr'] == 1e-3 for g in o.param_groups)


def test_create_optimizer_lookahead_betas_and_unknown_name():
    model = _tiny()
    o = optim_factory.create_optimizer(_args(opt='lookahead_adamw', opt_betas=[0.8, 0.95]), model)
    assert type(o).__name__ == 'Lookahead' and o.defaults['betas'] == (0.8, 0.95) and 'lookahead_k' in o.defaults
    for bad in ('adamz', 'foo_adamw', 'lookahead_sgd_x'):
        with pytest.raises(ValueError, match=r"--opt .* is not a timm optimizer; use a name such as adamw"):
            optim_factory.create_optimizer(_args(opt=bad), model)
