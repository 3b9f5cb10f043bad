"""utils.py: schedules, distributed init from launcher variables, AMP scaler, checkpoints, metrics."""
from __future__ import annotations

import argparse
import copy
import datetime
import math
import os
import random

import numpy as np
import pytest
import torch

import mnist_mini  # noqa: F401  (puts the repo root on sys.path)
from _gloo import finish_worker
import utils


# ---- cosine_scheduler --------------------------------------------------------------------------------------------
def test_cosine_scheduler_matches_closed_form_and_warmup_quirk():
    base, final, epochs, n, warm = 4e-3, 1e-6, 10, 7, 2
    s = utils.cosine_scheduler(base, final, epochs, n, warmup_epochs=warm)
    assert len(s) == epochs * n
    w = warm * n
    # warmup: linspace(0, base, w) -> both endpoints included, so step w-1 already equals base (original quirk)
    assert s[:w] == pytest.approx([base * i / (w - 1) for i in range(w)], abs=1e-15)
    m = epochs * n - w
    assert s[w:] == pytest.approx([final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / m)) for i in range(m)],
                                  rel=1e-12)
    assert s[w - 1] == s[w] == pytest.approx(base)  # the quirk: base value appears twice in a row
    assert s[-1] > final


def test_cosine_scheduler_warmup_steps_without_warmup_epochs_builds_warmup():
    s = utils.cosine_scheduler(1.0, 0.0, 2, 10, warmup_epochs=0, start_warmup_value=0.5, warmup_steps=5)
    assert len(s) == 20  # the original asserted here
    assert s[:5] == pytest.approx(np.linspace(0.5, 1.0, 5))
    assert s[5] == pytest.approx(1.0)
    constant = utils.cosine_scheduler(0.05, 0.05, 3, 4)
    assert np.allclose(constant, 0.05) and len(constant) == 12
    with pytest.raises(ValueError, match='warmup'):
        utils.cosine_scheduler(1.0, 0.0, 1, 10, warmup_epochs=2)


# ---- distributed initialisation ----------------------------------------------------------------------------------
@pytest.fixture
def fake_dist(monkeypatch):
    calls = {}

    def init_process_group(**kwargs):
        calls.update(kwargs)
    monkeypatch.setattr(torch.distributed, 'init_process_group', init_process_group)
    for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'SLURM_PROCID', 'SLURM_NTASKS', 'SLURM_LOCALID'):
        # setenv first so that monkeypatch restores the variable's original state (usually: unset) afterwards;
        # init_distributed_mode writes RANK/WORLD_SIZE itself, which would otherwise leak into later tests
        monkeypatch.setenv(k, '')
        monkeypatch.delenv(k)
    yield calls
    utils.restore_print()


def _args(**kw):
    base = dict(dist_on_itp=False, world_size=1, local_rank=-1, dist_url='env://', device='cpu', dist_timeout=30)
    base.update(kw)
    return argparse.Namespace(**base)


def test_init_distributed_from_torchrun_env(fake_dist, monkeypatch):
    monkeypatch.setenv('RANK', '3')
    monkeypatch.setenv('WORLD_SIZE', '4')
    monkeypatch.setenv('LOCAL_RANK', '1')
    args = _args(dist_timeout=7)
    utils.init_distributed_mode(args)
    assert (args.distributed, args.rank, args.world_size, args.gpu) == (True, 3, 4, 1)
    assert fake_dist['backend'] == 'gloo' and fake_dist['rank'] == 3 and fake_dist['world_size'] == 4
    assert fake_dist['timeout'] == datetime.timedelta(minutes=7)


def test_init_distributed_from_slurm_env(fake_dist, monkeypatch):
    monkeypatch.setenv('SLURM_PROCID', '5')
    monkeypatch.setenv('SLURM_NTASKS', '8')
    args = _args()
    utils.init_distributed_mode(args)
    assert (args.rank, args.world_size) == (5, 8)
    assert os.environ['RANK'] == '5' and os.environ['WORLD_SIZE'] == '8'
    assert fake_dist['backend'] == 'gloo'


def test_init_distributed_single_process(fake_dist):
    args = _args()
    utils.init_distributed_mode(args)
    assert args.distributed is False and fake_dist == {}


def test_init_distributed_cuda_without_gpu_is_a_clear_error(fake_dist, monkeypatch):
    monkeypatch.setenv('RANK', '0')
    monkeypatch.setenv('WORLD_SIZE', '2')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(ValueError, match='--device cpu'):
        utils.init_distributed_mode(_args(device='cuda'))


def test_distributed_eval_sampler_has_no_duplicates():
    data = list(range(101))
    parts = [list(utils.DistributedEvalSampler(data, num_replicas=4, rank=r)) for r in range(4)]
    assert sorted(sum(parts, [])) == data
    assert [len(utils.DistributedEvalSampler(data, num_replicas=4, rank=r)) for r in range(4)] == [26, 25, 25, 25]


# ---- AMP scaler --------------------------------------------------------------------------------------------------
def test_scaler_reports_skipped_step_on_inf_gradient():
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    scaler = utils.NativeScalerWithGradNormCount('cpu', enabled=True)
    norm = scaler((w * torch.tensor([1., 2., 2.])).sum(), opt, parameters=[w])
    assert not scaler.last_step_skipped and norm.item() == pytest.approx(3.0)
    assert w.detach().tolist() == pytest.approx([0.9, 0.8, 0.8])
    opt.zero_grad()
    scaler((w * torch.tensor([float('inf'), 1., 1.])).sum(), opt, parameters=[w])
    assert scaler.last_step_skipped
    assert w.detach().tolist() == pytest.approx([0.9, 0.8, 0.8])  # skipped


def test_disabled_scaler_clips_and_accumulates():
    w = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([w], lr=1.0)
    scaler = utils.NativeScalerWithGradNormCount('cpu', enabled=False)
    assert scaler((w * torch.tensor([3., 0.])).sum(), opt, parameters=[w], update_grad=False) is None
    norm = scaler((w * torch.tensor([0., 4.])).sum(), opt, clip_grad=1.0, parameters=[w])
    assert norm.item() == pytest.approx(5.0)  # accumulated gradient (3, 4) before clipping
    assert w.detach().tolist() == pytest.approx([-0.6, -0.8])
    assert not scaler.last_step_skipped


# ---- checkpoints -------------------------------------------------------------------------------------------------
class _Stateful:
    def __init__(self, value):
        self.value = value

    def state_dict(self):
        return {'value': self.value}

    def load_state_dict(self, state):
        self.value = state['value']


def _ckpt_args(out, **kw):
    base = dict(output_dir=str(out), save_ckpt_num=2, save_ckpt_freq=1, resume='', auto_resume=True, eval=False,
                start_epoch=0, kernel_size=[7, 7, 5, 5, 3], device=torch.device('cpu'))
    base.update(kw)
    return argparse.Namespace(**base)


def test_save_model_rotation_weights_only_and_extra(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    scaler = utils.NativeScalerWithGradNormCount('cpu', enabled=False)
    args = _ckpt_args(tmp_path)
    for epoch in range(4):
        utils.save_model(args, epoch, model, model, opt, scaler, extra={'projector': _Stateful(epoch)})
    assert sorted(os.listdir(tmp_path)) == ['checkpoint-2.pth', 'checkpoint-3.pth']  # no temp files left
    ckpt = torch.load(tmp_path / 'checkpoint-3.pth', weights_only=True)
    assert ckpt['projector'] == {'value': 3} and ckpt['epoch'] == 3
    assert ckpt['args']['kernel_size'] == [7, 7, 5, 5, 3] and ckpt['args']['device'] == 'cpu'


def test_atomic_save_keeps_old_file_when_writing_fails(tmp_path):
    path = tmp_path / 'checkpoint-0.pth'
    utils.atomic_save({'a': torch.ones(1)}, str(path))
    with pytest.raises(Exception):
        utils.atomic_save({'bad': lambda: 0}, str(path))  # lambdas cannot be pickled
    assert os.listdir(tmp_path) == ['checkpoint-0.pth']
    assert torch.load(path, weights_only=True)['a'].item() == 1


@pytest.mark.parametrize('fails_in', ['write', 'fsync'])
def test_atomic_save_reports_a_full_disk_and_keeps_the_old_file(fails_in, tmp_path, monkeypatch):
    """torch.save turns an ENOSPC in write() into a cryptic 'unexpected pos' RuntimeError; fsync can fail too. Both
    end in one ValueError naming the path and the cause; the old file is intact and no temporary file is left."""
    import errno
    import io
    path = tmp_path / 'checkpoint-0.pth'
    utils.atomic_save({'a': torch.ones(1)}, str(path))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    class FullDisk(io.FileIO):
        def write(self, data):
            return full() if self.tell() + len(data) > 1000 else super().write(data)
    if fails_in == 'write':
        monkeypatch.setattr(utils, 'open', lambda p, mode: FullDisk(p, mode), raising=False)
    else:
        monkeypatch.setattr(os, 'fsync', full)
    with pytest.raises(ValueError) as info:
        utils.atomic_save({'a': torch.zeros(10000)}, str(path))
    assert str(info.value).startswith(f'cannot write {path}: No space left on device; the files already there are '
                                      f'untouched')
    assert os.listdir(tmp_path) == ['checkpoint-0.pth']
    assert torch.load(path, weights_only=True)['a'].item() == 1


def test_make_writable_dir_creates_the_folder_and_refuses_files(tmp_path):
    utils.make_writable_dir(str(tmp_path / 'a' / 'b'), '--output_dir')
    assert os.listdir(tmp_path / 'a' / 'b') == []  # the probe file is gone
    (tmp_path / 'f').write_text('x')
    with pytest.raises(ValueError, match=r'--log_dir .*/f is a file, not a folder; pass a folder path'):
        utils.make_writable_dir(str(tmp_path / 'f'), '--log_dir')
    with pytest.raises(ValueError, match=r'--log_dir .*/f/tb is not a writable folder \(Not a directory\)'):
        utils.make_writable_dir(str(tmp_path / 'f' / 'tb'), '--log_dir')
    assert (tmp_path / 'f').read_text() == 'x'


def test_atomic_save_removes_temp_files_of_killed_writers(tmp_path):
    stale = tmp_path / '.checkpoint-3.pth.tmp4242'  # what a SIGKILL during torch.save leaves behind
    stale.write_bytes(b'partial')
    other = tmp_path / '.checkpoint-4.pth.tmp4242'  # another file's temporary: not ours to remove
    other.write_bytes(b'partial')
    utils.atomic_save({'a': torch.ones(1)}, str(tmp_path / 'checkpoint-3.pth'))
    assert sorted(os.listdir(tmp_path)) == ['.checkpoint-4.pth.tmp4242', 'checkpoint-3.pth']


def test_latest_checkpoint_ignores_best_and_picks_largest_number(tmp_path):
    for n in ('checkpoint-2.pth', 'checkpoint-10.pth', 'checkpoint-best.pth', 'checkpoint-best-ema.pth',
              'checkpoint-9.pth'):
        (tmp_path / n).write_bytes(b'')
    assert os.path.basename(utils.latest_checkpoint(str(tmp_path))) == 'checkpoint-10.pth'
    assert utils.latest_checkpoint(str(tmp_path / 'none')) is None


def test_rng_state_round_trip_through_weights_only_file(tmp_path):
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    utils.atomic_save({'rng': utils.get_rng_state()}, str(tmp_path / 'r.pth'))
    expected = (torch.rand(3), np.random.rand(3), random.random())
    utils.set_rng_state(torch.load(tmp_path / 'r.pth', weights_only=True)['rng'])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


def test_auto_load_model_restores_state_and_returns_mask(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    scaler = utils.NativeScalerWithGradNormCount('cpu', enabled=False)
    args = _ckpt_args(tmp_path)

    class Mask:
        def state_dict(self):
            return {'masks': {'weight': torch.ones(2, 3, dtype=torch.bool)}, 'steps': 5}
    utils.save_model(args, 4, model, model, opt, scaler, mask=Mask(), extra={'p': _Stateful(7)},
                     max_accuracy=55.5)
    fresh = torch.nn.Linear(3, 2)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    holder = _Stateful(0)
    new_args = _ckpt_args(tmp_path)
    mask_state = utils.auto_load_model(new_args, fresh, fresh, fresh_opt, scaler, extra={'p': holder})
    assert new_args.start_epoch == 5 and new_args.max_accuracy == 55.5 and holder.value == 7
    assert mask_state['steps'] == 5
    assert torch.equal(fresh.weight, model.weight)
    assert torch.equal(fresh_opt.state_dict()['state'][0]['momentum_buffer'],
                       opt.state_dict()['state'][0]['momentum_buffer'])
    wrong = torch.nn.Linear(4, 2)
    with pytest.raises(ValueError, match='shape mismatches'):
        utils.auto_load_model(_ckpt_args(tmp_path), wrong, wrong, torch.optim.SGD(wrong.parameters(), lr=1), scaler)


# ---- metrics -----------------------------------------------------------------------------------------------------
def test_smoothed_value_and_metric_logger():
    v = utils.SmoothedValue(window_size=2)
    for x, n in ((1.0, 1), (2.0, 3), (4.0, 1)):
        v.update(x, n)
    assert v.global_avg == pytest.approx((1 + 6 + 4) / 5) and v.median == 2.0 and v.avg == 3.0 and v.value == 4.0
    logger = utils.MetricLogger()
    logger.update(loss=torch.tensor(2.0), acc=None)
    assert 'acc' not in logger.meters and logger.loss.value == 2.0
    out = list(logger.log_every([(torch.zeros(4), 0)] * 3, 1, 'T:'))
    assert len(out) == 3
    assert utils.str2bool('True') and not utils.str2bool('0')
    with pytest.raises(argparse.ArgumentTypeError):
        utils.str2bool('maybe')


def test_wandb_missing_warns_and_continues(monkeypatch, capsys):
    import sys
    monkeypatch.setitem(sys.modules, 'wandb', None)  # makes `import wandb` raise ImportError
    assert utils.create_wandb_logger(argparse.Namespace(project='SLaK')) is None
    assert 'wandb is not installed' in capsys.readouterr().err


def test_convert_sync_batchnorm_keeps_state_and_single_process_maths():
    """The host-sync-free SyncBatchNorm keeps keys/values; outside a process group it is plain BatchNorm."""
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.BatchNorm2d(6), torch.nn.Sequential(
        torch.nn.BatchNorm2d(6)))
    with torch.no_grad():
        plain[1].running_mean.uniform_()
        plain[1].weight.uniform_(0.5, 2)
    reference = copy.deepcopy(plain)
    converted = utils.convert_sync_batchnorm(plain)
    assert isinstance(converted[1], utils.SyncBatchNormWithoutHostSync)
    assert isinstance(converted[2][0], utils.SyncBatchNormWithoutHostSync)
    assert list(converted.state_dict()) == list(reference.state_dict())
    for k, v in reference.state_dict().items():
        assert torch.equal(converted.state_dict()[k], v)
    x = torch.randn(4, 3, 9, 9)
    for mode in (True, False):
        converted.train(mode)
        reference.train(mode)
        torch.testing.assert_close(converted(x), reference(x))
    torch.testing.assert_close(converted[1].running_var, reference[1].running_var)


# ---- distributed checkpoints: every rank keeps its own random streams across a resume ----------------------------
def _draws():
    return [torch.rand(3).tolist(), np.random.rand(2).tolist(), [random.random()]]


def _rng_resume_worker(rank: int, init_file: str, out: str) -> None:
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    try:
        model = torch.nn.Linear(3, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = utils.NativeScalerWithGradNormCount('cpu', enabled=False)
        torch.manual_seed(100 + rank)  # main.init_run seeds --seed + rank
        np.random.seed(100 + rank)
        random.seed(100 + rank)
        utils.save_model(_ckpt_args(out), 0, model, model, opt, scaler)  # every rank calls it; rank 0 writes
        expected = _draws()
        torch.manual_seed(7)  # a fresh process would be seeded again before resuming
        np.random.seed(7)
        random.seed(7)
        args = _ckpt_args(out, resume=os.path.join(out, 'checkpoint-0.pth'))
        dist.barrier()  # rank 0 has written the file
        utils.auto_load_model(args, model, model, opt, scaler)
        torch.save({'expected': expected, 'got': _draws()}, os.path.join(out, f'draws-{rank}.pth'))
        finish_worker()
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_resume_restores_each_ranks_own_random_streams(tmp_path):
    """Restoring rank 0's RNG on every rank would make all ranks draw the same augmentations after a resume."""
    import torch.multiprocessing as mp
    mp.spawn(_rng_resume_worker, args=(str(tmp_path / 'init'), str(tmp_path)), nprocs=2, join=True)
    draws = [torch.load(tmp_path / f'draws-{r}.pth') for r in range(2)]
    for d in draws:
        assert d['got'] == d['expected']
    assert draws[0]['got'] != draws[1]['got']
    ckpt = torch.load(tmp_path / 'checkpoint-0.pth', weights_only=True)
    assert isinstance(ckpt['rng'], list) and len(ckpt['rng']) == 2


def test_restore_rng_states_single_state_and_world_size_change(capsys):
    torch.manual_seed(3)
    state = utils.get_rng_state()
    expected = torch.rand(2)
    utils.restore_rng_states(state)  # a single dict (one process)
    assert torch.equal(torch.rand(2), expected)
    torch.manual_seed(5)
    kept = torch.rand(2)
    torch.manual_seed(5)
    utils.restore_rng_states([state, state])  # saved by 2 processes, restored in 1: left as seeded
    assert torch.equal(torch.rand(2), kept)
    assert 'random states of 2 processes' in capsys.readouterr().out


def test_init_distributed_one_task_slurm_job_is_single_process(fake_dist, monkeypatch):
    """`python main.py` inside an sbatch script (SLURM_PROCID=0, one task) must not wait for a rendezvous."""
    monkeypatch.setenv('SLURM_PROCID', '0')
    monkeypatch.setenv('SLURM_NTASKS', '1')
    args = _args()
    utils.init_distributed_mode(args)
    assert args.distributed is False and fake_dist == {}


def test_eval_resume_loads_weights_of_a_run_with_other_optimizer_groups(tmp_path):
    """A --layer_decay run's checkpoint (more param groups) must still load for --eval true (weights only)."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    groups = [{'params': [p]} for p in model.parameters()]  # 4 groups, as layer decay makes many
    scaler = utils.NativeScalerWithGradNormCount('cpu', enabled=False)
    utils.save_model(_ckpt_args(tmp_path), 9, model, model, torch.optim.AdamW(groups), scaler)
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    two_groups = torch.optim.AdamW([{'params': list(fresh[0].parameters())}, {'params': list(fresh[1].parameters())}])
    args = _ckpt_args(tmp_path, eval=True)
    utils.auto_load_model(args, fresh, fresh, two_groups, scaler)
    assert torch.equal(fresh[1].weight, model[1].weight) and args.start_epoch == 0
    with pytest.raises(ValueError):  # training resume needs the same optimizer layout (torch's own check)
        utils.auto_load_model(_ckpt_args(tmp_path), fresh, fresh, two_groups, scaler)


@pytest.mark.parametrize('norm_type', [2.0, 1.0, float('inf')])
def test_grad_norm_is_the_norm_of_all_gradients_together(norm_type):
    """Against the float64 norm of every gradient concatenated (closed form); parameters without grad are skipped."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*shape)) for shape in ((3, 4), (5,), (2, 1, 3, 3), (7,))]
    for p in params[:3]:
        p.grad = torch.randn_like(p)
    flat = torch.cat([p.grad.double().flatten() for p in params[:3]])
    expected = torch.linalg.vector_norm(flat, norm_type).item()
    assert utils.get_grad_norm_(params, norm_type).item() == pytest.approx(expected, rel=1e-6)


class _IndexAndDraw(torch.utils.data.Dataset):
    """Item i: (tensor([i, a random draw made where the item is loaded]), i)."""

    def __len__(self):
        return 16

    def __getitem__(self, i):
        return torch.tensor([float(i), torch.rand(()).item()]), i


def _shared_loader(num_workers):
    sampler = torch.utils.data.DistributedSampler(_IndexAndDraw(), num_replicas=1, rank=0, shuffle=True, seed=3)
    loader = torch.utils.data.DataLoader(_IndexAndDraw(), sampler=sampler, batch_size=4, num_workers=num_workers,
                                         drop_last=True)
    return utils.FirstBatchShared(loader), sampler


@pytest.mark.parametrize('num_workers', [0, 2])
def test_first_batch_shared_hands_snips_batch_and_its_workers_to_epoch_zero(num_workers):
    shared, sampler = _shared_loader(num_workers)
    assert len(shared) == 4 and shared.sampler is sampler and shared.batch_size == 4  # the loader's attributes
    order0 = list(iter(sampler))
    first = shared.first_batch()
    assert shared.first_batch() is first  # read once
    epoch0 = list(shared)
    assert epoch0[0] is first  # the very batch SNIP scored, not a second augmentation of its images
    assert torch.cat([b[1] for b in epoch0]).tolist() == order0  # every index of epoch 0, once, in order
    again = list(shared)  # nothing kept any more: a fresh pass over the same epoch
    assert torch.cat([b[1] for b in again]).tolist() == order0 and again[0] is not first
    sampler.set_epoch(1)
    order1 = list(iter(sampler))
    assert order1 != order0
    stale = shared.first_batch()  # taken at epoch 1 ...
    sampler.set_epoch(2)  # ... but training starts at epoch 2: the kept iterator is dropped
    epoch2 = list(shared)
    assert epoch2[0] is not stale and torch.cat([b[1] for b in epoch2]).tolist() == list(iter(sampler))


@pytest.mark.parametrize('num_workers', [0, 2])
def test_prefetched_first_batch_is_the_same_run(num_workers):
    """prefetch() starts the first pass early (main.py: SNIP's batch, decoded while the run sets up): first_batch()
    and epoch 0 then give the very batches, worker random draws included, and leave the default generator where a
    run without it does; a prefetched pass that first_batch() never takes is dropped, and the next pass is whole."""
    def run(prefetch, take=True):
        torch.manual_seed(11)
        shared = utils.FirstBatchShared(torch.utils.data.DataLoader(
            _IndexAndDraw(), batch_size=4, shuffle=True, num_workers=num_workers, drop_last=True))
        if prefetch:
            shared.prefetch()
            shared.prefetch()  # (a second call starts nothing more)
        first = shared.first_batch() if take else None
        epoch = list(shared)
        return first, epoch, torch.get_rng_state()
    first0, epoch0, rng0 = run(False)
    first1, epoch1, rng1 = run(True)
    assert torch.equal(first1[0], first0[0]) and epoch1[0] is first1
    assert all(torch.equal(a[0], b[0]) for a, b in zip(epoch1, epoch0)) and len(epoch1) == len(epoch0) == 4
    assert torch.equal(rng1, rng0)
    _, dropped, _ = run(True, take=False)
    assert sorted(torch.cat([b[1] for b in dropped]).tolist()) == list(range(16))


class _IndexWorkerPath(torch.utils.data.Dataset):
    """Item i: (tensor([i, the id of the worker that loaded it]), i, its 'path')."""

    def __len__(self):
        return 16

    def __getitem__(self, i):
        info = torch.utils.data.get_worker_info()
        return torch.tensor([i, -1 if info is None else info.id]), i, f'img{i}.jpg'


@pytest.mark.parametrize('num_workers', [0, 3])
def test_split_first_batch_is_prepared_by_every_worker_and_joined_in_order(num_workers):
    sampler = torch.utils.data.DistributedSampler(_IndexWorkerPath(), num_replicas=1, rank=0, shuffle=True, seed=5)
    batches = utils.SplitFirstBatch(torch.utils.data.BatchSampler(sampler, 5, drop_last=True), num_workers)
    shared = utils.FirstBatchShared(torch.utils.data.DataLoader(_IndexWorkerPath(), batch_sampler=batches,
                                                                num_workers=num_workers))
    assert len(batches) == len(shared) == 3 and shared.sampler is sampler  # whole batches; the index sampler
    assert len(list(iter(batches))) == 3 + min(max(num_workers, 1), 5) - 1  # what the workers are handed
    order = list(iter(sampler))
    first = shared.first_batch()
    epoch0 = list(shared)
    assert epoch0[0] is first and len(epoch0) == 3
    # the structure of an uncut batch: [index/worker tensor, index tensor, the paths], in the sampler's order
    assert isinstance(first, list) and first[0].shape == (5, 2) and first[1].tolist() == order[:5]
    assert first[0][:, 0].tolist() == order[:5] and list(first[2]) == [f'img{i}.jpg' for i in order[:5]]
    workers = first[0][:, 1].tolist()
    # cut 5 items into 3 slices of 1, 2, 2: each prepared by its own worker (one worker: no cut)
    assert workers == ([-1] * 5 if num_workers == 0 else [0, 1, 1, 2, 2])
    assert torch.cat([b[1] for b in epoch0]).tolist() == order[:15]  # every index once, in order
    assert all(len(set(b[0][:, 1].tolist())) == 1 for b in epoch0[1:])  # the later batches are whole
    sampler.set_epoch(1)  # a new pass: its first batch is cut and joined again
    epoch1 = list(shared)
    assert torch.cat([b[1] for b in epoch1]).tolist() == list(iter(sampler))[:15] and epoch1[0][0].shape == (5, 2)


def test_join_batches_keeps_the_structure_of_every_collated_form():
    encoded = [(torch.tensor([1, 2, 3], dtype=torch.uint8), torch.tensor([3]), torch.tensor([7]), ['a.jpg']),
               (torch.tensor([4, 5], dtype=torch.uint8), torch.tensor([2]), torch.tensor([8]), ['b.jpg'])]
    flat, lengths, targets, paths = utils.join_batches(encoded)  # datasets.collate_encoded's batches
    assert flat.tolist() == [1, 2, 3, 4, 5] and lengths.tolist() == [3, 2] and targets.tolist() == [7, 8]
    assert paths == ['a.jpg', 'b.jpg'] and isinstance(utils.join_batches(encoded), tuple)
    assert utils.join_batches([('p', 'q'), ('r',)]) == ('p', 'q', 'r')  # default_collate's paths: a tuple
    joined = utils.join_batches([{'x': torch.zeros(2, 3), 'n': ['p', 'q']}, {'x': torch.ones(1, 3), 'n': ['r']}])
    assert joined['x'].tolist() == [[0] * 3] * 2 + [[1] * 3] and joined['n'] == ['p', 'q', 'r']
    with pytest.raises(TypeError, match='cannot join batches of int'):
        utils.join_batches([1, 2])


def test_main_prepares_each_passes_first_batch_with_every_worker(tmp_path):
    from PIL import Image
    import main
    rng = np.random.default_rng(0)
    for split in ('train', 'val'):
        for c in ('a', 'b'):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(6):
                pixels = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / c / f'{i}.jpg')
    args = main.get_args_parser().parse_args(
        ['--data_path', str(tmp_path), '--input_size', '32', '--batch_size', '4', '--num_workers', '2', '--device',
         'cpu', '--pin_mem', 'false', '--aa', 'none'])
    data = main.build_data(args)
    train, val = data.data_loader_train, data.data_loader_val
    assert isinstance(train.loader.batch_sampler, utils.SplitFirstBatch) and train.sampler is data.sampler_train
    assert train.loader.batch_sampler.parts == val.loader.batch_sampler.parts == 2
    assert len(train) == 3 and len(val) == 2  # 12 images: 3 whole batches of 4 (drop_last); 6 + 6 at 1.5 x 4
    images, targets = train.first_batch()
    assert images.shape == (4, 3, 32, 32) and targets.shape == (4,)
    val_batches = list(val)
    assert [b[0].shape[0] for b in val_batches] == [6, 6]  # not dropped; the first one joined from two slices
    assert torch.cat([b[1] for b in val_batches]).tolist() == [0] * 6 + [1] * 6  # in order


def test_snip_reads_the_loaders_first_batch_without_iterating_it():
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])

    class OnlyFirstBatch:
        taken = 0

        def first_batch(self):
            self.taken += 1
            return x, y

        def __iter__(self):
            raise AssertionError('SNIP must use first_batch()')

    import sparse_core
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 36, 4))
    args = argparse.Namespace(sparse_init='snip_topk', prune_rate=0.3, growth='random', prune='magnitude',
                              redistribution='none', sparse=True, density=0.5, update_frequency=100, fix=False,
                              sparsity=0.5)
    loader = OnlyFirstBatch()
    clone = copy.deepcopy(model)  # the scores, from the weights before masking
    torch.nn.functional.cross_entropy(clone(x), y).backward()
    mask = sparse_core.Masking(torch.optim.SGD(model.parameters(), lr=0.1), loader,
                               sparse_core.CosineDecay(0.3, T_max=10), prune_mode='magnitude', growth_mode='random',
                               redistribution_mode='none', args=args)
    mask.add_module(model)
    assert loader.taken == 1 and mask.masks
    # the masks are SNIP's top |w * dL/dw| on that batch
    for name, kept in mask.masks.items():
        p = dict(clone.named_parameters())[name]
        score = (p.detach() * p.grad).abs()
        assert 0 < kept.sum() < kept.numel()
        assert score[kept].min() >= score[~kept].max() > 0, name
