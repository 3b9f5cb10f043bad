"""Tests for sparse_core: prune-rate schedule, ERK/SNIP init, exact prune/grow, AMP, checkpointing, sparse EMA."""
import copy
import io
import math
import os
import sys
from argparse import Namespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import SLaK  # noqa: E402
import sparse_core  # noqa: E402
from sparse_core import CosineDecay, Masking, ModelEma, count_nonzero_params, erk_densities  # noqa: E402


def tiny_model(seed: int = 0, decom: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    return SLaK.SLaK(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), kernel_size=[7, 7, 5, 5, 3], Decom=decom,
                     num_classes=10)


def make_args(**overrides) -> Namespace:
    fields = dict(sparse_init='uniform', sparsity=0.5, update_frequency=None, fix=False, only_L=False, seed=0,
                  device='cpu', prune='magnitude', growth='random', redistribution='none', prune_rate=0.3)
    fields.update(overrides)
    return Namespace(**fields)


def batches(n: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 10, (4,), generator=gen)) for _ in range(n)]


def build(args: Namespace, seed: int = 0, optimizer: str = 'adamw', loader=None, log_writer=None, model=None,
          mask_state=None, **masking_kwargs):
    model = model if model is not None else tiny_model(seed)
    if optimizer == 'adamw':
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, weight_decay=0.05)
    decay = CosineDecay(args.prune_rate, T_max=20)
    mask = Masking(opt, loader, decay, prune_mode=args.prune, growth_mode=args.growth,
                   redistribution_mode=args.redistribution, args=args, log_writer=log_writer, **masking_kwargs)
    mask.add_module(model, mask_state=mask_state)
    return model, opt, mask


def fp32_step(model, opt, mask, x, y):
    F.cross_entropy(model(x), y).backward()
    mask.step()
    opt.zero_grad()


def assert_masked_zero(mask: Masking):
    for name, m in mask.masks.items():
        assert torch.all(mask.params[name][~m] == 0), name


# ---- CosineDecay -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('init_step', [0, 7])
def test_cosine_decay_matches_closed_form_and_torch_scheduler(init_step):
    p0, t_max = 0.3, 50
    decay = CosineDecay(p0, T_max=t_max, init_step=init_step)
    dummy = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=p0)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(dummy, t_max, eta_min=0.005)
    for _ in range(init_step):
        dummy.step()
        reference.step()
    for n in range(init_step, init_step + 2 * t_max + 5):
        closed = 0.005 + (p0 - 0.005) * (1 + math.cos(math.pi * n / t_max)) / 2
        assert decay.get_dr() == pytest.approx(closed, abs=1e-15)
        assert decay.get_dr() == pytest.approx(dummy.param_groups[0]['lr'], abs=1e-12)
        decay.step()
        dummy.step()
        reference.step()
    restored = CosineDecay(0.9, T_max=3)
    restored.load_state_dict(decay.state_dict())
    assert restored.get_dr() == decay.get_dr()
    with pytest.raises(ValueError, match='T_max'):
        CosineDecay(0.3, T_max=0)


# ---- ERK ------------------------------------------------------------------------------------------------------------
def erk_reference(shapes, density):
    """Independent float64 recomputation of the original's ERK iteration."""
    n = np.array([np.prod(s) for s in shapes], dtype=np.float64)
    raw = np.array([np.sum(s) / np.prod(s) for s in shapes], dtype=np.float64)
    dense = np.zeros(len(shapes), dtype=bool)
    while True:
        eps = (np.sum(n[~dense]) * density - np.sum(n[dense]) * (1 - density)) / np.sum(raw[~dense] * n[~dense])
        top = raw[~dense].max()
        if top * eps <= 1:
            return np.where(dense, 1.0, eps * raw), dense
        dense |= (raw == top)


def test_erk_densities_for_slak_tiny_match_formula():
    import timm
    model = timm.create_model('SLaK_tiny', kernel_size=[51, 49, 47, 13, 5], width_factor=1.3, Decom=True)
    names = [n for n, p in model.named_parameters() if p.dim() in (2, 4)]
    shapes = [tuple(p.shape) for p in model.parameters() if p.dim() in (2, 4)]
    expected, expected_dense = erk_reference(shapes, 0.6)
    params = dict(model.named_parameters())
    untouched = {n: params[n].detach().clone() for n, d in zip(names, expected) if d >= 0.99}
    _, _, mask = build(make_args(sparse_init='ERK', sparsity=0.4), model=model)
    assert list(mask.params) == names and len(names) == 95
    counts = np.array([np.prod(s) for s in shapes], dtype=np.float64)
    assert np.sum(expected * counts) == pytest.approx(0.6 * counts.sum(), rel=1e-12)  # the budget is met exactly
    ours, ours_dense = erk_densities(dict(zip(names, shapes)), 0.6)
    np.testing.assert_allclose([ours[n] for n in names], expected, rtol=1e-12, atol=0)
    assert set(ours_dense) == {n for n, d in zip(names, expected_dense) if d}
    assert any(expected_dense)  # the formula does force some layers of SLaK-T dense at 40% sparsity
    # Masks: expected-dense (>= 0.99) layers are popped and untouched; the others follow the density (Bernoulli).
    for name, density, shape in zip(names, expected, shapes):
        if density >= 0.99:
            assert name not in mask.masks and torch.equal(mask.params[name], untouched[name])
        else:
            n = mask.masks[name].numel()
            assert abs(mask.masks[name].float().mean().item() - density) <= 5 * math.sqrt(density * (1 - density) / n)
            assert mask.masks[name].dtype == torch.bool


# ---- masks hold under fp32 / bf16 / fp16 ----------------------------------------------------------------------------
@pytest.mark.parametrize('precision', ['fp32', 'bf16', 'fp16_scaler'])
def test_masked_weights_stay_zero_and_counts_fixed(precision):
    args = make_args(update_frequency=3)
    model, opt, mask = build(args)
    counts = {n: int(m.sum()) for n, m in mask.masks.items()}
    scaler = torch.amp.GradScaler('cpu') if precision == 'fp16_scaler' else None
    versions = mask.mask_version
    stepped = 0
    for x, y in batches(7):
        if precision == 'fp32':
            fp32_step(model, opt, mask, x, y)
        else:
            dtype = torch.bfloat16 if precision == 'bf16' else torch.float16
            with torch.autocast('cpu', dtype=dtype):
                loss = F.cross_entropy(model(x), y)
            if scaler is None:
                loss.backward()
                mask.step()
            else:
                scaler.scale(loss).backward()
                scale_before = scaler.get_scale()
                scaler.step(opt)
                scaler.update()
                mask.after_step(scaler.get_scale() >= scale_before)
                stepped += scaler.get_scale() >= scale_before
            opt.zero_grad()
        assert_masked_zero(mask)
        assert {n: int(m.sum()) for n, m in mask.masks.items()} == counts
    steps = 7 if scaler is None else stepped  # fp16: the scaler skips the first step(s) while finding its scale
    assert steps >= 4 and mask.steps == steps and mask.mask_version == versions + steps // 3
    assert mask.prune_rate == pytest.approx(CosineDecay(0.3, T_max=20, init_step=steps).get_dr())


def test_skipped_scaler_step_does_not_advance_schedule():
    args = make_args(update_frequency=1)
    model, opt, mask = build(args)
    scaler = torch.amp.GradScaler('cpu')
    x, y = batches(1)[0]
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    name = next(iter(mask.masks))
    mask.params[name].grad.view(-1)[0] = float('inf')
    before = {n: m.clone() for n, m in mask.masks.items()}
    scale_before = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    stepped = scaler.get_scale() >= scale_before
    assert not stepped
    inactive = (~mask.masks[name]).nonzero()[0].tolist()
    with torch.no_grad():
        mask.params[name][tuple(inactive)] = 1.0  # something wrote into a pruned position: re-applying must fix it
    rate = mask.prune_rate
    mask.after_step(stepped)
    assert mask.steps == 0 and mask.prune_rate == rate and mask.prune_rate_decay.last_epoch == 0
    assert all(torch.equal(before[n], m) for n, m in mask.masks.items())  # no prune/grow although u=1
    assert_masked_zero(mask)
    mask.after_step(True)
    assert mask.steps == 1 and mask.prune_rate < rate


# ---- prune / grow ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('prune', ['magnitude', 'SET'])
@pytest.mark.parametrize('growth', ['random', 'gradient', 'momentum', 'momentum_neuron'])
def test_prune_grow_exact_counts_and_reset_state(prune, growth):
    args = make_args(prune=prune, growth=growth)
    model, opt, mask = build(args)
    data = batches(3)
    for x, y in data[:2]:
        fp32_step(model, opt, mask, x, y)
    F.cross_entropy(model(data[2][0]), data[2][1]).backward()
    opt.step()
    mask.apply_mask()
    old = {n: m.clone() for n, m in mask.masks.items()}
    weights = {n: mask.params[n].detach().clone() for n in mask.masks}
    mask.truncate_weights()
    for name, m in mask.masks.items():
        assert int(m.sum()) == int(old[name].sum()), name
        assert mask.name2removed[name] == math.ceil(mask.prune_rate * int(old[name].sum()))
        changed = m ^ old[name]
        grown, pruned = m & ~old[name], old[name] & ~m
        assert int(grown.sum()) == int(pruned.sum()) <= mask.name2removed[name]
        state = opt.state[mask.params[name]]
        for key in ('exp_avg', 'exp_avg_sq'):
            assert torch.all(state[key][changed] == 0)
        assert torch.all(mask.params[name][grown] == 0)
        if prune == 'magnitude' and pruned.any():
            survivors = old[name] & m & (mask.params[name].detach() == weights[name])  # not pruned-and-regrown
            assert weights[name][pruned].abs().max() <= weights[name][survivors].abs().min()
    assert_masked_zero(mask)


def test_set_prune_removes_most_negative_half():
    args = make_args(prune='SET')
    model, opt, mask = build(args)
    name = 'stages.3.0.pwconv1.weight'
    m, w = mask.masks[name].clone(), mask.params[name].detach().clone()
    new = sparse_core.magnitude_and_negativity_prune(mask, m, w, name)
    removed = m & ~new
    num_remove = math.ceil(mask.prune_rate * int(m.sum()))
    assert int(removed.sum()) == num_remove
    most_negative = torch.sort(w[m]).values[:num_remove // 2]
    assert set(most_negative.tolist()) <= set(w[removed].tolist())


def test_sgd_momentum_buffer_reset_on_growth():
    args = make_args(growth='momentum')
    model, opt, mask = build(args, optimizer='sgd')
    for x, y in batches(2):
        fp32_step(model, opt, mask, x, y)
    old = {n: m.clone() for n, m in mask.masks.items()}
    mask.truncate_weights()
    for name, m in mask.masks.items():
        assert int(m.sum()) == int(old[name].sum())
        assert torch.all(opt.state[mask.params[name]]['momentum_buffer'][m ^ old[name]] == 0)


def test_fix_keeps_masks_static_without_mutating_args():
    args = make_args(update_frequency=1, fix=True)
    model, opt, mask = build(args)
    before = {n: m.clone() for n, m in mask.masks.items()}
    for x, y in batches(3):
        fp32_step(model, opt, mask, x, y)
    assert args.update_frequency == 1 and mask.update_frequency is None
    assert all(torch.equal(before[n], m) for n, m in mask.masks.items())
    assert_masked_zero(mask)


# ---- checkpointing --------------------------------------------------------------------------------------------------
def test_save_load_continue_is_bit_identical():
    args = make_args(update_frequency=2, growth='random')
    data = batches(6)
    model, opt, mask = build(args)
    for x, y in data[:3]:
        fp32_step(model, opt, mask, x, y)
    buffer = io.BytesIO()
    torch.save({'model': model.state_dict(), 'optimizer': opt.state_dict(), 'mask': mask.state_dict()}, buffer)
    for x, y in data[3:]:
        fp32_step(model, opt, mask, x, y)

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    assert all(not k.startswith('module.') for k in checkpoint['mask']['masks'])
    assert checkpoint['mask']['grown'] == {}  # step 3 is one step past the prune/grow: the EMA needs nothing
    resumed = tiny_model(seed=123)
    resumed.load_state_dict(checkpoint['model'])
    args_resumed = make_args(update_frequency=2, growth='random', sparse_init='snip')  # SNIP would need a loader
    model2, opt2, mask2 = build(args_resumed, model=resumed, mask_state=checkpoint['mask'])
    opt2.load_state_dict(checkpoint['optimizer'])
    assert mask2.steps == 3
    for x, y in data[3:]:
        fp32_step(model2, opt2, mask2, x, y)
    assert mask2.mask_version > 1 and mask.steps == mask2.steps == 6
    assert mask2.prune_rate == mask.prune_rate
    assert mask.masks.keys() == mask2.masks.keys()
    assert all(torch.equal(mask.masks[n], mask2.masks[n]) for n in mask.masks)
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_resume_mode_uses_zero_pattern_of_weights():
    model = tiny_model()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() in (2, 4):
                p.mul_(torch.rand_like(p) < 0.3)
    expected = {n: p != 0 for n, p in model.named_parameters() if p.dim() in (2, 4)}
    _, _, mask = build(make_args(sparse_init='resume'), model=model)
    assert mask.masks.keys() == expected.keys()
    assert all(torch.equal(mask.masks[n], expected[n]) for n in expected)


def test_channels_last_weights_prune_and_grow():
    """--channels_last: masks built from `weight != 0` inherit the layout; prune/grow must still index them."""
    model = tiny_model().to(memory_format=torch.channels_last)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() in (2, 4):
                p.mul_(torch.rand_like(p) < 0.5)
    _, opt, mask = build(make_args(sparse_init='resume', update_frequency=1), model=model)
    name = 'downsample_layers.0.0.weight'  # the stem conv: 3 input channels, really strided in channels_last
    assert name in mask.masks and not mask.params[name].is_contiguous()
    counts = {n: int(m.sum()) for n, m in mask.masks.items()}
    x, y = batches(1)[0]
    fp32_step(model, opt, mask, x.contiguous(memory_format=torch.channels_last), y)
    assert mask.mask_version == 2 and {n: int(m.sum()) for n, m in mask.masks.items()} == counts
    assert_masked_zero(mask)


# ---- bad input ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('field, value, message', [
    ('sparse_init', 'GMP', '--sparse_init must be one of'),
    ('prune', 'global_magnitude', 'never worked'),
    ('growth', 'random_unfired', 'never worked'),
    ('growth', 'mix', '--growth must be one of'),
    ('redistribution', 'nonzeros', '--redistribution must be one of'),
    ('sparsity', 1.0, '--sparsity must be in'),
    ('update_frequency', 0, 'update-frequency'),
])
def test_bad_names_raise(field, value, message):
    with pytest.raises(ValueError, match=message):
        build(make_args(**{field: value}))


def test_only_L_without_decomposed_kernels_raises_and_with_them_masks_only_lora():
    with pytest.raises(ValueError, match='only-L'):
        build(make_args(only_L=True), model=tiny_model(decom=False))
    _, _, mask = build(make_args(only_L=True))
    assert mask.masks and all('large_kernel.LoRA' in n for n in mask.masks)


def test_snip_without_loader_raises():
    with pytest.raises(ValueError, match='train_loader'):
        build(make_args(sparse_init='snip'))


# ---- SNIP -----------------------------------------------------------------------------------------------------------
def snip_reference(model, x, y, names, density):
    clone = copy.deepcopy(model)
    clone.zero_grad(set_to_none=True)
    F.cross_entropy(clone(x), y).backward()
    params = dict(clone.named_parameters())
    scores = {n: (params[n].detach().double() * params[n].grad.double()).abs().float() for n in names}
    flat = torch.cat([s.flatten() for s in scores.values()])
    tau = torch.sort(flat, descending=True).values[int(flat.numel() * density) - 1]
    return {n: s > tau for n, s in scores.items()}


def test_snip_topk_keeps_top_scores_and_snip_randomises_positions_without_touching_live_model():
    model = tiny_model()
    x, y = batches(1, seed=5)[0]
    F.cross_entropy(model(x), y).backward()  # live model has gradients and BN statistics to preserve
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    names = [n for n, p in model.named_parameters() if p.dim() in (2, 4)]
    expected = snip_reference(model, x, y, names, 0.5)

    _, _, topk = build(make_args(sparse_init='snip_topk'), model=model, loader=[(x, y)])
    for name in names:
        if expected[name].float().mean() >= 0.99:
            assert name not in topk.masks
        else:
            assert torch.equal(topk.masks[name], expected[name]), name
    for n, p in model.named_parameters():
        want = params[n] * topk.masks[n] if n in topk.masks else params[n]
        assert torch.equal(p.detach(), want) and torch.equal(p.grad, grads[n]), n
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())

    model2 = tiny_model()
    _, _, snip = build(make_args(sparse_init='snip'), model=model2, loader=[(x, y)])
    name = 'stages.3.0.pwconv1.weight'  # 16,384 weights: Bernoulli noise is small
    density = expected[name].float().mean().item()
    assert 0.05 < density < 0.95
    assert abs(snip.masks[name].float().mean().item() - density) < 0.03
    overlap = (snip.masks[name] & expected[name]).sum().item() / expected[name].sum().item()
    assert abs(overlap - density) < 0.05  # random positions: overlap with the top-k set is chance level


# ---- logging / counting ---------------------------------------------------------------------------------------------
class ScalarWriter:
    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))


class UpdateWriter:
    """Mimics utils.TensorboardLogger: scalars land on its own (micro-batch) step unless one is passed."""

    def __init__(self):
        self.calls = []
        self.step = 0

    def update(self, head, step=None, **kwargs):
        self.calls.append((head, self.step if step is None else step, kwargs))


def parse_table(lines):
    """{name: (non-zeros, size, density or None for dense, moved or None)} from Masking.layer_table lines."""
    rows = {}
    for line in lines:
        name, _, nonzeros, _, size, *rest = line.split()
        density = float(rest[1]) if rest[0] == 'density' else None
        moved = int(rest[3]) if len(rest) > 2 else None
        rows[name] = (int(nonzeros), int(size), density, moved)
    return rows


def test_one_console_line_per_update_table_in_file_and_log_writer(capsys, tmp_path):
    model = tiny_model()
    nonzero_dense = {n: p.detach() != 0 for n, p in model.named_parameters()}
    writer = ScalarWriter()
    report = tmp_path / 'sparsity.txt'
    model, opt, mask = build(make_args(update_frequency=2), model=model, log_writer=writer, report_path=str(report))
    removed = sum(int((nonzero_dense[n] & ~m).sum()) for n, m in mask.masks.items())
    assert count_nonzero_params(model) == sum(int(v.sum()) for v in nonzero_dense.values()) - removed
    kept = sum(int(m.sum()) for m in mask.masks.values())
    eligible = sum(p.numel() for p in mask.params.values())  # every eligible tensor stayed sparse at 50 %
    assert capsys.readouterr().out.splitlines() == [
        f'sparse masks (uniform): {len(mask.masks)} sparse layers, sparsity {1 - kept / eligible:.4f} of the '
        f'eligible weights (asked 0.5000)']
    for x, y in batches(2):
        fp32_step(model, opt, mask, x, y)
    lines = capsys.readouterr().out.splitlines()
    moved = sum(mask.name2removed.values())
    assert len(lines) == 1 and lines[0].startswith(f'prune/grow at step 2: {moved} of {kept} active weights moved '
                                                   f'(prune rate {mask.prune_rate:.4f}), density '
                                                   f'{mask.overall_density():.4f}, ')
    assert lines[0].endswith(' ms') and moved > 0
    blocks = report.read_text().strip().split('\n\n')
    assert [b.splitlines()[0] for b in blocks] == [f'sparse masks (uniform): {len(mask.masks)} sparse layers, '
                                                   f'sparsity {1 - kept / eligible:.4f} of the eligible weights '
                                                   f'(asked 0.5000)', lines[0]]
    table = parse_table(blocks[1].splitlines()[1:])
    assert list(table) == list(mask.params)
    for name, m in mask.masks.items():
        assert table[name] == (int(m.sum()), m.numel(), round(int(m.sum()) / m.numel(), 4), mask.name2removed[name])
    mask.print_nonzero_counts()  # the original's per-layer print: the same table, then the prune rate
    assert capsys.readouterr().out.splitlines() == blocks[1].splitlines()[1:] + [f'Prune rate: {mask.prune_rate}']
    mask.verbose = True  # --verbose: the table on the console too, before the update's line
    for x, y in batches(2, seed=3):
        fp32_step(model, opt, mask, x, y)
    lines = capsys.readouterr().out.splitlines()
    assert lines == report.read_text().strip().split('\n\n')[2].splitlines()[1:] + [lines[-1]]
    assert lines[-1].startswith('prune/grow at step 4: ')
    tags = {(tag, step) for tag, _, step in writer.scalars}
    for step in (0, 2):
        assert ('sparsity/overall', step) in tags and ('sparsity/prune_rate', step) in tags
        assert all((f'sparsity/{n}', step) in tags for n in mask.masks)
    overall = [v for t, v, s in writer.scalars if t == 'sparsity/overall' and s == 2][0]
    assert overall == pytest.approx(sum(int(m.sum()) for m in mask.masks.values()) /
                                    sum(m.numel() for m in mask.masks.values()))

    other = UpdateWriter()
    model, opt, mask = build(make_args(update_frequency=1), log_writer=other)
    head, step, scalars = other.calls[0]
    assert head == 'sparsity' and step == 0 and 'overall' in scalars and 'head.weight' in scalars
    other.step = 40  # e.g. micro-batch 40 with --update_freq 8: optimizer step 1 (mask.steps) is not the x axis
    fp32_step(model, opt, mask, *batches(1)[0])
    assert mask.steps == 1 and other.calls[-1][:2] == ('sparsity', 40)


# ---- EMA ------------------------------------------------------------------------------------------------------------
class Wrapper(nn.Module):
    """Stands in for DDP: parameters are named `module.*`."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


def ema_step(model, opt, mask, ema, x, y):
    """engine.py's order: backward, mask.step() (optimizer step, re-mask, maybe prune/grow), zero_grad, EMA."""
    fp32_step(model, opt, mask, x, y)
    ema.update(model, mask)


def test_sparse_ema_semantics_with_ddp_style_prefix():
    decay = 0.9
    model = tiny_model()
    ema = ModelEma(model, decay=decay)
    assert not ema.ema.training and all(not p.requires_grad for p in ema.ema.parameters())
    wrapped = Wrapper(model)
    _, opt, mask = build(make_args(update_frequency=2), model=wrapped)
    ema.track_masks(mask)
    assert all(not n.startswith('module.') for n in mask.masks)
    data = batches(3)

    ema_before = {k: v.double().clone() for k, v in ema.ema.state_dict().items()}
    ema_step(wrapped, opt, mask, ema, *data[0])
    live = model.state_dict()
    for key, value in ema.ema.state_dict().items():
        if key.endswith('num_batches_tracked'):
            assert torch.equal(value, live[key])
            continue
        want = decay * ema_before[key] + (1 - decay) * live[key].double()
        if key in mask.masks:
            want = want * mask.masks[key]
        torch.testing.assert_close(value.double(), want, rtol=1e-6, atol=1e-7)

    name = 'stages.3.0.pwconv1.weight'
    old = mask.masks[name].clone()
    ema_step(wrapped, opt, mask, ema, *data[1])  # step 2: prune/grow, grown weights restart at 0
    new = mask.masks[name]
    grown, pruned, kept = new & ~old, old & ~new, old & new
    regrown_in_place = kept & (mask.params[name].detach() == 0)  # pruned and regrown at once: reset to 0 too
    kept &= ~regrown_in_place
    assert grown.any() and pruned.any() and regrown_in_place.any()
    with torch.no_grad():
        ema_value = ema.ema.state_dict()[name]
        assert torch.all(ema_value[grown] == 0)
        zero_pos = tuple(kept.nonzero()[0].tolist())
        ema_value[zero_pos] = 0.0  # an active weight whose EMA is exactly 0 is NOT new (quirk 11.16 fixed)
    ema_prev = ema_value.double().clone()
    ema_step(wrapped, opt, mask, ema, *data[2])  # step 3: the optimizer moved the grown weights; EMA restarts there
    ema_value = ema.ema.state_dict()[name]
    w = mask.params[name].detach()
    assert torch.all(w[grown] != 0)
    assert torch.equal(ema_value[grown], w[grown]) and torch.equal(ema_value[regrown_in_place], w[regrown_in_place])
    assert torch.all(ema_value[pruned] == 0)
    torch.testing.assert_close(ema_value[kept].double(), decay * ema_prev[kept] + (1 - decay) * w[kept].double(),
                               rtol=1e-6, atol=1e-7)
    assert ema_value[zero_pos].item() == pytest.approx((1 - decay) * w[zero_pos].item(), rel=1e-5)


def test_ema_resume_right_after_prune_grow_is_bit_identical():
    """A checkpoint written right after a prune/grow carries the grown positions, so the EMA restarts them."""
    args = make_args(update_frequency=2)
    data = batches(4)
    model = tiny_model()
    ema = ModelEma(model, decay=0.9)
    model, opt, mask = build(args, model=model)
    ema.track_masks(mask)
    for x, y in data[:2]:
        ema_step(model, opt, mask, ema, x, y)
    buffer = io.BytesIO()
    torch.save({'model': model.state_dict(), 'optimizer': opt.state_dict(), 'mask': mask.state_dict(),
                'model_ema': ema.ema.state_dict()}, buffer)
    for x, y in data[2:]:
        ema_step(model, opt, mask, ema, x, y)

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    assert checkpoint['mask']['grown'] and checkpoint['mask']['grown_at_step'] == 2
    resumed = tiny_model(seed=7)
    resumed.load_state_dict(checkpoint['model'])
    ema2 = ModelEma(resumed, decay=0.9)
    ema2.ema.load_state_dict(checkpoint['model_ema'])
    model2, opt2, mask2 = build(args, model=resumed, mask_state=checkpoint['mask'])
    opt2.load_state_dict(checkpoint['optimizer'])
    ema2.track_masks(mask2)
    for x, y in data[2:]:
        ema_step(model2, opt2, mask2, ema2, x, y)
    for (k1, v1), (k2, v2) in zip(ema.ema.state_dict().items(), ema2.ema.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1
    assert mask2.state_dict()['grown_at_step'] == 4 and mask2.state_dict()['grown']  # step 4 pruned and grew


def test_snip_scores_recomputed_blockwise_equal_stored_activations_and_leave_live_model_alone():
    """SNIP's copy recomputes block activations in backward (memory) with eager tails and without cuDNN autotuning:
    same float64 scores as one plain forward/backward (drop path on: checkpointing must replay its random draws)."""
    torch.manual_seed(0)
    model = SLaK.SLaK(depths=(1, 2, 1, 1), dims=(8, 16, 32, 64), kernel_size=[7, 7, 5, 5, 3], Decom=True,
                      num_classes=10, drop_path_rate=0.5).double()
    x, y = batches(1, seed=7)[0]
    x = x.double()
    names = [n for n, p in model.named_parameters() if p.dim() in (2, 4)]
    clone = copy.deepcopy(model)
    torch.manual_seed(123)
    F.cross_entropy(clone(x), y).backward()
    grads = dict(clone.named_parameters())
    expected = {n: (grads[n].detach() * grads[n].grad).abs() for n in names}

    block = model.stages[1][1]
    calls, autotuning = [], []
    block.large_kernel.register_forward_hook(lambda *_: calls.append(1) or autotuning.append(cudnn.benchmark))
    mask = Masking(torch.optim.SGD(model.parameters(), lr=0.1), train_loader=[(x, y)], args=make_args())
    mask.modules.append(model)
    mask.params = {n: p for n, p in model.named_parameters() if n in names}
    torch.manual_seed(123)
    cudnn = torch.backends.cudnn
    was = cudnn.benchmark
    try:
        cudnn.benchmark = True  # as main.py sets it
        scores = mask._snip_scores()
        assert cudnn.benchmark  # restored after the pass
    finally:
        cudnn.benchmark = was
    assert len(calls) == 2  # the copy's block ran forward twice: once, then again in backward
    assert autotuning == [False, False]  # the one-off pass does not time cuDNN's algorithms
    for n in names:
        assert torch.equal(scores[n], expected[n]), n
    assert not model.grad_checkpointing and all(b.COMPILE_TAIL == SLaK.Block.COMPILE_TAIL
                                                for s in model.stages for b in s)
    assert all(p.grad is None for p in model.parameters())


# ---- fidelity: a float64 run follows the original's masks exactly ---------------------------------------------------
class OriginalSparseReference:
    """The original's sparse maths written from its description (not from sparse_core), with the fixes sparse_core
    documents: magnitude prune removes exactly ceil(rate * nonzeros) active weights and growth adds exactly as many;
    pruned and grown positions restart at 0 with zero optimizer state; every random draw is a float32 ``torch.rand``
    from one generator seeded with ``--seed``; random growth takes the inactive positions with the largest draws."""

    def __init__(self, model, optimizer, init, growth, sparsity, seed, first_batch, p0, t_max, u):
        self.model, self.optimizer, self.growth = model, optimizer, growth
        self.p0, self.t_max, self.u, self.steps = p0, t_max, u, 0
        self.gen = torch.Generator().manual_seed(seed)
        self.params = {n: p for n, p in model.named_parameters() if p.dim() in (2, 4)}
        density = 1 - sparsity
        if init == 'snip':
            densities = self.snip_densities(first_batch, density)
        else:
            densities = self.erk_densities(density)
        masks = {n: (torch.rand(p.shape, generator=self.gen) < densities[n]).float() for n, p in self.params.items()}
        self.masks = {n: m for n, m in masks.items() if m.sum().item() / m.numel() < 0.99}
        self.apply_mask()

    def snip_densities(self, batch, density):
        """The original's SNIP: |w * dL/dw| on a copy, tau = keep-th largest (torch.topk), density = 1 - share of
        `not > tau`."""
        net = copy.deepcopy(self.model)
        net.zero_grad()
        F.cross_entropy(net(batch[0]), batch[1]).backward()
        params = dict(net.named_parameters())
        scores = {n: torch.abs(params[n] * params[n].grad) for n in self.params}
        all_scores = torch.cat([torch.flatten(s) for s in scores.values()])
        threshold, _ = torch.topk(all_scores, int(len(all_scores) * density), sorted=True)
        tau = threshold[-1]
        return {n: 1 - float(((s > tau).float() == 0).sum().item() / s.numel()) for n, s in scores.items()}

    def erk_densities(self, density):
        """The original's ERK iteration, written as the original's loop over the layers in order."""
        dense_layers = set()
        while True:
            divisor = rhs = 0
            raw = {}
            for name, p in self.params.items():
                n_param = np.prod(p.shape)
                if name in dense_layers:
                    rhs -= n_param * (1 - density)
                else:
                    rhs += n_param * density
                    raw[name] = np.sum(p.shape) / np.prod(p.shape)
                    divisor += raw[name] * n_param
            epsilon = rhs / divisor
            max_prob = np.max(list(raw.values()))
            if max_prob * epsilon <= 1:
                return {n: 1.0 if n in dense_layers else epsilon * raw[n] for n in self.params}
            dense_layers |= {n for n, r in raw.items() if r == max_prob}

    @torch.no_grad()
    def apply_mask(self):
        for name, m in self.masks.items():
            self.params[name].mul_(m)

    def step(self):
        """Optimizer step, re-mask, schedule; every u steps prune then grow."""
        self.optimizer.step()
        self.apply_mask()
        self.steps += 1
        rate = 0.005 + (self.p0 - 0.005) * (1 + math.cos(math.pi * self.steps / self.t_max)) / 2
        if self.steps % self.u == 0:
            self.truncate(rate)

    @torch.no_grad()
    def truncate(self, rate):
        for name, mask in self.masks.items():
            w = self.params[name]
            nonzeros = int(mask.sum().item())
            num_remove = math.ceil(rate * nonzeros)
            # the original's ascending sort of |w| (made stable) puts the inactive zeros first and prunes the first
            # zeros + num_remove; fixed: inactive positions are left out of the ranking, so active weights that are
            # exactly 0 (grown ones no gradient reached) count as removed
            magnitude = torch.where(mask == 1, torch.abs(w.data), torch.tensor(float('inf'), dtype=w.dtype))
            _, idx = torch.sort(magnitude.view(-1), stable=True)
            pruned = mask.clone()
            pruned.view(-1)[idx[:num_remove]] = 0.0
            regrow = nonzeros - int(pruned.sum().item())
            if self.growth == 'gradient':
                score = torch.abs(w.grad * (pruned == 0).float())
            else:
                score = torch.where(pruned == 0, torch.rand(mask.shape, generator=self.gen), torch.tensor(-1.0))
            _, idx = torch.sort(score.flatten(), descending=True, stable=True)
            grown = torch.zeros_like(mask)
            grown.view(-1)[idx[:regrow]] = 1.0
            reset = ((mask == 1) & (pruned == 0)) | (grown == 1)
            w[reset] = 0
            for value in self.optimizer.state[w].values():
                if torch.is_tensor(value) and value.shape == w.shape:
                    value[reset] = 0
            mask.copy_(pruned + grown)
        self.apply_mask()


@pytest.mark.parametrize('init, growth', [('snip', 'gradient'), ('snip', 'random'), ('ERK', 'gradient'),
                                          ('ERK', 'random')])
def test_float64_run_follows_the_original_masks_step_by_step(init, growth):
    """40 float64 steps, prune/grow every 5: masks identical to the reference at init and after every update."""
    steps, u, p0 = 40, 5, 0.3
    data = [(x.double(), y) for x, y in batches(steps, seed=11)]
    ours = tiny_model(seed=3).double()
    theirs = copy.deepcopy(ours)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-2, weight_decay=0.05)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-2, weight_decay=0.05)
    args = make_args(sparse_init=init, sparsity=0.4, update_frequency=u, growth=growth, seed=5)
    mask = Masking(opt_ours, data[:1], CosineDecay(p0, T_max=steps), growth_mode=growth, redistribution_mode='none',
                   args=args)
    mask.add_module(ours)
    reference = OriginalSparseReference(theirs, opt_theirs, init, growth, 0.4, 5, data[0], p0, steps, u)

    def assert_same_masks(when):
        assert list(mask.masks) == list(reference.masks), when
        for name, m in mask.masks.items():
            assert torch.equal(m, reference.masks[name].bool()), f'{when}: {name}'

    assert_same_masks('init')
    assert 0 < len(mask.masks) < len(mask.params)  # some layers were popped (>= 0.99 dense) on both sides
    updates = 0
    for x, y in data:
        for model in (ours, theirs):
            F.cross_entropy(model(x), y).backward()
        mask.step()
        reference.step()
        opt_ours.zero_grad()
        opt_theirs.zero_grad()
        if mask.steps % u == 0:
            updates += 1
            assert_same_masks(f'step {mask.steps}')
            assert sum(mask.name2removed.values()) > 0
    assert updates == steps // u
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize('dtype', [torch.float64, torch.bfloat16])
def test_ranking_breaks_ties_by_index_like_a_stable_sort(dtype):
    """Heavy ties (values rounded to a few levels): the chosen positions are the first k of a stable sort."""
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (3000,), generator=gen).to(dtype) / 4
    candidates = torch.rand(3000, generator=gen) < 0.7
    for largest in (True, False):
        for k in (1, 500, 1200, int(candidates.sum())):
            chosen = sparse_core._select_ranked(candidates, scores, k, largest=largest)
            outside = float('-inf') if largest else float('inf')
            order = torch.sort(scores.masked_fill(~candidates, outside), descending=largest, stable=True).indices
            expected = torch.zeros_like(candidates)
            expected[order[:k]] = True
            assert torch.equal(chosen, expected), (largest, k)


def zero_gamma_net() -> nn.Module:
    """A stem and two residual branches whose last norm starts at zero scale (timm's zero_init_last): no gradient
    reaches the branch convs, so SNIP scores most weights exactly 0."""
    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
            self.bn = nn.BatchNorm2d(16)
            nn.init.zeros_(self.bn.weight)

        def forward(self, x):
            return x + self.bn(self.conv2(F.relu(self.conv1(x))))

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), Branch(), Branch(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 10))


@pytest.mark.parametrize('mode', ['snip', 'snip_topk'])
def test_snip_reaches_the_asked_sparsity_when_norms_start_at_zero(mode, capsys):
    model = zero_gamma_net()
    x, y = batches(1, seed=2)[0]
    names = [n for n, p in model.named_parameters() if p.dim() in (2, 4)]
    clone = copy.deepcopy(model)
    F.cross_entropy(clone(x), y).backward()
    scores = {n: (p * p.grad).abs() for n, p in clone.named_parameters() if n in names}
    total = sum(s.numel() for s in scores.values())
    positive = sum(int((s > 0).sum()) for s in scores.values())
    keep = int(total * 0.6)
    assert positive < 0.2 * total  # the original's strict "> tau" would keep < 20 % instead of 60 %
    share = (keep - positive) / (total - positive)  # hand calculation: the rest of the budget over the zero scores
    opt = torch.optim.AdamW(model.parameters())
    mask = Masking(opt, [(x, y)], None, args=make_args(sparse_init=mode, sparsity=0.4), redistribution_mode='none')
    mask.add_module(model)
    out = capsys.readouterr().out
    assert f'each is kept with probability {share:.4f}' in out and 'asked 0.4000' in out
    kept = sum(int(mask.masks[n].sum()) if n in mask.masks else mask.params[n].numel() for n in names)
    assert abs(kept / total - 0.6) < 0.02
    for name in names:
        if name in mask.masks:
            expected = (int((scores[name] > 0).sum()) + share * int((scores[name] == 0).sum())) / scores[name].numel()
            n = scores[name].numel()
            assert abs(mask.masks[name].float().mean().item() - expected) <= 5 * math.sqrt(expected / n), name
            if mode == 'snip_topk':  # every positive-score weight is kept
                assert torch.all(mask.masks[name][scores[name] > 0]), name


def test_snip_threshold_is_taken_in_the_scores_dtype():
    """float64 scores that only differ below float32 precision: the threshold and the kept set are float64's."""
    model = nn.Sequential(nn.Linear(10, 20), nn.Linear(20, 10)).double()
    steps = torch.arange(200, dtype=torch.float64) * 1e-12
    scores = {'0.weight': (1 + steps).view(20, 10), '1.weight': (1 + steps + 0.5e-12).view(10, 20)}
    assert torch.unique(torch.cat([s.flatten() for s in scores.values()]).float()).numel() == 1
    ranked = sorted(torch.cat([s.flatten() for s in scores.values()]).tolist(), reverse=True)
    tau = ranked[int(400 * 0.6) - 1]  # the 240th largest score
    mask = Masking(torch.optim.SGD(model.parameters(), lr=0.1), [None], None,
                   args=make_args(sparse_init='snip_topk', sparsity=0.4), redistribution_mode='none')
    mask._snip_scores = lambda: scores
    mask.add_module(model)
    for name, s in scores.items():
        assert torch.equal(mask.masks[name], s > tau), name
    assert sum(int(m.sum()) for m in mask.masks.values()) == 239  # strictly greater: tau itself is not kept
