"""SLaK as a timm model: the conventions timm's own test suite checks (tests/test_models.py of timm 1.0.31), written
here for our models: registered cfgs, forward/backward at the test size, features_only and forward_intermediates,
reset_classifier, pretrained files, TorchScript and FX, parameter groups. Small widths and depths keep it fast;
the exact ``SLaK_*`` depths are kept where the test is about the size."""
import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import timm
import timm.optim
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, resolve_data_config
from timm.layers import set_layer_config
from timm.models import FeatureInfo
from timm.models._features_fx import create_feature_extractor
from timm.models._manipulate import group_parameters

import SLaK
import sparse_core

NAMES = ['SLaK_tiny', 'SLaK_small', 'SLaK_base', 'SLaK_large']
SMALL = dict(width_factor=0.125, kernel_size=[7, 7, 5, 5, 3])  # 12/24/48/96 channels for SLaK_tiny
TINY = dict(SMALL, depths=[1, 1, 1, 1], Decom=True)
TEST_SIZE = 64  # timm's tests shrink the cfg's 224 px to 96-128; 64 still gives maps of 16, 8, 4 and 2
LAYOUTS = {'decom': dict(Decom=True), 'full': dict(Decom=False)}


def sparsify(model: torch.nn.Module, sparsity: float = 0.5) -> torch.nn.Module:
    """The project's own masks (sparse_core.Masking, ERK) applied to every 2-D/4-D weight, as in sparse training."""
    args = SimpleNamespace(sparse_init='ERK', sparsity=sparsity, update_frequency=None, fix=True, seed=0)
    sparse_core.Masking(torch.optim.SGD(model.parameters(), lr=0.1), args=args).add_module(model)
    return model


def randomise_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics and layer scales, so folding and eval-mode maths matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if isinstance(m, SLaK.Block):
                m.gamma.copy_(torch.randn(m.gamma.shape, generator=g) * 0.5)
    return model


# ---- registered cfgs ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('name', NAMES)
def test_default_cfg_fields_and_data_config(name):
    """What timm's tests and data pipeline read from the cfg, checked against the original's evaluation setup and
    against the model's own parameter names; structure on the meta device (no memory, every size)."""
    model = timm.create_model(name, device='meta', dtype=torch.float32)
    cfg = model.pretrained_cfg
    assert model.default_cfg is cfg and cfg['architecture'] == name
    assert cfg['input_size'] == (3, 224, 224) and cfg['pool_size'] == (7, 7) and cfg['num_classes'] == 1000
    assert cfg['crop_pct'] == 0.875 and cfg['interpolation'] == 'bicubic'
    assert cfg['mean'] == IMAGENET_DEFAULT_MEAN and cfg['std'] == IMAGENET_DEFAULT_STD
    keys = model.state_dict().keys()
    assert cfg['first_conv'] == 'downsample_layers.0.0' and 'downsample_layers.0.0.weight' in keys
    assert cfg['classifier'] == 'head' and 'head.weight' in keys
    assert all(t.device.type == 'meta' and t.dtype == torch.float32 for t in model.parameters())
    data = resolve_data_config(model=model)
    assert (data['input_size'], data['crop_pct'], data['interpolation']) == ((3, 224, 224), 0.875, 'bicubic')
    features = model.forward_features(torch.empty(1, 3, 224, 224, device='meta'))
    assert features.shape == (1, model.num_features, *cfg['pool_size'])
    assert model.in_chans == 3 and model.num_features == model.head_hidden_size == model.dims[-1]
    half = timm.create_model(name, device='meta', dtype=torch.bfloat16, **SMALL)
    assert {(t.device.type, t.dtype) for t in half.parameters()} == {('meta', torch.bfloat16)}


def test_unknown_argument_raises_and_original_arguments_pass():
    with pytest.raises(TypeError):
        timm.create_model('SLaK_tiny', not_a_model_arg=1, **TINY)
    m = timm.create_model('SLaK_tiny', in_22k=False, args=None, flag=None, gru=False, bn=False, **TINY)
    assert m.dims == [12, 24, 48, 96] and not hasattr(m.stages[0][0].large_kernel.LoRA1, 'bn')


# ---- forward / backward ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize('name', NAMES)
def test_forward_backward_every_size(name):
    """timm's test_model_backward at a small width: 42 classes, every parameter gets a gradient, no NaN; the
    size's own depths are kept."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=42, **SMALL).train()
    assert model.depths == timm.create_model(name, device='meta').depths
    x = torch.randn(2, model.pretrained_cfg['input_size'][0], TEST_SIZE, TEST_SIZE)
    out = model(x)
    out.mean().backward()
    assert out.shape == (2, 42) and not out.isnan().any()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


# ---- features_only, forward_intermediates ---------------------------------------------------------------------------
@pytest.mark.parametrize('layout', list(LAYOUTS))
@pytest.mark.parametrize('sparse', [False, True], ids=['dense', 'sparse'])
def test_features_only_maps_match_feature_info_and_the_classifier(tmp_path, layout, sparse):
    """create_model(features_only=True) from a checkpoint: 4 NCHW maps with feature_info's channels and strides, the
    same values as the classifier's forward_intermediates, and a sparse checkpoint's zeros kept."""
    torch.manual_seed(0)
    kwargs = dict(SMALL, depths=[1, 1, 2, 1], **LAYOUTS[layout])
    source = randomise_bn(timm.create_model('SLaK_tiny', **kwargs)).eval()
    if sparse:
        sparsify(source)
    path = str(tmp_path / 'checkpoint.pth')
    torch.save({'model': source.state_dict(), 'epoch': 3}, path)
    zeros = sum(int((p == 0).sum()) for n, p in source.named_parameters() if p.dim() in (2, 4) and n != 'head.weight')
    assert (zeros > 0) == sparse

    features = timm.create_model('SLaK_tiny', features_only=True, out_indices=(0, 1, 2, 3), pretrained=True,
                                 pretrained_cfg_overlay=dict(file=path), **kwargs).eval()
    assert features.feature_info.channels() == [12, 24, 48, 96]
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    assert features.feature_info.module_name() == ['stages.0', 'stages.1', 'stages.2', 'stages.3']
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        maps = features(x)
        expected = source.forward_intermediates(x, intermediates_only=True)
    assert len(maps) == 4
    for m, c, r, e in zip(maps, features.feature_info.channels(), features.feature_info.reduction(), expected):
        assert m.shape == (2, c, 64 // r, 96 // r)
        torch.testing.assert_close(m, e, rtol=0, atol=0)
    assert sum(int((p == 0).sum()) for p in features.parameters() if p.dim() in (2, 4)) == zeros


def test_features_only_subset_prunes_later_stages_and_scripts():
    torch.manual_seed(0)
    model = timm.create_model('SLaK_tiny', features_only=True, out_indices=(-3,), **TINY).eval()
    assert model.feature_info.channels() == [24] and len(model.model.stages) == 2
    assert not hasattr(model.model.head, 'weight') and isinstance(model.model.norm, torch.nn.Identity)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        (out,) = model(x)
        assert out.shape == (1, 24, 8, 8)
        torch.testing.assert_close(torch.jit.script(model)(x)[0], out)


def test_forward_intermediates_contract():
    torch.manual_seed(0)
    model = timm.create_model('SLaK_tiny', **TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    info = FeatureInfo(model.feature_info, len(model.feature_info))
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        assert [m.shape[1] for m in maps] == info.channels() and [64 // m.shape[-1] for m in maps] == info.reduction()
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
        assert all(torch.equal(a, b) for a, b in zip(model.forward_intermediates(x, norm=True)[1], maps))
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [m.shape[1] for m in last_two] == [48, 96] and torch.equal(last_two[0], maps[2])
        early, picked = model.forward_intermediates(x, indices=[-4, 1], stop_early=True)
        assert torch.equal(early, maps[1]) and torch.equal(picked[0], maps[0]) and len(picked) == 2
    with pytest.raises(ValueError, match='NCHW'):
        model.forward_intermediates(x, output_fmt='NHWC')
    model.set_grad_checkpointing(True)
    final_ckpt, _ = model.forward_intermediates(x)
    torch.testing.assert_close(final_ckpt, final, rtol=1e-5, atol=1e-6)


def test_prune_intermediate_layers_keeps_taps_and_uses_every_parameter():
    torch.manual_seed(0)
    model = timm.create_model('SLaK_tiny', **TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        taps = model.forward_intermediates(x, intermediates_only=True)
        kept = copy.deepcopy(model)
        kept.prune_intermediate_layers([3], prune_head=False)
        torch.testing.assert_close(kept(x), model(x), rtol=0, atol=0)
    pruned = copy.deepcopy(model)
    assert pruned.prune_intermediate_layers([1]) == [1]
    assert pruned.num_features == pruned.head_hidden_size == 24
    with torch.no_grad():
        torch.testing.assert_close(pruned.forward_features(x), taps[1], rtol=0, atol=0)
    pruned.train().forward_features(x).sum().backward()
    assert [n for n, p in pruned.named_parameters() if p.grad is None] == []


# ---- head: forward_head, reset_classifier, global_pool ---------------------------------------------------------------
def test_forward_head_and_reset_classifier_variants():
    torch.manual_seed(0)
    model = timm.create_model('SLaK_tiny', num_classes=5, **TINY).double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        fmap = model.forward_features(x)
        pooled = model.forward_head(fmap, pre_logits=True)
        torch.testing.assert_close(pooled, model.norm(fmap.mean((2, 3))))  # the original's forward_features
        torch.testing.assert_close(model.head(pooled), model(x))
        assert model.get_classifier() is model.head

        model.reset_classifier(0)
        torch.testing.assert_close(model(x), pooled)
        model.reset_classifier(7, 'max')
        torch.testing.assert_close(model.forward_head(fmap, pre_logits=True), model.norm(fmap.amax((2, 3))))
        model.reset_classifier(3)  # keeps 'max'
        assert model.head.weight.dtype == torch.float64 and model(x).shape == (2, 3)
        torch.testing.assert_close(model.forward_head(fmap, pre_logits=True), model.norm(fmap.amax((2, 3))))
        model.reset_classifier(0, '')
        per_pixel = F.layer_norm(fmap.permute(0, 2, 3, 1), (96,), model.norm.weight, model.norm.bias, 1e-6)
        torch.testing.assert_close(model(x), per_pixel.permute(0, 3, 1, 2))
        model.reset_classifier(4, '')  # a classifier on every pixel: (N, classes, H, W)
        assert model(x).shape == (2, 4, 2, 2)
    with pytest.raises(ValueError, match='global_pool must be one of'):
        model.reset_classifier(7, 'catavgmax')


def test_global_pool_and_num_classes_at_creation():
    torch.manual_seed(0)
    model = timm.create_model('SLaK_tiny', global_pool='avgmax', **TINY).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        fmap = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(fmap, pre_logits=True),
                                   model.norm(0.5 * (fmap.mean((2, 3)) + fmap.amax((2, 3)))))
        bare = timm.create_model('SLaK_tiny', num_classes=0, global_pool='', **TINY).eval()
        assert bare(x).shape == (1, 96, 2, 2) and 'head.weight' not in bare.state_dict()


# ---- pretrained files ------------------------------------------------------------------------------------------------
def test_pretrained_needs_a_file_and_loads_the_model_entry(tmp_path):
    with pytest.raises(ValueError, match=r"pretrained_cfg_overlay=dict\(file="):
        timm.create_model('SLaK_tiny', pretrained=True, **TINY)
    torch.manual_seed(0)
    source = randomise_bn(timm.create_model('SLaK_tiny', **TINY)).eval()
    ema = timm.create_model('SLaK_tiny', **TINY)
    path = str(tmp_path / 'checkpoint-best.pth')
    torch.save({'model': source.state_dict(), 'model_ema': ema.state_dict(), 'epoch': 'best'}, path)
    x = torch.randn(1, 3, 64, 64)
    loaded = timm.create_model('SLaK_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=path), **TINY).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x), rtol=0, atol=0)  # 'model', not the EMA
    other = timm.create_model('SLaK_tiny', pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(file=path),
                              **TINY)
    assert other.head.weight.shape == (10, 96) and torch.equal(other.norm.weight, source.norm.weight)
    via_dict = timm.create_model('SLaK_tiny', pretrained=True, **TINY,
                                 pretrained_cfg_overlay=dict(state_dict={'model': source.state_dict()}))
    assert all(torch.equal(a, b) for a, b in zip(via_dict.state_dict().values(), source.state_dict().values()))
    with pytest.raises(ValueError, match='missing keys'):
        timm.create_model('SLaK_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=path),
                          **dict(TINY, Decom=False))


# ---- TorchScript and FX ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize('layout', list(LAYOUTS))
def test_torchscript_equals_eager_in_train_eval_and_folded(layout):
    torch.manual_seed(0)
    with set_layer_config(scriptable=True):  # as timm's test builds models to script
        model = randomise_bn(timm.create_model('SLaK_tiny', drop_path_rate=0., **dict(TINY, **LAYOUTS[layout])))
    x = torch.randn(2, 3, 64, 64)
    for mode in ('train', 'eval'):
        getattr(model, mode)()
        scripted = torch.jit.script(model)
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-6)
    model.reparameterize(decomposed=True)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(model)(x), model(x), rtol=1e-5, atol=1e-6)


def test_scriptable_models_pick_plain_convs(monkeypatch):
    """Even where the Triton kernel would be taken ('auto' with CUDA), a model built to be scripted or exported gets
    nn.Conv2d: the Triton module's forward is not scriptable."""
    if SLaK._load_fast_dwconv() is None:
        pytest.skip('cutlass/ kernel not importable')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    assert SLaK._resolve_conv_impl('auto') == 'cutlass'
    for flag in ('scriptable', 'exportable'):
        with set_layer_config(**{flag: True}):
            assert SLaK._resolve_conv_impl('auto') == 'torch' and SLaK._resolve_conv_impl('cutlass') == 'cutlass'


@pytest.mark.parametrize('layout', list(LAYOUTS))
def test_fx_feature_extraction_equals_eager_in_train_and_eval(layout):
    """timm's FX feature extraction (blocks stay leaves: register_notrace_module): stage maps and logits equal the
    eager ones in both modes, and the traced training graph back-propagates to every parameter."""
    torch.manual_seed(0)
    model = randomise_bn(timm.create_model('SLaK_tiny', **dict(TINY, **LAYOUTS[layout])))
    x = torch.randn(2, 3, 64, 64)
    nodes = {'stages.1': 'stage1', 'stages.3': 'stage3', 'head': 'logits'}
    for mode in ('eval', 'train'):
        getattr(model, mode)()
        traced = create_feature_extractor(model, return_nodes=nodes)
        out = traced(x)
        maps = model.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
        torch.testing.assert_close(out['stage1'], maps[0], rtol=0, atol=0)
        torch.testing.assert_close(out['stage3'], maps[1], rtol=0, atol=0)
        torch.testing.assert_close(out['logits'], model(x), rtol=0, atol=0)
    out['logits'].mean().backward()
    assert [n for n, p in traced.named_parameters() if p.grad is None] == []
    graph = timm.create_model('SLaK_tiny', features_only=True, feature_cls='fx', **dict(TINY, **LAYOUTS[layout]))
    assert [tuple(f.shape[1:]) for f in graph.eval()(x)] == [(12, 16, 16), (24, 8, 8), (48, 4, 4), (96, 2, 2)]


# ---- parameter groups ------------------------------------------------------------------------------------------------
def test_group_matcher_orders_stem_stages_and_head_and_no_weight_decay():
    model = timm.create_model('SLaK_tiny', **TINY)
    order = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    last = max(order.values())
    assert order['downsample_layers.0.0.weight'] == 0
    assert order['downsample_layers.0.1.weight'] == 0
    assert 0 < order['stages.0.0.gamma'] < order['downsample_layers.1.1.weight'] <= order['stages.1.0.gamma']
    assert order['stages.3.0.pwconv2.weight'] < order['norm.weight'] == order['head.weight'] == last
    coarse = group_parameters(model, model.group_matcher(coarse=True))
    assert len(coarse) == 6  # stem, 4 stages, head
    assert model.no_weight_decay() == set()
    optimizer = timm.optim.create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    scale = {id(p): group['lr_scale'] for group in optimizer.param_groups for p in group['params']}
    params = dict(model.named_parameters())
    scales = [scale[id(params[n])] for n in ('downsample_layers.0.0.weight', 'stages.0.0.pwconv1.weight',
                                             'stages.3.0.pwconv1.weight', 'head.weight')]
    assert scales == sorted(set(scales)) and scales[-1] == 1.0
