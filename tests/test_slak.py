"""Tests for SLaK.py: keys, shapes and counts against the original's, maths against an independent float64 reference,
inference folding, the conv seam, modern execution paths and bad-input errors."""
import gc
import math
import os
import signal
import subprocess
import sys
import time
import warnings
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import SLaK  # noqa: E402  (registers the models)
import timm  # noqa: E402

REGISTRY = {  # name -> (depths, base dims), the original's registry
    'SLaK_tiny': ([3, 3, 9, 3], [96, 192, 384, 768]),
    'SLaK_small': ([3, 3, 27, 3], [96, 192, 384, 768]),
    'SLaK_base': ([3, 3, 27, 3], [128, 256, 512, 1024]),
    'SLaK_large': ([3, 3, 27, 3], [192, 384, 768, 1536]),
}
TINY = dict(width_factor=0.125, kernel_size=[7, 7, 5, 5, 3], Decom=True)


def meta_model(name, **kwargs):
    """Structure-only model (no memory, no init cost): for keys, shapes and counts of the big variants."""
    with torch.device('meta'):
        return timm.create_model(name, **kwargs)


def expected_state_dict_shapes(depths, dims, kernel_size, width_factor=1.0, Decom=False, bn=True, num_classes=1000,
                               in_chans=3):
    """Keys and shapes in order, written out from the original's module tree independently of SLaK.py."""
    C = [int(d * width_factor) for d in dims]
    out = [('downsample_layers.0.0.weight', (C[0], in_chans, 4, 4)), ('downsample_layers.0.0.bias', (C[0],)),
           ('downsample_layers.0.1.weight', (C[0],)), ('downsample_layers.0.1.bias', (C[0],))]
    for i in range(1, 4):
        out += [(f'downsample_layers.{i}.0.weight', (C[i - 1],)), (f'downsample_layers.{i}.0.bias', (C[i - 1],)),
                (f'downsample_layers.{i}.1.weight', (C[i], C[i - 1], 2, 2)), (f'downsample_layers.{i}.1.bias', (C[i],))]

    def conv_bn(prefix, c, kh, kw):
        rows = [(f'{prefix}.conv.weight', (c, 1, kh, kw))]
        if bn:
            rows += [(f'{prefix}.bn.weight', (c,)), (f'{prefix}.bn.bias', (c,)), (f'{prefix}.bn.running_mean', (c,)),
                     (f'{prefix}.bn.running_var', (c,)), (f'{prefix}.bn.num_batches_tracked', ())]
        return rows

    k = kernel_size[-1]
    for s in range(4):
        K, c = kernel_size[s], C[s]
        for b in range(depths[s]):
            p = f'stages.{s}.{b}'
            rows = [(f'{p}.gamma', (c,))]
            if Decom:
                rows += conv_bn(f'{p}.large_kernel.LoRA1', c, K, k) + conv_bn(f'{p}.large_kernel.LoRA2', c, k, K)
            else:
                rows += conv_bn(f'{p}.large_kernel.lkb_origin', c, K, K)
            if k < K:
                rows += conv_bn(f'{p}.large_kernel.small_conv', c, k, k)
            rows += [(f'{p}.norm.weight', (c,)), (f'{p}.norm.bias', (c,)), (f'{p}.pwconv1.weight', (4 * c, c)),
                     (f'{p}.pwconv1.bias', (4 * c,)), (f'{p}.pwconv2.weight', (c, 4 * c)), (f'{p}.pwconv2.bias', (c,))]
            out += rows
    out += [('norm.weight', (C[3],)), ('norm.bias', (C[3],)), ('head.weight', (num_classes, C[3])),
            ('head.bias', (num_classes,))]
    return out


LAYOUTS = [
    dict(kernel_size=[51, 49, 47, 13, 5], width_factor=1.3, Decom=True, bn=True),
    dict(kernel_size=[31, 29, 27, 13, 5], width_factor=1.3, Decom=False, bn=True),
    dict(kernel_size=[51, 49, 47, 13, 5], width_factor=1.3, Decom=True, bn=False),
    dict(kernel_size=[7, 7, 7, 7, 100], width_factor=1.0, Decom=False, bn=True),
    dict(kernel_size=[61, 59, 57, 13, 5], width_factor=0.77, Decom=True, bn=True),
]


@pytest.mark.parametrize('name', list(REGISTRY))
@pytest.mark.parametrize('layout', LAYOUTS, ids=lambda d: f"{d['kernel_size'][0]}-wf{d['width_factor']}-"
                                                          f"D{int(d['Decom'])}-bn{int(d['bn'])}")
def test_state_dict_keys_order_shapes(name, layout):
    model = meta_model(name, **layout)
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    depths, dims = REGISTRY[name]
    assert got == expected_state_dict_shapes(depths, dims, **layout)


@pytest.mark.parametrize('name,kwargs,count', [
    ('SLaK_tiny', dict(kernel_size=[51, 49, 47, 13, 5], width_factor=1.3, Decom=True), 50_703_838),
    ('SLaK_small', dict(kernel_size=[51, 49, 47, 13, 5], width_factor=1.3, Decom=True), 91_131_820),
    ('SLaK_base', dict(kernel_size=[51, 49, 47, 13, 5], width_factor=1.3, Decom=True), 157_950_792),
    ('SLaK_tiny', dict(kernel_size=[7, 7, 7, 7, 100]), 28_595_752),
])
def test_exact_parameter_counts(name, kwargs, count):
    model = meta_model(name, **kwargs)
    assert sum(p.numel() for p in model.parameters()) == count


def test_width_truncation_rule():
    assert meta_model('SLaK_tiny', width_factor=1.3, kernel_size=[7, 7, 7, 7, 3]).dims == [124, 249, 499, 998]
    assert meta_model('SLaK_base', width_factor=1.3, kernel_size=[7, 7, 7, 7, 3]).dims == [166, 332, 665, 1331]
    assert meta_model('SLaK_large', width_factor=1.3, kernel_size=[7, 7, 7, 7, 3]).dims == [249, 499, 998, 1996]


def test_timm_create_model_passes_pretrained_cfg():
    """timm 1.0 passes pretrained_cfg / pretrained_cfg_overlay into entry points (the original crashed)."""
    m = timm.create_model('SLaK_tiny', pretrained=False, pretrained_cfg_overlay=dict(num_classes=10), num_classes=10,
                          **TINY)
    assert m.head.out_features == 10
    with pytest.raises(ValueError, match='no downloadable weights'):
        timm.create_model('SLaK_tiny', pretrained=True, **TINY)


# ---- maths against an independent float64 reference ----------------------------------------------------------------
def ref_dwconv(x, w):
    """Depthwise 'same' cross-correlation with explicit per-axis zero padding, then an unpadded F.conv2d."""
    kh, kw = w.shape[-2:]
    xp = F.pad(x, [kw // 2, kw // 2, kh // 2, kh // 2])
    return F.conv2d(xp, w, groups=x.shape[1])


def ref_bn(x, bn):
    g, b = bn.weight.view(1, -1, 1, 1), bn.bias.view(1, -1, 1, 1)
    m, v = bn.running_mean.view(1, -1, 1, 1), bn.running_var.view(1, -1, 1, 1)
    return (x - m) / torch.sqrt(v + bn.eps) * g + b


def ref_ln_channels_first(x, ln, eps=1e-6):
    u = x.mean(1, keepdim=True)
    var = ((x - u) ** 2).mean(1, keepdim=True)
    return (x - u) / torch.sqrt(var + eps) * ln.weight.view(1, -1, 1, 1) + ln.bias.view(1, -1, 1, 1)


def ref_block(x, blk):
    lk = blk.large_kernel
    y = 0
    for name in ('LoRA1', 'LoRA2', 'lkb_origin', 'small_conv'):
        if hasattr(lk, name):
            br = getattr(lk, name)
            z = ref_dwconv(x, br.conv.weight)
            y = y + (ref_bn(z, br.bn) if hasattr(br, 'bn') else z)
    t = y.permute(0, 2, 3, 1)
    u = t.mean(-1, keepdim=True)
    t = (t - u) / torch.sqrt(((t - u) ** 2).mean(-1, keepdim=True) + 1e-6) * blk.norm.weight + blk.norm.bias
    t = t @ blk.pwconv1.weight.T + blk.pwconv1.bias
    t = 0.5 * t * (1 + torch.erf(t / math.sqrt(2)))
    t = t @ blk.pwconv2.weight.T + blk.pwconv2.bias
    t = t * blk.gamma
    return x + t.permute(0, 3, 1, 2)


def ref_model(x, m):
    for i in range(4):
        ds = m.downsample_layers[i]
        if i == 0:
            x = F.conv2d(x, ds[0].weight, ds[0].bias, stride=4)
            x = ref_ln_channels_first(x, ds[1])
        else:
            x = ref_ln_channels_first(x, ds[0])
            x = F.conv2d(x, ds[1].weight, ds[1].bias, stride=2)
        for blk in m.stages[i]:
            x = ref_block(x, blk)
    v = x.mean((2, 3))
    u = v.mean(-1, keepdim=True)
    v = (v - u) / torch.sqrt(((v - u) ** 2).mean(-1, keepdim=True) + 1e-6) * m.norm.weight + m.norm.bias
    return v @ m.head.weight.T + m.head.bias


def randomise_bn_and_gamma(model, seed=0):
    """Non-trivial BN statistics and layer scale so every term of the maths matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                n = mod.num_features
                mod.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                mod.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                mod.weight.copy_(torch.rand(n, generator=g) + 0.5)
                mod.bias.copy_(torch.randn(n, generator=g) * 0.1)
            if isinstance(mod, SLaK.Block):
                mod.gamma.copy_(torch.randn(mod.gamma.shape, generator=g) * 0.5)
            if isinstance(mod, (SLaK.LayerNorm, nn.LayerNorm)):
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) + 0.5)
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
    return model


TINY_LAYOUTS = [
    dict(kernel_size=[9, 7, 5, 5, 3], Decom=True, bn=True),
    dict(kernel_size=[9, 7, 5, 5, 3], Decom=False, bn=True),
    dict(kernel_size=[9, 7, 5, 5, 3], Decom=True, bn=False),
    dict(kernel_size=[7, 7, 7, 7, 100], Decom=False, bn=True),
]
LAYOUT_IDS = ['decom', 'full', 'decom-nobn', 'convnext']


@pytest.mark.parametrize('layout', TINY_LAYOUTS, ids=LAYOUT_IDS)
def test_forward_matches_float64_reference(layout):
    torch.manual_seed(0)
    model = timm.create_model('SLaK_tiny', width_factor=0.125, num_classes=7, depths=[1, 1, 2, 1],
                              **layout).double().eval()
    randomise_bn_and_gamma(model)
    x = torch.randn(2, 3, 37, 45, dtype=torch.float64)  # odd, non-square: per-axis padding must hold
    torch.testing.assert_close(model(x), ref_model(x, model), rtol=1e-10, atol=1e-10)


def test_rectangular_branch_padding_is_per_axis():
    """A (K, k) kernel gets (K//2, k//2) padding: output size = input size (original issue #15)."""
    blk = SLaK.ReparamLargeKernelConv(4, 4, 11, 1, 4, 3, Decom=True, bn=False)
    x = torch.randn(1, 4, 13, 17)
    assert blk(x).shape == x.shape
    assert blk.LoRA1.conv.weight.shape == (4, 1, 11, 3) and blk.LoRA2.conv.weight.shape == (4, 1, 3, 11)
    assert blk.LoRA1.conv.padding == (5, 1) and blk.LoRA2.conv.padding == (1, 5)


def test_init_and_drop_path_schedule():
    torch.manual_seed(0)
    m = timm.create_model('SLaK_tiny', kernel_size=[7, 7, 7, 7, 100], drop_path_rate=0.3, head_init_scale=0.5,
                          layer_scale_init_value=1e-6, width_factor=0.5)
    stem = m.downsample_layers[0][0]
    assert stem.bias.abs().max() == 0
    big = m.stages[2][0].pwconv1.weight
    assert abs(big.std().item() - 0.02) < 0.002 and big.abs().max() < 0.04 * 3  # trunc_normal(0.02), |w| <= 2 abs
    assert abs(m.head.weight.std().item() - 0.01) < 0.002  # 0.02 * head_init_scale
    assert torch.all(m.stages[1][1].gamma == 1e-6)
    rates = [0.0 if isinstance(b.drop_path, nn.Identity) else b.drop_path.drop_prob for s in m.stages for b in s]
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.3, 18))


def test_layer_norm_rejects_unknown_format():
    with pytest.raises(NotImplementedError):
        SLaK.LayerNorm(4, data_format='nhwc')


@pytest.mark.parametrize('fused', [True, False])
@pytest.mark.parametrize('channels_last', [False, True])
def test_channels_first_layer_norm_is_the_originals_maths_in_its_dtype_and_layout(channels_last, fused, monkeypatch):
    """channels_first LayerNorm (the stem's and the downsampling layers'): now ``F.layer_norm`` on a channels-last
    view, it matches the original's spelled-out formula (float64 reference: mean, biased variance, eps inside the
    root) forward and backward, for NCHW and channels_last inputs, returns the input's memory format, and under
    autocast gives the float32 result that the original's ``weight * x`` promotion gave a half-precision input.
    ``FUSED_CHANNELS_FIRST = False`` (benchmarks' A/B) runs the original's ops: the same checks hold, except that
    under autocast it normalises a half-precision input in half precision."""
    monkeypatch.setattr(SLaK.LayerNorm, 'FUSED_CHANNELS_FIRST', fused)
    g = torch.Generator().manual_seed(0)
    ln = SLaK.LayerNorm(24, eps=1e-6, data_format='channels_first')
    with torch.no_grad():
        ln.weight.copy_(torch.rand(24, generator=g) + 0.5)
        ln.bias.copy_(torch.randn(24, generator=g))
    x = torch.randn(3, 24, 7, 5, generator=g) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    y = ln(x)
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    dy = torch.randn(y.shape, generator=g)
    dx, dw, db = torch.autograd.grad(y, (x, ln.weight, ln.bias), dy)
    x64 = x.detach().double().requires_grad_(True)
    w64, b64 = ln.weight.detach().double().requires_grad_(True), ln.bias.detach().double().requires_grad_(True)
    u = x64.mean(1, keepdim=True)
    ref = (x64 - u) / torch.sqrt(((x64 - u) ** 2).mean(1, keepdim=True) + 1e-6) * w64.view(1, -1, 1, 1) \
        + b64.view(1, -1, 1, 1)
    rdx, rdw, rdb = torch.autograd.grad(ref, (x64, w64, b64), dy.double())
    for ours, theirs in ((y, ref), (dx, rdx), (dw, rdw), (db, rdb)):
        torch.testing.assert_close(ours.double(), theirs, rtol=1e-5, atol=1e-5)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        half = ln(x.detach().to(torch.bfloat16))
    assert half.dtype == torch.float32
    exact = ln(x.detach().to(torch.bfloat16).float()).double()
    if fused:  # float32 maths on the half-precision input
        torch.testing.assert_close(half.double(), exact)
    else:  # the original normalised a half-precision input in half precision
        assert ((half.double() - exact).norm() / exact.norm()).item() < 2e-2


# ---- folding ----------------------------------------------------------------------------------------------------
def trained_like(layout, seed=0):
    torch.manual_seed(seed)
    m = timm.create_model('SLaK_tiny', width_factor=0.125, num_classes=5, depths=[1, 1, 1, 1], **layout).double()
    return randomise_bn_and_gamma(m, seed).eval()


@pytest.mark.parametrize('layout', TINY_LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize('decomposed', [False, True])
def test_folding_equals_unfolded(layout, decomposed):
    m = trained_like(layout)
    x = torch.randn(2, 3, 40, 40, dtype=torch.float64)
    before = m(x)
    m.reparameterize(decomposed=decomposed)
    lk = m.stages[0][0].large_kernel
    use_decomposed = decomposed and layout['Decom']
    assert hasattr(lk, 'lkb_decomposed') == use_decomposed and hasattr(lk, 'lkb_reparam') != use_decomposed
    assert not any(hasattr(lk, n) for n in ('LoRA1', 'LoRA2', 'lkb_origin', 'small_conv'))
    torch.testing.assert_close(m(x), before, rtol=1e-11, atol=1e-11)


def test_folding_when_decomposed_small_side_exceeds_stage_kernel():
    """Decom with k > K (e.g. stage kernel 3, small kernel 5): branches are 3x5 and 5x3, folded into 5x5."""
    m = trained_like(dict(kernel_size=[9, 7, 5, 3, 5], Decom=True, bn=True))
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    before = m(x)
    m.reparameterize()
    assert m.stages[3][0].large_kernel.lkb_reparam.weight.shape[-2:] == (5, 5)
    torch.testing.assert_close(m(x), before, rtol=1e-11, atol=1e-11)


def test_merge_kernel_keys_are_original_lkb_reparam():
    m = trained_like(TINY_LAYOUTS[0])
    m.stages[0][0].large_kernel.merge_kernel()
    keys = [k for k in m.state_dict() if k.startswith('stages.0.0.large_kernel')]
    assert keys == ['stages.0.0.large_kernel.lkb_reparam.weight', 'stages.0.0.large_kernel.lkb_reparam.bias']
    assert m.state_dict()['stages.0.0.large_kernel.lkb_reparam.weight'].shape == (12, 1, 9, 9)


def test_timm_reparameterize_model_folds_whole_model():
    from timm.utils import reparameterize_model
    m = trained_like(TINY_LAYOUTS[0])
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    folded = reparameterize_model(m)
    assert all(hasattr(lk, 'lkb_reparam') for lk in folded.modules() if isinstance(lk, SLaK.ReparamLargeKernelConv))
    torch.testing.assert_close(folded(x), m(x), rtol=1e-11, atol=1e-11)


# ---- training-time behaviour ----------------------------------------------------------------------------------------
def test_gradient_reaches_every_parameter():
    torch.manual_seed(0)
    m = timm.create_model('SLaK_tiny', num_classes=4, depths=[1, 1, 1, 1], layer_scale_init_value=0.5, **TINY)
    m(torch.randn(2, 3, 32, 32)).square().sum().backward()
    dead = [n for n, p in m.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert dead == []


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    m = timm.create_model('SLaK_tiny', num_classes=4, depths=[1, 1, 2, 1], layer_scale_init_value=0.5, **TINY).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    m(x).sum().backward()
    ref = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    m.set_grad_checkpointing(True)
    m(x).sum().backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-10, atol=1e-12)


def test_channels_last_and_bf16_autocast_match_default():
    torch.manual_seed(0)
    m = timm.create_model('SLaK_tiny', num_classes=4, depths=[1, 1, 1, 1], layer_scale_init_value=0.5, **TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    ref = m(x)
    cl = m.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-5)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        low = m(x)
    assert low.dtype == torch.bfloat16
    rel = (low.float() - ref).norm() / ref.norm()
    assert rel < 3e-2


@pytest.mark.parametrize('Decom', [True, False])
def test_branches_share_one_autocast_cast_and_sum_input_grads_in_fp32(Decom):
    """Under autocast the block's parallel branches get one half-precision copy of the fp32 input (one cast forward,
    one back), where each conv used to cast on its own; outputs are bitwise those of per-conv casts and the input
    gradient is the fp32 sum of the branches' gradients, as before."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountCasts(TorchDispatchMode):
        def __init__(self, shape):
            super().__init__()
            self.shape, self.n = shape, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and tuple(args[0].shape) == self.shape:
                self.n += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    block = SLaK.ReparamLargeKernelConv(6, 6, 9, 1, 6, 3, Decom=Decom, conv_impl='torch').train()
    x = torch.randn(2, 6, 10, 11)
    g = torch.randn(2, 6, 10, 11)
    branches = [b for b in (getattr(block, n, None) for n in ('LoRA1', 'LoRA2', 'lkb_origin', 'small_conv')) if b]
    leaves = [x.clone().requires_grad_(True) for _ in range(2)]
    casts = {}
    for name in ('ours', 'per-conv casts'):
        xi = leaves[name == 'ours'] * 1.0  # not a leaf: autocast caches the casts of leaves only
        with torch.autocast('cpu', dtype=torch.bfloat16):
            with CountCasts(tuple(x.shape)) as forward:
                out = block(xi) if name == 'ours' else sum(b(xi) for b in branches)
        with CountCasts(tuple(x.shape)) as backward:
            (out.float() * g).sum().backward()
        casts[name] = (forward.n, backward.n, out)
    (fwd, bwd, out), (ref_fwd, ref_bwd, ref) = casts['ours'], casts['per-conv casts']
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)
    assert (fwd, ref_fwd) == (1, len(branches)) and ref_bwd - bwd == len(branches) - 1
    xs = leaves[::-1]
    assert xs[0].grad.dtype == torch.float32
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-6, atol=1e-6)


def test_forward_intermediates_and_interface():
    m = timm.create_model('SLaK_tiny', num_classes=3, **TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    feats = m.forward_intermediates(x, intermediates_only=True)
    assert [tuple(f.shape) for f in feats] == [(2, 12, 16, 16), (2, 24, 8, 8), (2, 48, 4, 4), (2, 96, 2, 2)]
    final, inter = m.forward_intermediates(x, indices=[1, 3])
    assert len(inter) == 2 and torch.equal(final, inter[-1]) and torch.equal(inter[0], feats[1])
    assert torch.equal(m.forward_features(x), feats[-1])  # timm: the map; the original's vector is pre_logits
    pooled = m.forward_head(m.forward_features(x), pre_logits=True)
    assert pooled.shape == (2, 96)
    torch.testing.assert_close(pooled, m.norm(feats[-1].mean((2, 3))))
    torch.testing.assert_close(m.head(pooled), m(x))
    assert m.get_classifier() is m.head
    m.reset_classifier(11)
    assert m(x).shape == (2, 11)


def test_torch_compile_smoke():
    torch.manual_seed(0)
    m = timm.create_model('SLaK_tiny', num_classes=3, depths=[1, 1, 1, 1], **TINY).eval()
    x = torch.randn(1, 3, 32, 32)
    compiled = torch.compile(m, backend='eager')
    torch.testing.assert_close(compiled(x), m(x))


# ---- the conv seam --------------------------------------------------------------------------------------------------
def test_conv_seam_torch_choice_is_plain_conv_and_visible(monkeypatch):
    monkeypatch.setenv('LARGE_KERNEL_CONV_IMPL', 'torch')
    m = timm.create_model('SLaK_tiny', **TINY)
    assert m.conv_impl == 'torch'
    assert type(m.stages[0][0].large_kernel.LoRA1.conv) is nn.Conv2d
    assert 'conv_impl=torch' in repr(m.stages[0][0].large_kernel)
    non_dw = SLaK.get_conv2d(4, 8, 3, 1, 1, 1, 1, True)
    assert type(non_dw) is nn.Conv2d and non_dw.weight.shape == (8, 4, 3, 3)


def test_conv_seam_rejects_unknown_choice():
    with pytest.raises(ValueError, match='LARGE_KERNEL_CONV_IMPL'):
        timm.create_model('SLaK_tiny', conv_impl='fastest', **TINY)


@pytest.mark.skipif(not os.path.isfile(os.path.join(os.path.dirname(SLaK.__file__), 'cutlass',
                                                    'depthwise_conv2d_implicit_gemm.py')),
                    reason='cutlass/ kernel not present')
def test_conv_seam_cutlass_choice_has_identical_keys():
    torch.manual_seed(0)
    a = timm.create_model('SLaK_tiny', conv_impl='torch', **TINY)
    b = timm.create_model('SLaK_tiny', conv_impl='cutlass', **TINY)
    assert type(b.stages[0][0].large_kernel.LoRA1.conv).__name__ == 'DepthWiseConv2dImplicitGEMM'
    assert 'conv_impl=cutlass' in repr(b.stages[0][0].large_kernel)
    assert [(k, v.shape) for k, v in a.state_dict().items()] == [(k, v.shape) for k, v in b.state_dict().items()]


@pytest.mark.skipif(not os.path.isfile(os.path.join(os.path.dirname(SLaK.__file__), 'cutlass',
                                                    'depthwise_conv2d_implicit_gemm.py')),
                    reason='cutlass/ kernel not present')
@pytest.mark.filterwarnings('ignore:depthwise_conv2d. falling back')
def test_for_single_pass_swaps_fast_convs_for_plain_ones_sharing_parameters():
    """SNIP's copy: plain nn.Conv2d (same parameters, per-axis padding) and eager tails, same float64 outputs."""
    torch.manual_seed(0)
    model = timm.create_model('SLaK_tiny', conv_impl='cutlass', **TINY).double().train()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.manual_seed(1)
    ref = model(x)
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    assert SLaK.for_single_pass(model) is model
    fast = SLaK._load_fast_dwconv()
    assert not any(isinstance(m, fast) for m in model.modules())
    assert all(type(b.large_kernel.LoRA1.conv) is nn.Conv2d for s in model.stages for b in s)
    assert all(b.COMPILE_TAIL is False for s in model.stages for b in s)
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())
    torch.manual_seed(1)
    assert torch.equal(model(x), ref)


# ---- bad input ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('kwargs,match', [
    (dict(kernel_size=[51, 49, 48, 13, 5]), r'kernel_size\[2\] = 48 is even'),
    (dict(kernel_size=[51, 49, 47, 13, 4], Decom=True), r'kernel_size\[4\].*even'),
    (dict(kernel_size=[51, 49, 47, 13]), 'must list 5 ints'),
    (dict(kernel_size=[51, 49, 47, 13, 5], width_factor=0), 'width_factor must be > 0'),
    (dict(kernel_size=[51, 49, 47, 13, 5], width_factor=-1.3), 'width_factor must be > 0'),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model('SLaK_tiny', **kwargs)


def test_convnext_emulation_even_unused_small_kernel_is_fine():
    m = timm.create_model('SLaK_tiny', kernel_size=[7, 7, 7, 7, 100], width_factor=0.125)
    assert not hasattr(m.stages[0][0].large_kernel, 'small_conv')


def test_load_checkpoint_reports_missing_and_unexpected(tmp_path):
    src = timm.create_model('SLaK_tiny', num_classes=3, **TINY)
    path = str(tmp_path / 'ckpt.pth')
    torch.save({'model': {'module.' + k: v for k, v in src.state_dict().items()}}, path)
    dst = timm.create_model('SLaK_tiny', num_classes=3, **TINY)
    SLaK.load_checkpoint(dst, path)  # 'module.' prefix stripped, strict load works
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)
    other = timm.create_model('SLaK_tiny', num_classes=3, width_factor=0.125, kernel_size=[7, 7, 5, 5, 3], Decom=False)
    with pytest.raises(ValueError, match=r'missing keys.*lkb_origin.*unexpected keys.*LoRA1'):
        SLaK.load_checkpoint(other, path)
    wider = timm.create_model('SLaK_tiny', num_classes=3, width_factor=0.25, kernel_size=[7, 7, 5, 5, 3], Decom=True)
    with pytest.raises(ValueError, match=r'shape mismatches'):
        SLaK.load_checkpoint(wider, path)
    with pytest.raises(ValueError, match='not found'):
        SLaK.load_checkpoint(dst, str(tmp_path / 'nope.pth'))


@pytest.mark.parametrize("dim,multiple", [(13, 8), (124, 8), (124, 64)])
# 13: dim and 4*dim misaligned; 124: only dim (4*124 = 496 is a multiple of 8, not of 64)
def test_padded_pointwise_mlp_equals_plain(dim, multiple, monkeypatch):
    """The CUDA-only padded MLP (GEMM dims rounded up to multiples of 8, or of SLAK_POINTWISE_PAD) is the same
    maths: float64 outputs and every parameter gradient agree with the plain nn.Linear path; parameters and keys
    are unchanged."""
    monkeypatch.setattr(SLaK, 'POINTWISE_PAD_MULTIPLE', multiple)
    torch.manual_seed(0)
    block = SLaK.Block(dim, kernel_size=(7, 3), Decom=True, layer_scale_init_value=0.5, conv_impl='torch').double()
    x = torch.randn(2, dim, 6, 5, dtype=torch.float64)
    results = {}
    for mode in (False, True):
        monkeypatch.setattr(SLaK.Block, 'PAD_POINTWISE', mode)
        block.zero_grad()
        y = block(x)
        y.square().sum().backward()
        results[mode] = (y.detach(), {k: p.grad.clone() for k, p in block.named_parameters()})
    assert block._pad_pointwise(x) is True
    (y0, g0), (y1, g1) = results[False], results[True]
    assert torch.allclose(y0, y1, rtol=1e-12, atol=1e-12)
    assert g0.keys() == g1.keys() and all(torch.allclose(g0[k], g1[k], rtol=1e-10, atol=1e-12) for k in g0)
    assert block.pwconv1.weight.shape == (4 * dim, dim)
    fblock = SLaK.Block(dim, kernel_size=(7, 3), Decom=True, layer_scale_init_value=0.5, conv_impl='torch')
    fblock.load_state_dict({k: v.float() for k, v in block.state_dict().items()})
    with torch.autocast('cpu', dtype=torch.bfloat16):  # the half-precision path pads the cast copy
        yb = fblock(x.float())
    assert yb.shape == x.shape and ((yb.double() - y0).norm() / y0.norm()).item() < 2e-2


def test_pointwise_pad_multiple_comes_from_the_environment(monkeypatch):
    """SLAK_POINTWISE_PAD sets the multiple; anything but a whole number >= 1 is refused, naming the variable."""
    monkeypatch.delenv('SLAK_POINTWISE_PAD', raising=False)
    assert SLaK._pointwise_pad_multiple() == 8
    monkeypatch.setenv('SLAK_POINTWISE_PAD', '64')
    assert SLaK._pointwise_pad_multiple() == 64
    for bad in ('0', 'sixty-four', '-8', '6.5'):
        monkeypatch.setenv('SLAK_POINTWISE_PAD', bad)
        with pytest.raises(ValueError, match='SLAK_POINTWISE_PAD must be a whole number >= 1'):
            SLaK._pointwise_pad_multiple()
    block = SLaK.Block(16, kernel_size=(7, 3), conv_impl='torch')  # 16 / 64 channels: aligned to 8 and 16 ...
    monkeypatch.setattr(SLaK.Block, 'PAD_POINTWISE', True)
    monkeypatch.setattr(SLaK, 'POINTWISE_PAD_MULTIPLE', 16)
    assert block._pad_pointwise(torch.zeros(1, 2, 2, 16)) is False
    monkeypatch.setattr(SLaK, 'POINTWISE_PAD_MULTIPLE', 64)  # ... not to 64: padded
    assert block._pad_pointwise(torch.zeros(1, 2, 2, 16)) is True


def test_padded_pointwise_is_off_under_flop_counter(monkeypatch):
    """main.count_macs must see the unpadded nn.Linear calls: exact FLOPs, attributed to pwconv1/pwconv2."""
    from torch.utils.flop_counter import FlopCounterMode
    monkeypatch.setattr(SLaK.Block, 'PAD_POINTWISE', True)
    dim, hw = 13, 6 * 5
    block = SLaK.Block(dim, kernel_size=(7, 3), Decom=True, conv_impl='torch')
    with FlopCounterMode(display=False) as counter:
        block(torch.randn(1, dim, 6, 5))
    counts = counter.get_flop_counts()
    assert sum(counts['Block.pwconv1'].values()) == 2 * hw * dim * 4 * dim
    assert sum(counts['Block.pwconv2'].values()) == 2 * hw * 4 * dim * dim


def test_padded_pointwise_auto_is_cuda_only_and_skips_aligned_widths():
    block = SLaK.Block(16, kernel_size=(7, 3), conv_impl='torch')
    assert SLaK.Block.PAD_POINTWISE == 'auto'
    assert block._pad_pointwise(torch.zeros(1, 2, 2, 16)) is False  # aligned width: never padded
    odd = SLaK.Block(13, kernel_size=(7, 3), conv_impl='torch')
    assert odd._pad_pointwise(torch.zeros(1, 2, 2, 13)) is False  # CPU tensor under 'auto'


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_padded_pointwise_matches_plain():
    torch.manual_seed(0)
    m = timm.create_model('SLaK_tiny', num_classes=10, depths=[1, 1, 1, 1], width_factor=1.3,
                          kernel_size=[13, 13, 13, 13, 5], Decom=True, layer_scale_init_value=0.5).cuda()
    x = torch.randn(4, 3, 64, 64, device='cuda')
    out = {}
    SLaK.Block.COMPILE_TAIL = False  # the compiled tail always pads: compare the two eager paths
    for mode in (False, 'auto'):
        SLaK.Block.PAD_POINTWISE = mode
        m.zero_grad()
        with torch.autocast('cuda', dtype=torch.bfloat16):
            y = m(x)
        y.float().square().sum().backward()
        out[mode] = (y.float(), m.stages[1][0].pwconv1.weight.grad.clone())
    SLaK.Block.PAD_POINTWISE = 'auto'
    SLaK.Block.COMPILE_TAIL = 'auto'
    assert m.stages[1][0]._pad_pointwise(torch.zeros(1, device='cuda'))  # 249 channels: padded on CUDA
    for a, b in zip(out[False], out['auto']):
        assert ((a - b).norm() / b.norm()).item() < 2e-2


# ---- the compiled block tail ----------------------------------------------------------------------------------------

@pytest.fixture
def tail_backend(monkeypatch):
    """Blocks take the compiled-tail path on CPU, traced by ``aot_eager`` (the same graph capture and autograd
    split as inductor, without code generation); fresh compile state before and after."""
    monkeypatch.setattr(SLaK.Block, 'COMPILE_TAIL', True)
    monkeypatch.setattr(SLaK, 'TAIL_BACKEND', 'aot_eager')
    monkeypatch.setitem(SLaK._TAIL_STATE, 'fn', None)
    monkeypatch.setitem(SLaK._TAIL_STATE, 'broken', False)
    monkeypatch.setitem(SLaK._TAIL_STATE, 'keys', set())
    monkeypatch.setitem(SLaK._TAIL_STATE, 'sizes', {})
    monkeypatch.setitem(SLaK._TAIL_STATE, 'full_warned', False)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def counted_graphs(monkeypatch):
    """The tail's graphs, one entry per graph traced (a backend that runs the traced graph as it is)."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(1)
        return gm.forward
    monkeypatch.setattr(SLaK, 'TAIL_BACKEND', counting_backend)
    return graphs


def run_block(block, x, seed, compiled, monkeypatch):
    monkeypatch.setattr(SLaK.Block, 'COMPILE_TAIL', compiled)
    block.zero_grad()
    x = x.detach().requires_grad_()
    torch.manual_seed(seed)
    y = block(x)
    y.square().sum().backward()
    return y.detach(), x.grad, {k: p.grad.clone() for k, p in block.named_parameters() if p.grad is not None}


@pytest.mark.parametrize('dim', [13, 16])
def test_compiled_tail_equals_eager_block_with_drop_path(dim, tail_backend, monkeypatch):
    """Training mode, float64, drop path 0.5: the compiled tail gives the eager block's output, input gradient and
    every parameter gradient, with the same per-sample drop mask (same random draws)."""
    torch.manual_seed(0)
    block = SLaK.Block(dim, drop_path=0.5, kernel_size=(7, 3), Decom=True, layer_scale_init_value=0.5,
                       conv_impl='torch').double().train()
    x = torch.randn(6, dim, 6, 5, dtype=torch.float64)
    calls = []
    real = SLaK._block_tail
    monkeypatch.setattr(SLaK, '_block_tail', lambda *a: calls.append(a[10]) or real(*a))
    y0, dx0, g0 = run_block(block, x, 3, False, monkeypatch)
    y1, dx1, g1 = run_block(block, x, 3, True, monkeypatch)
    assert len(calls) == 1 and calls[0] is not None  # the tail ran once, with a drop mask
    dropped = (calls[0].flatten() == 0).sum().item()
    assert 0 < dropped < 6  # seed 3 drops some samples and keeps others: both branches matter
    torch.testing.assert_close(y1, y0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx1, dx0, rtol=1e-12, atol=1e-12)
    assert g0.keys() == g1.keys() and len(g0) == len(list(block.parameters()))
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-10, atol=1e-12, msg=k)


def test_fan_out_with_the_shortcut_gives_the_same_bits_under_autocast(tail_backend, monkeypatch):
    """Training under bf16 autocast through the compiled tail: the block fans its input out once to the shortcut and
    the branches (``_FanOutCast`` with ``shortcut``), so the input's gradient is one sum, ``((g1 + g2) + g3) + g_s``
    in float32: bit-identical to the separate fan-out plus autograd's add of the shortcut's gradient, for the
    output, the input gradient and every parameter gradient, and over two blocks (the second's input gradient
    feeds the first's shortcut)."""
    torch.manual_seed(0)
    blocks = nn.Sequential(*[SLaK.Block(16, kernel_size=(7, 3), Decom=True, layer_scale_init_value=0.5,
                                        conv_impl='torch') for _ in range(2)]).train()
    x = torch.randn(3, 16, 9, 8)
    fan_outs = []
    real = SLaK._fan_out
    monkeypatch.setattr(SLaK, '_fan_out', lambda t, n, shortcut: fan_outs.append(shortcut) or real(t, n, shortcut))

    def run(with_shortcut):
        if not with_shortcut:
            monkeypatch.setattr(SLaK, '_fan_out', lambda t, n, shortcut: None if shortcut else real(t, n, shortcut))
        blocks.zero_grad()
        xi = x.clone().requires_grad_()
        with torch.autocast('cpu', dtype=torch.bfloat16):
            y = blocks(xi)
        (y.float().square().sum() * 1e3).backward()
        return y.detach(), xi.grad, {k: p.grad.clone() for k, p in blocks.named_parameters()}
    y1, dx1, g1 = run(True)
    assert fan_outs == [True, True]  # both blocks fanned out with the shortcut
    y0, dx0, g0 = run(False)
    assert torch.equal(y1, y0) and torch.equal(dx1, dx0) and dx1.dtype == torch.float32
    assert g0.keys() == g1.keys() and all(torch.equal(g1[k], g0[k]) for k in g0)


def test_compiled_tail_folded_decomposed_and_autocast(tail_backend, monkeypatch):
    """Eval mode after reparameterize(decomposed=True): the two conv outputs and the bias are summed inside the tail
    (forward_parts); under bf16 autocast the result matches the eager model."""
    torch.manual_seed(0)
    m = randomise_bn_and_gamma(timm.create_model('SLaK_tiny', num_classes=5, depths=[1, 1, 2, 1], width_factor=0.1,
                                                 kernel_size=[9, 7, 5, 5, 3], Decom=True, conv_impl='torch'))
    m.eval().reparameterize(decomposed=True)
    assert hasattr(m.stages[0][0].large_kernel, 'lkb_decomposed')
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        monkeypatch.setattr(SLaK.Block, 'COMPILE_TAIL', False)
        ref = m(x)
        monkeypatch.setattr(SLaK.Block, 'COMPILE_TAIL', True)
        out = m(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            half = m(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert ((half.float() - ref).norm() / ref.norm()).item() < 3e-2
    assert SLaK._TAIL_STATE['fn'] is not None and not SLaK._TAIL_STATE['broken']


def test_compiled_tail_failure_warns_once_and_runs_eagerly(tail_backend, monkeypatch):
    def broken_backend(gm, example_inputs):
        raise RuntimeError('no compiler here')
    monkeypatch.setattr(SLaK, 'TAIL_BACKEND', broken_backend)
    torch.manual_seed(0)
    block = SLaK.Block(13, kernel_size=(7, 3), Decom=True, layer_scale_init_value=0.5, conv_impl='torch').eval()
    x = torch.randn(2, 13, 6, 5)
    with pytest.warns(UserWarning, match='SLAK_COMPILE_TAIL=0'):
        y = block(x)
    assert SLaK._TAIL_STATE['broken']
    assert not block._use_compiled_tail(x)
    monkeypatch.setattr(SLaK.Block, 'COMPILE_TAIL', False)
    torch.testing.assert_close(y, block(x), rtol=1e-6, atol=1e-6)


def test_compiled_tail_graph_budget(tail_backend, monkeypatch):
    """Past TAIL_MAX_GRAPHS signatures new shapes run the eager function (one warning); known ones stay compiled,
    and the outputs are the same either way."""
    monkeypatch.setattr(SLaK, 'TAIL_MAX_GRAPHS', 2)
    compiled_calls = []
    real_compile = torch.compile

    def counting_compile(fn, **kwargs):
        compiled = real_compile(fn, **kwargs)

        def call(*args):
            compiled_calls.append(1)
            return compiled(*args)
        return call
    monkeypatch.setattr(torch, 'compile', counting_compile)
    torch.manual_seed(0)
    blocks = [SLaK.Block(dim, kernel_size=(7, 3), Decom=True, layer_scale_init_value=0.5, conv_impl='torch').eval()
              for dim in (13, 14, 15)]  # three stage widths: three signatures
    xs = [torch.randn(2, dim, 6, 5) for dim in (13, 14, 15)]
    with torch.no_grad():
        y13, y14 = blocks[0](xs[0]), blocks[1](xs[1])
        with pytest.warns(UserWarning, match='new ones run eagerly'):
            y15 = blocks[2](xs[2])
        assert len(compiled_calls) == 2
        blocks[0](xs[0])  # a known signature stays compiled
        assert len(compiled_calls) == 3 and len(SLaK._TAIL_STATE['keys']) == 2
        monkeypatch.setattr(SLaK.Block, 'COMPILE_TAIL', False)
        for block, x, y in zip(blocks, xs, (y13, y14, y15)):
            torch.testing.assert_close(y, block(x), rtol=1e-6, atol=1e-6)


def test_compiled_tail_evaluation_graph_serves_every_batch_size(tail_backend, monkeypatch):
    """No-grad calls mark the batch dimension dynamic: one graph for batches 4, 3 and 6 (a validation set's last,
    smaller batch; EMA evaluation), a static one for batch 1; training keeps one static graph per size."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(tuple(tuple(getattr(t, 'shape', ())) for t in example_inputs if isinstance(t, torch.Tensor)))
        return gm.forward
    monkeypatch.setattr(SLaK, 'TAIL_BACKEND', counting_backend)
    torch.manual_seed(0)
    block = SLaK.Block(13, kernel_size=(7, 3), Decom=True, layer_scale_init_value=0.5, conv_impl='torch').eval()
    xs = [torch.randn(n, 13, 6, 5) for n in (4, 3, 6, 1)]
    with torch.no_grad():
        ys = [block(x) for x in xs]
        assert len(graphs) == 2 and len(SLaK._TAIL_STATE['keys']) == 2
        monkeypatch.setattr(SLaK.Block, 'COMPILE_TAIL', False)
        for x, y in zip(xs, ys):
            torch.testing.assert_close(y, block(x), rtol=1e-6, atol=1e-6)
    monkeypatch.setattr(SLaK.Block, 'COMPILE_TAIL', True)
    block.train()
    for x in xs[:2]:
        block(x).sum().backward()
    assert len(graphs) == 4 and len(SLaK._TAIL_STATE['keys']) == 4


def test_compiled_tail_map_sizes_go_symbolic_from_the_second_size(tail_backend, counted_graphs, monkeypatch):
    """Multi-scale inputs (detection): the first map size compiles a static graph, the second one graph with symbolic
    height and width that serves every later size, in training and in evaluation; sizes of 1 stay static. Outputs
    and gradients equal the eager block's."""
    graphs = counted_graphs
    torch.manual_seed(0)
    block = SLaK.Block(13, drop_path=0.2, kernel_size=(7, 3), Decom=True, layer_scale_init_value=0.5,
                       conv_impl='torch').double().train()
    sizes = [(6, 5), (9, 7), (6, 5), (12, 10), (5, 11)]
    for i, (h, w) in enumerate(sizes):
        x = torch.randn(2, 13, h, w, dtype=torch.float64)
        y1, dx1, g1 = run_block(block, x, i, True, monkeypatch)
        y0, dx0, g0 = run_block(block, x, i, False, monkeypatch)
        torch.testing.assert_close(y1, y0, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dx1, dx0, rtol=1e-12, atol=1e-12)
        for k in g0:
            torch.testing.assert_close(g1[k], g0[k], rtol=1e-10, atol=1e-12, msg=k)
    assert len(graphs) == 2 and len(SLaK._TAIL_STATE['keys']) == 2
    block.eval()
    monkeypatch.setattr(SLaK.Block, 'COMPILE_TAIL', True)
    with torch.no_grad():
        for h, w in [(6, 5), (8, 8), (13, 4), (1, 7)]:
            x = torch.randn(3, 13, h, w, dtype=torch.float64)
            out = block(x)
            monkeypatch.setattr(SLaK.Block, 'COMPILE_TAIL', False)
            torch.testing.assert_close(out, block(x), rtol=1e-12, atol=1e-12)
            monkeypatch.setattr(SLaK.Block, 'COMPILE_TAIL', True)
    # evaluation: static first size, then one symbolic graph; the map of height 1 keeps that dimension static
    assert len(graphs) == 5 and len(SLaK._TAIL_STATE['keys']) == 5


def float64_step(m, x, compiled, monkeypatch):
    """(loss, gradients) of one float64 training step of ``m`` on ``x``, the blocks' tails compiled or eager, with the
    same random draws (drop path) either way."""
    monkeypatch.setattr(SLaK.Block, 'COMPILE_TAIL', compiled)
    m.zero_grad()
    torch.manual_seed(1)
    loss = m(x).square().sum()
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}


def assert_same_step(eager, compiled):
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-12, atol=0)
    for k, g in eager[1].items():
        torch.testing.assert_close(compiled[1][k], g, rtol=1e-9, atol=1e-12, msg=k)


def test_compiled_tail_one_training_graph_per_stage_with_drop_path(tail_backend, counted_graphs, monkeypatch):
    """Drop-path rates rise from 0, so the first block has none; it still passes per-sample factors (ones) and shares
    its stage's training graph: one graph per stage shape, and the same loss and gradients as the eager blocks."""
    graphs = counted_graphs
    torch.manual_seed(0)
    m = timm.create_model('SLaK_tiny', num_classes=5, depths=[2, 2, 1, 1], width_factor=0.1, drop_path_rate=0.2,
                          kernel_size=[7, 5, 5, 3, 3], Decom=True, conv_impl='torch', layer_scale_init_value=0.5)
    m = m.double().train()
    assert m.stages[0][0].drop_path.__class__.__name__ == 'Identity'  # the first block has no drop path
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    results = [float64_step(m, x, compiled, monkeypatch) for compiled in (False, True)]
    assert len(graphs) == 4 and len(SLaK._TAIL_STATE['keys']) == 4  # 4 stage shapes, not 5
    assert_same_step(*results)


def test_stage_input_is_what_each_stage_receives():
    """The cache-warming processes run one stage on ``stage_input``: the same shape, dtype, layout and gradient
    requirement as that stage's input in a full training forward under autocast."""
    torch.manual_seed(0)
    m = timm.create_model('SLaK_tiny', num_classes=5, depths=[1, 1, 1, 1], width_factor=0.2,
                          kernel_size=[7, 5, 5, 3, 3], Decom=True, conv_impl='torch').train()
    seen = {}
    for i, stage in enumerate(m.stages):
        stage.register_forward_pre_hook(lambda mod, args, i=i: seen.setdefault(i, args[0]))
    images = torch.randn(2, 3, 64, 64)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        m(images)
        for i in range(4):
            x = SLaK.stage_input(m, i, images)
            ref = seen[i]
            assert (x.shape, x.dtype, x.stride(), x.requires_grad) == \
                   (ref.shape, ref.dtype, ref.stride(), ref.requires_grad), i


def test_warm_compile_caches_runs_each_stage_in_its_own_process(tail_backend, monkeypatch):
    """Where it applies (CUDA with the compiled tail; forced here on CPU with the tracing backend), one process per
    stage builds the model from its spec and compiles that stage's training graph and folded evaluation graph; the
    processes report them and the summary line counts them. It stands aside on CPU, for other models and unless
    SLAK_WARM_CACHES=1 asks for it (measured slower than compiling in-process, so off by default)."""
    kwargs = dict(num_classes=5, depths=[1, 1, 1, 1], width_factor=0.1, kernel_size=[7, 5, 5, 3, 3], Decom=True,
                  conv_impl='torch', drop_path_rate=0.1)
    model = timm.create_model('SLaK_tiny', **kwargs)
    spec = {'name': 'SLaK_tiny', 'kwargs': kwargs}
    assert SLaK.warm_compile_caches(model, spec, 2, 64, torch.bfloat16, device='cpu') is None
    assert SLaK.warm_compile_caches(torch.nn.Linear(2, 2), spec, 2, 64, None, force=True) is None
    for setting in (False, 'auto'):  # 'auto': SLAK_WARM_CACHES unset
        monkeypatch.setattr(SLaK, 'WARM_CACHES', setting)
        assert SLaK.warm_compile_caches(model, spec, 2, 64, None, device='cuda') is None
    monkeypatch.setattr(SLaK, 'WARM_CACHES', True)
    monkeypatch.setattr(SLaK.Block, 'COMPILE_TAIL', False)
    assert SLaK.warm_compile_caches(model, spec, 2, 64, None, device='cuda') is None
    monkeypatch.setattr(SLaK.Block, 'COMPILE_TAIL', True)
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    warmer = SLaK.warm_compile_caches(model, spec, 2, 64, torch.bfloat16, device='cpu', eval_batch=3, force=True)
    assert len(warmer.processes) == 4
    summary = warmer.wait(timeout=240)
    assert summary['failed'] == [] and summary['processes'] == 4
    assert summary['graphs'] == 8  # per stage: the training graph and the folded evaluation graph


def _process_state(pid: int) -> str:
    """The state letter of ``pid`` in /proc ('Z': a zombie, finished), or 'gone'."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return 'gone'


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='PR_SET_PDEATHSIG is Linux-only')
def test_warm_up_processes_end_with_the_process_that_started_them(tmp_path):
    """A run killed by a signal (a scheduler's time limit, the OOM killer: no atexit) leaves no warm-up process
    compiling on its machine: each one asks Linux for SIGTERM when its parent dies. Here the warm-up job would sleep
    two minutes; its parent is SIGKILLed and the job must be gone within seconds."""
    (tmp_path / 'napper.py').write_text('import time\n\ndef nap(job):\n    time.sleep(job["s"])\n')
    parent = (f'import sys, time\nsys.path.insert(0, {REPO!r})\nimport SLaK\n'
              f'w = SLaK._start_warmers("nap", [{{"s": 120}}], module="napper")\n'
              f'print(w.processes[0][1].pid, flush=True)\ntime.sleep(120)\n')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get('PYTHONPATH', '')]))
    proc = subprocess.Popen([sys.executable, '-c', parent], stdout=subprocess.PIPE, env=env, text=True)
    try:
        child = int(proc.stdout.readline())
        time.sleep(1.)
        assert _process_state(child) not in ('gone', 'Z')  # asleep in its job
    finally:
        proc.kill()
        proc.wait()
    deadline = time.time() + 30
    while _process_state(child) not in ('gone', 'Z') and time.time() < deadline:
        time.sleep(0.2)
    state = _process_state(child)
    if state not in ('gone', 'Z'):
        os.kill(child, signal.SIGKILL)
    assert state in ('gone', 'Z'), f'the warm-up process outlived its parent (state {state})'


def test_warm_compile_caches_failures_are_reported_not_raised(tail_backend, monkeypatch, capsys):
    """A process that fails (here: a model name its timm does not know) costs the run nothing but time: the summary
    names the stage and the error's last line, and nothing is raised."""
    model = timm.create_model('SLaK_tiny', num_classes=5, depths=[1, 1, 1, 1], width_factor=0.1,
                              kernel_size=[7, 5, 5, 3, 3], Decom=True, conv_impl='torch')
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    warmer = SLaK.warm_compile_caches(model, {'name': 'no_such_model', 'kwargs': {}}, 2, 64, None, device='cpu',
                                      force=True)
    summary = warmer.wait(timeout=240)
    assert summary['graphs'] == 0 and len(summary['failed']) == 4
    assert all('no_such_model' in f or 'Unknown model' in f for f in summary['failed']), summary['failed']
    assert 'failed (the training process compiles those itself)' in capsys.readouterr().out


def test_whole_model_compiles_as_one_graph_and_matches_eager():
    """``torch.compile(model, fullgraph=True)`` (main.py's ``--compile true`` compiles the model as a whole) traces
    SLaK without a graph break, in training and evaluation: the block's checks for a FLOP counter and the conv's
    fallback warning used to break the graph in every block. Same outputs and gradients as eager (float64)."""
    torch.manual_seed(0)
    m = timm.create_model('SLaK_tiny', num_classes=5, depths=[1, 2, 1, 1], width_factor=0.1,
                          kernel_size=[7, 5, 5, 3, 3], Decom=True, conv_impl='cutlass', layer_scale_init_value=0.5)
    m = randomise_bn_and_gamma(m).double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    torch._dynamo.reset()
    compiled = torch.compile(m, backend='aot_eager', fullgraph=True)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # the CPU fallback's one-time warning (eager call)
        for mode in ('train', 'eval'):
            getattr(m, mode)()
            results = []
            for model in (m, compiled):
                m.zero_grad()
                y = model(x)
                y.square().sum().backward()
                results.append((y.detach(), m.downsample_layers[0][0].weight.grad.clone(),
                                m.stages[2][0].pwconv1.weight.grad.clone(),
                                m.stages[0][0].large_kernel.LoRA1.conv.weight.grad.clone()))
            for a, b in zip(*results):
                torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)
    torch._dynamo.reset()


def test_compiled_tail_stands_aside(tail_backend, monkeypatch):
    """'auto' is CUDA-only; hooks on the tail's modules and FLOP counting keep the eager path; so does the switch."""
    block = SLaK.Block(13, kernel_size=(7, 3), Decom=True, conv_impl='torch')
    x = torch.randn(1, 13, 6, 5)
    assert block._use_compiled_tail(x)
    monkeypatch.setattr(SLaK.Block, 'COMPILE_TAIL', 'auto')
    assert not block._use_compiled_tail(x)  # CPU tensor
    monkeypatch.setattr(SLaK.Block, 'COMPILE_TAIL', True)
    handle = block.pwconv1.register_forward_hook(lambda *a: None)
    assert not block._use_compiled_tail(x)
    handle.remove()
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False):
        assert not block._use_compiled_tail(x)
    assert SLaK._env_switch('SLAK_TEST_UNSET_VARIABLE') == 'auto'
    for value, expected in (('0', False), ('off', False), ('1', True), ('auto', 'auto')):
        monkeypatch.setenv('SLAK_TEST_SWITCH', value)
        assert SLaK._env_switch('SLAK_TEST_SWITCH') == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_compiled_tail_matches_eager_tail():
    """Inductor's kernels against the eager blocks: SLaK-T widths (misaligned 249/499 padded), bf16 autocast,
    training with drop path (same masks), outputs and gradients within bf16 rounding."""
    torch.manual_seed(0)
    m = timm.create_model('SLaK_tiny', num_classes=10, depths=[1, 1, 2, 1], width_factor=1.3, drop_path_rate=0.3,
                          kernel_size=[13, 13, 13, 13, 5], Decom=True, layer_scale_init_value=0.5).cuda().train()
    x = torch.randn(8, 3, 64, 64, device='cuda')
    out = {}
    for mode in (False, 'auto'):
        SLaK.Block.COMPILE_TAIL = mode
        m.zero_grad()
        torch.manual_seed(1)
        with torch.autocast('cuda', dtype=torch.bfloat16):
            y = m(x)
        y.float().square().sum().backward()
        stem = m.downsample_layers[0][0]
        out[mode] = (y.float(), m.stages[1][0].pwconv1.weight.grad.clone(), stem.weight.grad.clone())
    SLaK.Block.COMPILE_TAIL = 'auto'
    assert SLaK._TAIL_STATE['fn'] is not None and not SLaK._TAIL_STATE['broken']
    for a, b in zip(out[False], out['auto']):
        assert ((a - b).norm() / b.norm()).item() < 2e-2


def _tiny_cutlass_slak():
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # the CPU fallback's one warning
        return timm.create_model('SLaK_tiny', num_classes=5, depths=[1, 1, 1, 1], width_factor=0.1,
                                 kernel_size=[7, 5, 5, 3, 3], Decom=True, conv_impl='cutlass')


def test_fast_dwconv_layers_lists_each_triton_layer_with_its_stage_stride():
    model = _tiny_cutlass_slak()
    layers = SLaK.fast_dwconv_layers(model)
    if SLaK._load_fast_dwconv() is None:
        assert layers == []
        return
    c = model.dims  # kernel_size [7, 5, 5, 3, 3]: Decom branches (K, 3), (3, K) and the small 3 x 3, one per stage
    assert layers == [(c[0], 7, 3, 4), (c[0], 3, 7, 4), (c[0], 3, 3, 4), (c[1], 5, 3, 8), (c[1], 3, 5, 8),
                      (c[1], 3, 3, 8), (c[2], 5, 3, 16), (c[2], 3, 5, 16), (c[2], 3, 3, 16), (c[3], 3, 3, 32)]
    assert SLaK.fast_dwconv_layers(model, torch.bfloat16, 'cuda') == layers
    assert SLaK.fast_dwconv_layers(model, torch.float32, 'cpu') == layers
    assert SLaK.fast_dwconv_layers(model, torch.float32, 'cuda') == []  # all <= 65 taps: cuDNN's in fp32
    assert SLaK.fast_dwconv_layers(torch.nn.Linear(2, 2)) == []
    assert SLaK.fast_dwconv_layers(timm.create_model('SLaK_tiny', num_classes=5, depths=[1, 1, 1, 1],
                                                     width_factor=0.1, kernel_size=[7, 5, 5, 3, 3],
                                                     conv_impl='torch')) == []


@pytest.mark.parametrize('amp_dtype,cache', [(None, True), (torch.bfloat16, True), (torch.bfloat16, False)])
def test_warm_step_graphs_traces_the_step_graphs_ahead_without_touching_the_model(amp_dtype, cache, tail_backend,
                                                                                 counted_graphs, capsys,
                                                                                 monkeypatch):
    """SLAK_WARM_GRAPHS: a background step of a small copy traces one training tail graph per stage; the model's
    weights, BatchNorm statistics and the random stream are untouched, and the real training step (drop path on in
    every block but the first) then meets only graphs already traced: nothing is traced again, provided it runs
    under the same autocast weight-cache setting (main.py's CUDA-graph capture turns the cache off; Dynamo guards
    on it: the other setting traces every graph again)."""
    torch.manual_seed(0)
    model = timm.create_model('SLaK_tiny', num_classes=5, depths=[2, 2, 2, 2], width_factor=0.1,
                              kernel_size=[7, 5, 5, 3, 3], Decom=True, conv_impl='torch', drop_path_rate=0.3).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    copies = []
    real_copy = SLaK.step_graph_copy

    def tracked_copy(m):
        small = real_copy(m)
        copies.append(weakref.ref(small))
        return small
    monkeypatch.setattr(SLaK, 'step_graph_copy', tracked_copy)
    handle = SLaK.warm_step_graphs(model, 3, 64, amp_dtype, device='cpu', force=True, autocast_cache=cache)
    result = handle.wait(timeout=300)
    gc.collect()
    assert len(copies) == 1 and copies[0]() is None  # the copy (and its gradients) is not kept for the whole run
    # one graph per stage, under autocast too (a stage's first block up-casts the downsampling conv's bf16 output,
    # its shortcut, to the float32 that the later blocks receive), as the real step below
    graphs = 4
    assert result['error'] is None and result['graphs'] == graphs and len(counted_graphs) == graphs, result
    assert f'{graphs} training graphs traced ahead of the first step' in capsys.readouterr().out
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    autocast = dict(dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)
    with torch.autocast('cpu', cache_enabled=cache, **autocast):
        out = model(torch.randn(3, 3, 64, 64))
    out.float().sum().backward()
    assert len(counted_graphs) == graphs and len(SLaK._TAIL_STATE['keys']) == graphs
    if amp_dtype is not None:
        with torch.autocast('cpu', cache_enabled=not cache, **autocast):
            model(torch.randn(3, 3, 64, 64)).float().sum().backward()
        assert len(counted_graphs) == 2 * graphs


def test_stage_first_block_shares_the_later_blocks_tail_graph_and_outputs(tail_backend, counted_graphs, monkeypatch):
    """Under autocast a stage's first block receives the downsampling conv's bf16 output and its later blocks the
    float32 sum (the layer scale promotes): the compiled path up-casts the first block's shortcut, so both meet one
    graph (training and evaluation each), with the eager block's output bit for bit and the same gradients up to
    the bf16 rounding of the input gradient's sum."""
    torch.manual_seed(0)
    blocks = [SLaK.Block(16, drop_path=0.3, kernel_size=(7, 3), Decom=True, layer_scale_init_value=0.5,
                         conv_impl='torch').train() for _ in range(2)]
    x16 = torch.randn(4, 16, 8, 8).to(torch.bfloat16)
    results = {}
    for compiled in (False, True):
        monkeypatch.setattr(SLaK.Block, 'COMPILE_TAIL', compiled)
        for b in blocks:
            b.zero_grad()
        x = x16.detach().requires_grad_()
        torch.manual_seed(1)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            y0 = blocks[0](x)
            y1 = blocks[1](y0)
        y1.float().square().sum().backward()
        results[compiled] = (y0.detach(), y1.detach(), x.grad,
                             {k: p.grad.clone() for k, p in blocks[0].named_parameters()})
    assert len(counted_graphs) == 1 and len(SLaK._TAIL_STATE['keys']) == 1  # one graph for both blocks
    (e0, e1, edx, eg), (c0, c1, cdx, cg) = results[False], results[True]
    assert c0.dtype == e0.dtype == torch.float32 and torch.equal(c0, e0) and torch.equal(c1, e1)
    torch.testing.assert_close(cdx, edx, rtol=1e-2, atol=1e-3)
    assert cdx.dtype == torch.bfloat16
    for k in eg:
        torch.testing.assert_close(cg[k], eg[k], rtol=1e-4, atol=1e-6, msg=k)
    for b in blocks:
        b.eval()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        out = blocks[1](blocks[0](x16))
    assert len(counted_graphs) == 2 and len(SLaK._TAIL_STATE['keys']) == 2  # one evaluation graph for both
    monkeypatch.setattr(SLaK.Block, 'COMPILE_TAIL', False)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        assert torch.equal(out, blocks[1](blocks[0](x16)))


def test_graph_warm_up_starts_after_the_kernel_precompile_and_reports_failures(capsys, monkeypatch):
    """The background step runs only once the kernel precompile's thread has ended (else it would compile the same
    kernels a second time; its imports run meanwhile), and a failing step is reported, not raised: the first step
    then traces as before."""
    import threading
    import time as time_module
    events = []
    precompile = type('Precompile', (), {})()
    precompile.thread = threading.Thread(target=lambda: (time_module.sleep(0.3), events.append('kernels')))
    precompile.thread.start()
    result = SLaK.GraphWarmUp(lambda: events.append('step'), after=precompile,
                              meanwhile=lambda: events.append('imports')).wait(timeout=60)
    # what need not wait (the compiler's imports) runs while the precompile does
    assert events == ['imports', 'kernels', 'step'] and result['error'] is None
    imported = []
    monkeypatch.setattr(SLaK, '_import_tail_compiler', lambda: imported.append(1))
    SLaK.GraphWarmUp(lambda: None).wait(timeout=60)
    assert imported == [1]  # by default: Inductor's modules
    monkeypatch.undo()
    SLaK._import_tail_compiler()
    assert 'torch._inductor.compile_fx' in sys.modules

    def broken():
        raise RuntimeError('out of memory')

    result = SLaK.GraphWarmUp(broken).wait(timeout=60)
    assert 'RuntimeError: out of memory' in result['error']
    assert 'failed, the first step traces them: RuntimeError: out of memory' in capsys.readouterr().out


def test_warm_step_graphs_applies_only_where_asked_and_safe(monkeypatch, tail_backend):
    """On by default ('auto'), CUDA only; off with SLAK_WARM_GRAPHS=0; never with SyncBatchNorm (collectives in a
    second thread), stage checkpointing (other graphs) or the tails not compiled."""
    model = timm.create_model('SLaK_tiny', num_classes=5, depths=[1, 1, 1, 1], width_factor=0.1,
                              kernel_size=[7, 5, 5, 3, 3], Decom=True, conv_impl='torch')
    monkeypatch.setattr(SLaK, 'WARM_GRAPHS', False)
    assert SLaK.warm_step_graphs(model, 2, 64, None, device='cuda') is None
    for setting in (True, 'auto'):
        monkeypatch.setattr(SLaK, 'WARM_GRAPHS', setting)
        assert SLaK.warm_step_graphs(model, 2, 64, None, device='cpu') is None
    model.set_grad_checkpointing(True)
    assert SLaK.warm_step_graphs(model, 2, 64, None, device='cpu', force=True) is None
    model.set_grad_checkpointing(False)
    monkeypatch.setattr(SLaK.Block, 'COMPILE_TAIL', False)
    assert SLaK.warm_step_graphs(model, 2, 64, None, device='cpu', force=True) is None
    monkeypatch.setattr(SLaK.Block, 'COMPILE_TAIL', True)
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert SLaK.warm_step_graphs(synced, 2, 64, None, device='cpu', force=True) is None
    assert SLaK.warm_step_graphs(torch.nn.Linear(2, 2), 2, 64, None, device='cpu', force=True) is None


def test_precompile_step_kernels_plans_every_layer_at_its_stage_size(monkeypatch, capsys):
    """The training step's kernels are compiled ahead in a background thread: the launches of every Triton layer at
    its stage's map size (input 64: 16, 8, 4, 2) at the training batch and dtype, handed to the compiler once; the
    summary line reports them, and a failure is reported, not raised. Not on CPU, nor with SLAK_PRECOMPILE=0."""
    if SLaK._load_fast_dwconv() is None:
        pytest.skip('triton is not installed')
    kernels = sys.modules['depthwise_conv2d_implicit_gemm']._kernels
    model = _tiny_cutlass_slak()
    assert SLaK.precompile_step_kernels(model, 3, 64, torch.bfloat16, device='cpu') is None
    monkeypatch.setattr(SLaK, 'PRECOMPILE', False)  # SLAK_PRECOMPILE=0
    assert SLaK.precompile_step_kernels(model, 3, 64, torch.bfloat16, device='cuda') is None
    monkeypatch.setattr(SLaK, 'PRECOMPILE', 'auto')  # unset: on, for CUDA only
    assert SLaK.precompile_step_kernels(model, 3, 64, torch.bfloat16, device='cpu') is None
    monkeypatch.setattr(kernels, '_specialised_sizes', set())
    seen = []
    monkeypatch.setattr(kernels, 'precompile', lambda launches, workers: seen.extend(launches) or len(launches))
    handle = SLaK.precompile_step_kernels(model, 3, 64, torch.bfloat16, device='cpu', force=True)
    result = handle.wait(timeout=60)
    assert result['error'] is None and result['kernels'] == len(seen) > 0
    expected = []
    for c, kh, kw, stride in SLaK.fast_dwconv_layers(model, torch.bfloat16):
        expected += kernels.layer_launches(3, c, 64 // stride, 64 // stride, kh, kw, torch.bfloat16)
    # and every block's fused branch BatchNorm, forward and backward (Decom 7x7 ... 5x5 with a 3x3 small kernel: 3
    # branches; stage 4's 3x3 kernel is not decomposed: 2)
    bn_kernels = sys.modules['depthwise_conv2d_implicit_gemm']._bn_kernels
    blocks = SLaK.fused_branch_bn_blocks(model)
    assert blocks == [(c, nb, 4 * 2 ** i, 1) for i, (c, nb) in enumerate(zip(model.dims, (3, 3, 3, 2)))]
    assert SLaK.fused_branch_bn_blocks(model.eval()) == []  # branch_bn_sum's own rule: training-mode BNs only
    model.train()
    for c, nb, stride, world in blocks:
        expected += bn_kernels.block_launches(kernels._LaunchCapture, 3, c, 64 // stride, 64 // stride, nb,
                                              torch.bfloat16, None, world)
    # and every block's one-pass input gradient under autocast (the branch handles' bf16 gradients + the shortcut's)
    fan_in = SLaK.fan_in_blocks(model, torch.bfloat16)
    assert fan_in == [(c, nb, 4 * 2 ** i) for i, (c, nb) in enumerate(zip(model.dims, (3, 3, 3, 2)))]
    assert SLaK.fan_in_blocks(model, torch.float32) == []  # no autocast: no fan-out
    for c, nb, stride in fan_in:
        expected += bn_kernels.fan_in_launches(kernels._LaunchCapture, 3, c, 64 // stride, 64 // stride, nb,
                                               torch.bfloat16)
    assert sum(kern.fn.__name__.startswith('bn_') for kern, _, _ in seen) == 6 * len(blocks)
    assert sum(kern.fn.__name__ == 'fan_in_kernel' for kern, _, _ in seen) == len(fan_in)
    assert [(kern.fn.__name__, args, kw) for kern, args, kw in seen] == \
           [(kern.fn.__name__, args, kw) for kern, args, kw in expected]
    assert {args[:1] for kern, args, _ in seen
            if not kern.fn.__name__.startswith(('bn_', 'fan_in_'))} == {(torch.bfloat16,)}
    # (the depthwise kernels' input tensor, as its dtype)
    assert f'{len(seen)} versions compiled ahead of the first step' in capsys.readouterr().out

    def broken(launches, workers):
        raise RuntimeError('no GPU here')

    monkeypatch.setattr(kernels, 'precompile', broken)
    result = SLaK.precompile_step_kernels(model, 3, 64, torch.bfloat16, device='cpu', force=True).wait(timeout=60)
    assert result['kernels'] == 0 and 'RuntimeError: no GPU here' in result['error']
    assert 'failed, the first step compiles them' in capsys.readouterr().out


def test_fp32_twin_warm_up_leaves_out_the_layers_cudnn_runs():
    """SLaK-T's layers in fp32 on CUDA (detection's default): the long branches of stages 1-3 run our kernels, the
    5x5 branches and all of stage 4 (13x5, 5x13, 5x5) run cuDNN, so the background compiles skip them."""
    if SLaK._load_fast_dwconv() is None:
        pytest.skip('triton is not installed')
    model = timm.create_model('SLaK_tiny', num_classes=5, depths=[1, 1, 1, 1], width_factor=1.3,
                              kernel_size=[51, 49, 47, 13, 5], Decom=True, conv_impl='cutlass', device='meta')
    c = model.dims
    assert SLaK.fast_dwconv_layers(model, torch.float32, 'cuda') == [
        (c[0], 51, 5, 4), (c[0], 5, 51, 4), (c[1], 49, 5, 8), (c[1], 5, 49, 8), (c[2], 47, 5, 16), (c[2], 5, 47, 16)]
    assert len(SLaK.fast_dwconv_layers(model, torch.bfloat16, 'cuda')) == 12


def test_warm_size_agnostic_kernels_splits_the_plan_over_processes(monkeypatch):
    """Detection's background compiles: only in twin mode on CUDA (forced here on CPU, as a dry run); every worker
    plans the same maps and takes its own share, together all of them. (The launches themselves are the
    launchers that the interpreter tests of tests/test_dwconv.py run through the twins.)"""
    model = _tiny_cutlass_slak()
    if SLaK._load_fast_dwconv() is None or sys.modules['depthwise_conv2d_implicit_gemm']._kernels is None:
        pytest.skip('triton is not installed')
    kernels = sys.modules['depthwise_conv2d_implicit_gemm']._kernels
    assert SLaK.warm_size_agnostic_kernels(model, 2, torch.float32, device='cpu') is None  # not CUDA
    monkeypatch.setattr(kernels, 'SPECIALISED_SIZES', 8)
    assert SLaK.warm_size_agnostic_kernels(model, 2, torch.float32, device='cuda') is None  # not in twin mode
    monkeypatch.setenv('LOCAL_RANK', '1')  # the machine's first rank warms the cache for all of them
    assert SLaK.warm_size_agnostic_kernels(model, 2, torch.float32, device='cpu', force=True) is None
    monkeypatch.setenv('LOCAL_RANK', '0')
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    warmer = SLaK.warm_size_agnostic_kernels(model, 2, torch.float32, device='cpu', sides=[32, 64, 96, 160],
                                             processes=2, force=True, dry_run=True)
    summary = warmer.wait(timeout=240)
    assert summary['failed'] == [] and summary['processes'] == 2
    reports = sorted(summary['reports'], key=lambda r: r['worker'])
    planned = reports[0]['planned']
    assert [r['planned'] for r in reports] == [planned, planned] and planned >= len(SLaK.fast_dwconv_layers(model))
    assert [r['maps'] for r in reports] == [(planned + 1) // 2, planned // 2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_one_pass_input_gradient_and_layer_norm_match_the_old_ops():
    """Session 11's two training-path changes on the GPU, where CPU tests can only reach them through the
    interpreter: the block input's gradient summed in one kernel (fan_in_sum) gives the same bits as PyTorch's
    sums in the same order, and the channels_first LayerNorm through F.layer_norm stays within bf16 rounding of
    the original's spelled-out ops (bf16 autocast, compiled tails, drop path with the same masks)."""
    assert SLaK._load_fast_dwconv() is not None
    fast = sys.modules[SLaK._DWCONV_MODULE_NAME]  # the module (the loader returns its conv class)
    torch.manual_seed(0)
    m = timm.create_model('SLaK_tiny', num_classes=10, depths=[1, 1, 2, 1], width_factor=1.3, drop_path_rate=0.3,
                          kernel_size=[13, 13, 13, 13, 5], Decom=True, layer_scale_init_value=0.5).cuda().train()
    assert SLaK.fan_in_blocks(m, torch.bfloat16)  # the path under test is taken
    x = torch.randn(8, 3, 64, 64, device='cuda')

    def grads():
        m.zero_grad()
        torch.manual_seed(1)
        with torch.autocast('cuda', dtype=torch.bfloat16):
            y = m(x)
        y.float().square().sum().backward()
        return [y.float()] + [p.grad.clone() for p in m.parameters() if p.grad is not None]

    try:
        fast.FUSED_FAN_IN = True
        fused = grads()
        fast.FUSED_FAN_IN = False
        summed = grads()
        SLaK.LayerNorm.FUSED_CHANNELS_FIRST = False
        original = grads()
    finally:
        fast.FUSED_FAN_IN = True
        SLaK.LayerNorm.FUSED_CHANNELS_FIRST = True
    assert len(fused) == len(summed) == len(original) > 2
    for a, b in zip(fused, summed):
        assert torch.equal(a, b)
    for a, b in zip(fused, original):
        assert ((a - b).norm() / b.norm().clamp_min(1e-12)).item() < 2e-2


def test_tail_shapes_dynamic_compiles_one_graph_for_every_stage(tail_backend, counted_graphs, monkeypatch):
    """SLAK_TAIL_SHAPES=dynamic: the four stages' blocks (four channel counts and map sizes) share one training graph
    and one evaluation graph (and the folded decomposed form one more), with the eager blocks' loss, gradients and
    logits; a bad value is refused by name."""
    monkeypatch.setattr(SLaK, 'TAIL_SHAPES', 'dynamic')
    torch.manual_seed(0)
    m = timm.create_model('SLaK_tiny', num_classes=5, depths=[2, 2, 2, 2], width_factor=0.1, drop_path_rate=0.2,
                          kernel_size=[7, 5, 5, 3, 3], Decom=True, conv_impl='torch', layer_scale_init_value=0.5)
    m = m.double().train()
    assert len({s[0].pwconv1.in_features for s in m.stages}) == 4
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    results = [float64_step(m, x, compiled, monkeypatch) for compiled in (False, True)]
    assert len(counted_graphs) == 1 and len(SLaK._TAIL_STATE['keys']) == 1
    assert_same_step(*results)
    m.eval()
    images = torch.randn(5, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        logits = [m(images[:3]), m(images)]  # two batch sizes: the same evaluation graph
        assert len(counted_graphs) == 2
        monkeypatch.setattr(SLaK.Block, 'COMPILE_TAIL', False)
        torch.testing.assert_close(logits[0], m(images[:3]), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(logits[1], m(images), rtol=1e-12, atol=1e-12)
        # the folded decomposed form (two conv outputs and a bias into the tail): one more graph for every stage
        m.reparameterize(decomposed=True)
        eager_folded = m(images[:3])
        monkeypatch.setattr(SLaK.Block, 'COMPILE_TAIL', True)
        torch.testing.assert_close(m(images[:3]), eager_folded, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(eager_folded, logits[0], rtol=1e-9, atol=1e-9)  # (folding is exact)
        assert len(counted_graphs) == 3
    monkeypatch.setenv('SLAK_TAIL_SHAPES', 'symbolic')
    with pytest.raises(ValueError, match="SLAK_TAIL_SHAPES must be 'static'"):
        SLaK._tail_shapes()
