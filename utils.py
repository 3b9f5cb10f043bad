"""Helpers shared by ``main.py``, ``main_KD.py`` and ``engine.py``: distributed setup, logging, AMP scaler,
schedules and checkpoints.

Differences from the original ``utils.py``, on purpose:

* ``from torch import inf`` (``torch._six`` is gone) and ``torch.amp`` instead of ``torch.cuda.amp``.
* ``init_distributed_mode`` picks ``nccl`` on CUDA and ``gloo`` on CPU and sets a process-group timeout
  (``--dist_timeout`` minutes) so a dead rank makes the others fail with a message instead of hanging forever.
* ``cosine_scheduler`` builds the warmup when only ``warmup_steps`` is given (the original asserted).
* Checkpoints hold only builtins and tensors (``args`` as a dict, RNG states as tensors), so they load with
  ``torch.load(weights_only=True)``, the only way they are read (``SLaK.load_checkpoint_file``); they also hold the
  sparse masks and RNG states, are written atomically (a failed write, e.g. a full disk, is one error naming the file
  and leaves the earlier files), and an explicit ``--resume`` wins over ``--auto_resume`` (the original let the
  newest ``checkpoint-N.pth`` override it).
"""
from __future__ import annotations

import argparse
import builtins
import datetime
import glob
import itertools
import json
import os
import random
import re
import sys
import tempfile
import time
from collections import defaultdict, deque
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import inf

_builtin_print = builtins.print


def str2bool(v) -> bool:
    """argparse type for the original's ``true/false`` flags (``--model_ema true``)."""
    if isinstance(v, bool):
        return v
    if v.lower() in ('yes', 'true', 't', 'y', '1'):
        return True
    if v.lower() in ('no', 'false', 'f', 'n', '0'):
        return False
    raise argparse.ArgumentTypeError('Boolean value expected.')


# ---- distributed ---------------------------------------------------------------------------------------------------
def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def setup_for_distributed(is_master: bool) -> None:
    """Silence ``print`` on non-master ranks unless called with ``force=True`` (the DeiT/ConvNeXt convention)."""
    def print(*args, **kwargs):
        force = kwargs.pop('force', False)
        if is_master or force:
            _builtin_print(*args, **kwargs)
    builtins.print = print


def restore_print() -> None:
    """Undo :func:`setup_for_distributed` (tests, or a process that leaves distributed mode)."""
    builtins.print = _builtin_print


def init_distributed_mode(args: argparse.Namespace) -> None:
    """Read the launcher's environment and join the process group; sets ``args.distributed/rank/world_size/gpu``.

    Sources, in the original's priority order: ``--dist_on_itp`` (OpenMPI variables), ``RANK``+``WORLD_SIZE``
    (torchrun and ``torch.distributed.launch``; the local rank comes from ``LOCAL_RANK``, or from ``--local_rank`` /
    ``--local-rank`` for old launchers), ``SLURM_PROCID`` (world size from ``SLURM_NTASKS``, else ``--world_size``;
    ``MASTER_ADDR``/``MASTER_PORT`` must be set for ``env://``; a one-task job runs as a single process), otherwise a
    single process.
    The backend is ``nccl`` for CUDA devices and ``gloo`` otherwise (``--device cpu``).
    """
    local_rank_arg = getattr(args, 'local_rank', -1)
    if getattr(args, 'dist_on_itp', False):
        args.rank = int(os.environ['OMPI_COMM_WORLD_RANK'])
        args.world_size = int(os.environ['OMPI_COMM_WORLD_SIZE'])
        args.gpu = int(os.environ['OMPI_COMM_WORLD_LOCAL_RANK'])
        args.dist_url = f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        os.environ['LOCAL_RANK'] = str(args.gpu)
        os.environ['RANK'] = str(args.rank)
        os.environ['WORLD_SIZE'] = str(args.world_size)
    elif 'RANK' in os.environ and 'WORLD_SIZE' in os.environ:
        args.rank = int(os.environ['RANK'])
        args.world_size = int(os.environ['WORLD_SIZE'])
        args.gpu = int(os.environ.get('LOCAL_RANK', local_rank_arg if local_rank_arg >= 0 else 0))
    elif 'SLURM_PROCID' in os.environ and int(os.environ.get('SLURM_NTASKS', args.world_size)) > 1:
        args.rank = int(os.environ['SLURM_PROCID'])
        args.world_size = int(os.environ.get('SLURM_NTASKS', args.world_size))
        n_gpus = torch.cuda.device_count()
        args.gpu = int(os.environ.get('SLURM_LOCALID', args.rank % n_gpus if n_gpus else 0))
        os.environ['RANK'] = str(args.rank)
        os.environ['LOCAL_RANK'] = str(args.gpu)
        os.environ['WORLD_SIZE'] = str(args.world_size)
    else:  # also a plain `python main.py` inside a one-task Slurm job (the original then needed MASTER_ADDR)
        print('Not using distributed mode')
        args.distributed = False
        args.rank, args.gpu = 0, 0
        return

    args.distributed = True
    use_cuda = str(getattr(args, 'device', 'cuda')).startswith('cuda')
    if use_cuda:
        if not torch.cuda.is_available():
            raise ValueError('--device cuda was requested in a distributed run but CUDA is not available; '
                             'use --device cpu (gloo backend)')
        torch.cuda.set_device(args.gpu)
        args.device = f'cuda:{args.gpu}'
    args.dist_backend = 'nccl' if use_cuda else 'gloo'
    timeout = datetime.timedelta(minutes=float(getattr(args, 'dist_timeout', 30)))
    print(f'| distributed init (rank {args.rank}): {args.dist_url}, gpu {args.gpu}, backend {args.dist_backend}, '
          f'timeout {timeout}', flush=True)
    dist.init_process_group(backend=args.dist_backend, init_method=args.dist_url, world_size=args.world_size,
                            rank=args.rank, timeout=timeout)
    if dist.is_initialized():  # False only when a test replaces init_process_group
        dist.barrier()
    setup_for_distributed(args.rank == 0)


def all_reduce_sum(values: List[float], device) -> List[float]:
    """Sum a list of numbers over all ranks (float64, so counts stay exact)."""
    if not is_dist_avail_and_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


class DistributedEvalSampler(torch.utils.data.Sampler):
    """Rank r gets indices r, r + W, r + 2W, ... of the dataset: no padding, so nothing is counted twice.

    ``DistributedSampler`` pads the last round with repeated samples so every rank has the same length; the
    original therefore counted some validation images twice in ``--dist_eval`` accuracy. Evaluation here only needs
    the all-reduced sums of correct predictions and counts, so unequal rank lengths are fine.
    """

    def __init__(self, dataset, num_replicas: Optional[int] = None, rank: Optional[int] = None):
        self.num_samples_total = len(dataset)
        self.num_replicas = get_world_size() if num_replicas is None else num_replicas
        self.rank = get_rank() if rank is None else rank

    def __iter__(self):
        return iter(range(self.rank, self.num_samples_total, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.num_samples_total, self.num_replicas))


class SplitFirstBatch(torch.utils.data.Sampler):
    """A batch sampler whose every pass starts with its first batch cut into ``parts`` slices, one per loader worker.

    A DataLoader hands each batch to one worker, so a pass's first batch waits while one worker reads and augments
    all of it (~2 s for 128 JPEGs under the training transforms: half of SNIP's set-up time on an H100, issue 18)
    and the others work ahead. Sliced, the workers prepare it side by side; :class:`FirstBatchShared` joins the
    slices into one batch again. ``len`` counts whole batches, as the loop over the joined loader sees them. The
    slices' images are those of the uncut batch, in its order; their random augmentations come from other workers'
    random streams than one worker's would (reproducible for a given seed and ``--num_workers``, as before).
    """

    def __init__(self, batch_sampler: Iterable[List[int]], parts: int):
        self.batch_sampler, self.parts = batch_sampler, max(1, int(parts))
        self.sampler = getattr(batch_sampler, 'sampler', None)  # the index sampler (set_epoch, epoch)
        self.slices = 1  # how many slices this pass's first batch was cut into (read by FirstBatchShared)

    def __iter__(self):
        batches = iter(self.batch_sampler)
        first = next(batches, None)
        if first is None:
            return
        first = list(first)
        self.slices = min(self.parts, len(first))
        bounds = [len(first) * i // self.slices for i in range(self.slices + 1)]
        for lo, hi in zip(bounds, bounds[1:]):
            yield first[lo:hi]
        yield from batches

    def __len__(self) -> int:
        return len(self.batch_sampler)


def join_batches(batches: List[Any], pin: bool = False) -> Any:
    """The batches (collated slices of one batch, in order) as one batch of the same structure: tensors concatenated
    along dim 0, lists of non-tensors (e.g. file paths) chained, sequences and dicts joined field by field;
    ``pin``: the joined tensors in pinned memory, as the DataLoader's ``pin_memory`` gives them."""
    first = batches[0]
    if isinstance(first, torch.Tensor):
        joined = torch.cat(batches)
        return joined.pin_memory() if pin else joined
    if isinstance(first, dict):
        return {key: join_batches([b[key] for b in batches], pin) for key in first}
    if isinstance(first, (list, tuple)) and all(isinstance(v, (torch.Tensor, list, tuple, dict)) for v in first):
        fields = [join_batches(list(values), pin) for values in zip(*batches)]
        return type(first)(fields) if isinstance(first, list) else tuple(fields)
    if isinstance(first, (list, tuple)):  # a field of plain values (file paths, names): one per item
        joined = [v for b in batches for v in b]
        return joined if isinstance(first, list) else tuple(joined)
    raise TypeError(f'cannot join batches of {type(first).__name__}')


class FirstBatchShared:
    """A DataLoader whose first batch can be read before training without starting its workers twice.

    SNIP scores the masks on the first training batch. ``next(iter(loader))`` starts every worker, lets each one
    prefetch, keeps one batch and shuts them all down; the first epoch then starts them again (seconds with many
    workers and full-size JPEGs). ``first_batch()`` keeps that iterator instead: the next ``iter()`` at the same
    sampler epoch yields that batch first and goes on with the running workers, so epoch 0 visits exactly the
    indices it would have (its first batch is the one SNIP saw, not a second augmentation of the same images).
    At any other epoch the kept iterator is dropped and a fresh one started. When the loader's batch sampler is a
    :class:`SplitFirstBatch`, every pass joins the slices of its first batch back into one batch. ``len``,
    ``sampler`` (the index sampler) and everything else are the loader's.
    """

    def __init__(self, loader: torch.utils.data.DataLoader):
        self.loader = loader
        self._kept = None  # (iterator, its first batch, the sampler's epoch when it started)
        self._pending = None  # (iterator started by prefetch(), the sampler's epoch then)

    @property
    def sampler(self):
        return (getattr(getattr(self.loader, 'batch_sampler', None), 'sampler', None)
                or getattr(self.loader, 'sampler', None))

    def _epoch(self):
        return getattr(self.sampler, 'epoch', None)

    def prefetch(self) -> None:
        """Start the pass whose first batch :meth:`first_batch` will return now: its workers decode that batch while
        the caller goes on (main.py: while it sets up the optimizer, the EMA and the compile jobs before SNIP). The
        pass draws its random seeds here, as ``iter()`` would (nothing in between may draw from the default
        generator for the run to be the same). A prefetched pass that :meth:`first_batch` does not take is dropped
        by the next ``iter()`` (e.g. a run that resumed its masks instead of computing them)."""
        if self._kept is None and self._pending is None and len(self.loader):
            self._pending = (iter(self.loader), self._epoch())

    def _start(self, prefetched: bool = False):
        """A fresh pass: (its iterator after the first batch, the first batch, joined from its slices); with
        ``prefetched`` the pass :meth:`prefetch` started, if it is of this epoch."""
        pending, self._pending = self._pending, None
        iterator = pending[0] if prefetched and pending is not None and pending[1] == self._epoch() else None
        del pending  # (a pass not taken shuts its workers down)
        iterator = iterator if iterator is not None else iter(self.loader)
        first = next(iterator)
        slices = getattr(getattr(self.loader, 'batch_sampler', None), 'slices', 1)  # set as the pass began
        if slices > 1:
            first = join_batches([first] + [next(iterator) for _ in range(slices - 1)],
                                 pin=bool(getattr(self.loader, 'pin_memory', False)))
        return iterator, first

    def first_batch(self):
        if self._kept is None:
            self._kept = (*self._start(prefetched=True), self._epoch())
        return self._kept[1]

    def __iter__(self):
        kept, self._kept = self._kept, None
        if kept is None or kept[2] != self._epoch():
            if len(self.loader) == 0:
                return iter(())
            kept = (*self._start(), None)
        return itertools.chain([kept[1]], kept[0])

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str):
        if name == 'loader':  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)


# ---- metrics and logging -------------------------------------------------------------------------------------------
class _BatchNormOps:
    """The fused batch-norm primitives that ``nn.SyncBatchNorm`` is built from (``torch.batch_norm_stats`` & co.).

    On CUDA these are PyTorch's own kernels. They have no CPU kernels, so on CPU the same maths runs through plain
    tensor ops (used by the gloo tests of the cross-rank logic; CUDA results are checked against
    ``nn.SyncBatchNorm`` by ``benchmarks/check_syncbn.py``).
    """

    @staticmethod
    def stats(x, eps):
        if x.is_cuda:
            return torch.batch_norm_stats(x, eps)
        var, mean = torch.var_mean(x.float() if x.dtype != torch.float64 else x, dim=(0, 2, 3), unbiased=False)
        return mean, (var + eps).rsqrt()

    @staticmethod
    def gather_stats(x, means, invstds, running_mean, running_var, momentum, eps, counts):
        if x.is_cuda:
            return torch.batch_norm_gather_stats_with_counts(x, means, invstds, running_mean, running_var, momentum,
                                                             eps, counts)
        total = counts.sum()
        weights = (counts / total)[:, None]
        mean = (weights * means).sum(0)
        var = (weights * (invstds.pow(-2) - eps + (means - mean).pow(2))).sum(0)
        if running_mean is not None:
            running_mean.mul_(1 - momentum).add_(momentum * mean.to(running_mean.dtype))
            running_var.mul_(1 - momentum).add_(momentum * (var * total / (total - 1)).to(running_var.dtype))
        return mean, (var + eps).rsqrt()

    @staticmethod
    def elemt(x, weight, bias, mean, invstd, eps):
        if x.is_cuda:
            return torch.batch_norm_elemt(x, weight, bias, mean, invstd, eps)
        shape = (1, -1, 1, 1)
        y = (x - mean.view(shape)) * invstd.view(shape)
        if weight is not None:
            y = y * weight.view(shape) + bias.view(shape)
        return y.to(x.dtype)

    @staticmethod
    def backward_reduce(dy, x, mean, invstd, weight, need_x, need_w, need_b):
        if dy.is_cuda:
            return torch.batch_norm_backward_reduce(dy, x, mean, invstd, weight, need_x, need_w, need_b)
        dims, shape = (0, 2, 3), (1, -1, 1, 1)
        sum_dy = dy.sum(dims).to(mean.dtype)
        sum_dy_xmu = (dy * (x - mean.view(shape))).sum(dims).to(mean.dtype)
        return sum_dy, sum_dy_xmu, sum_dy_xmu * invstd if need_w else None, sum_dy if need_b else None

    @staticmethod
    def backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, counts):
        if dy.is_cuda:
            return torch.batch_norm_backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, counts)
        shape, total = (1, -1, 1, 1), counts.sum().to(mean.dtype)
        scale = invstd if weight is None else invstd * weight
        dx = (dy - (sum_dy / total).view(shape)
              - (x - mean.view(shape)) * (invstd.pow(2) * sum_dy_xmu / total).view(shape)) * scale.view(shape)
        return dx.to(dy.dtype)


# torch >= 2.14 renamed all_gather_into_tensor (same signature) and deprecates the old name.
_all_gather_single = getattr(dist, 'all_gather_single', None) or dist.all_gather_into_tensor


def _channels_last_or_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.is_contiguous(memory_format=torch.channels_last) else x.contiguous()


class _SyncBatchNormSumFunction(torch.autograd.Function):
    """``sum_i BN_i(x_i)`` in training mode, batch statistics taken over every rank, without a host synchronisation.

    One BN (``n = 1``) is ``nn.SyncBatchNorm``'s maths; for a SLaK block's parallel branches (``n = 3``: LoRA1,
    LoRA2 and small_conv, all normalised over the same ranks) the statistics of all of them travel in **one**
    all-gather in the forward and one all-reduce in the backward, instead of one of each per BN: 36 collectives per
    SLaK-T micro-batch instead of 108. With ``world_size == 1`` no collective runs.

    ``nn.SyncBatchNorm`` drops the statistics of ranks with empty batches by boolean indexing, which makes the CPU
    wait for the GPU in every BN forward; SLaK has 3 BNs per block, so the CPU could never run ahead of the GPU and
    training became launch-bound: measured 63 % scaling efficiency on 2 H200s vs ~100 % without SyncBN
    (benchmarks/RESULTS.md). Our training loaders drop the last incomplete batch, so every rank always has a
    non-empty batch and the masking is not needed. Same statistics, running-stat updates and gradients otherwise.

    Arguments after ``ctx``: ``group``, ``world_size``, ``eps`` and ``momenta`` (tuples, one per BN), ``n``, then
    the tensors ``x_1..x_n, weight_1..weight_n, bias_1..bias_n, running_mean_1..n, running_var_1..n`` (weights,
    biases and running statistics may be None). Every ``x_i`` has the same shape.
    """

    @staticmethod
    def forward(ctx, group, world_size, eps, momenta, n, *tensors):
        xs = [_channels_last_or_contiguous(x) for x in tensors[:n]]
        weights, biases = tensors[n:2 * n], tensors[2 * n:3 * n]
        running_means, running_vars = tensors[3 * n:4 * n], tensors[4 * n:5 * n]
        channels = xs[0].shape[1]
        stats = [s for x, e in zip(xs, eps) for s in _BatchNormOps.stats(x, e)]
        count = torch.full((1,), xs[0].numel() // channels, dtype=stats[0].dtype, device=stats[0].device)
        local = torch.cat(stats + [count])
        if world_size > 1:
            gathered = torch.empty(world_size * local.numel(), dtype=local.dtype, device=local.device)
            _all_gather_single(gathered, local, group=group)
        else:
            gathered = local
        gathered = gathered.view(world_size, -1)
        counts = gathered[:, 2 * n * channels]
        out, means, invstds = None, [], []
        for i, x in enumerate(xs):
            mean, invstd = _BatchNormOps.gather_stats(
                x, gathered[:, 2 * i * channels:(2 * i + 1) * channels],
                gathered[:, (2 * i + 1) * channels:(2 * i + 2) * channels], running_means[i], running_vars[i],
                momenta[i], eps[i], counts)
            means.append(mean)
            invstds.append(invstd)
            y = _BatchNormOps.elemt(x, weights[i], biases[i], mean, invstd, eps[i])
            out = y if out is None else out.add_(y)
        ctx.n = n
        ctx.group, ctx.world_size = group, world_size
        ctx.has_weight = [w is not None for w in weights]
        ctx.save_for_backward(*xs, *[w for w in weights if w is not None], *means, *invstds,
                              counts.to(torch.int32) if counts.is_cuda else counts)
        return out

    @staticmethod
    def backward(ctx, grad_output):
        n = ctx.n
        dy = _channels_last_or_contiguous(grad_output)
        saved = list(ctx.saved_tensors)
        xs, saved = saved[:n], saved[n:]
        weights = []
        for has in ctx.has_weight:
            weights.append(saved.pop(0) if has else None)
        means, invstds, counts = saved[:n], saved[n:2 * n], saved[2 * n]
        need = ctx.needs_input_grad[5:]
        need_x, need_w, need_b = need[:n], need[n:2 * n], need[2 * n:3 * n]
        reduced, grad_w, grad_b = [], [None] * n, [None] * n
        for i in range(n):
            sum_dy, sum_dy_xmu, gw, gb = _BatchNormOps.backward_reduce(
                dy, xs[i], means[i], invstds[i], weights[i], any(need_x), weights[i] is not None and need_w[i],
                need_b[i])
            reduced += [sum_dy, sum_dy_xmu]
            grad_w[i], grad_b[i] = (gw if need_w[i] else None), (gb if need_b[i] else None)
        grad_x = [None] * n
        if any(need_x):
            both = torch.cat(reduced)
            if ctx.world_size > 1:
                dist.all_reduce(both, group=ctx.group)
            parts = both.split(means[0].shape[0])
            for i in range(n):
                if need_x[i]:
                    grad_x[i] = _BatchNormOps.backward_elemt(dy, xs[i], means[i], invstds[i], weights[i],
                                                             parts[2 * i], parts[2 * i + 1], counts)
        return (None, None, None, None, None, *grad_x, *grad_w, *grad_b, *([None] * (2 * n)))


def sync_batch_norm_sum(xs: List[torch.Tensor], bns: List[torch.nn.modules.batchnorm._BatchNorm],
                        group=None, world_size: Optional[int] = None) -> torch.Tensor:
    """``sum(bn(x) for x, bn in zip(xs, bns))`` with training-mode statistics over every rank of ``group``
    (default: the world), one collective per pass for all of them. Updates each BN's running statistics and
    ``num_batches_tracked`` like its own forward would."""
    if world_size is None:
        world_size = dist.get_world_size(group) if is_dist_avail_and_initialized() else 1
    eps, momenta = [], []
    for bn in bns:
        momentum = 0.0 if bn.momentum is None else bn.momentum
        if bn.track_running_stats:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(bn.num_batches_tracked)
        eps.append(bn.eps)
        momenta.append(momentum)
    tensors = (list(xs) + [bn.weight for bn in bns] + [bn.bias for bn in bns]
               + [bn.running_mean if bn.track_running_stats else None for bn in bns]
               + [bn.running_var if bn.track_running_stats else None for bn in bns])
    return _SyncBatchNormSumFunction.apply(group, world_size, tuple(eps), tuple(momenta), len(bns), *tensors)


class SyncBatchNormWithoutHostSync(torch.nn.SyncBatchNorm):
    """``nn.SyncBatchNorm`` (same parameters, buffers and state-dict keys) whose distributed training forward never
    synchronises with the host; see :class:`_SyncBatchNormSumFunction`. Unlike the parent it also runs on CPU
    (gloo). Other cases (eval, one process) use the parent's forward, which is plain BatchNorm there.

    :meth:`sum_of_branches` is the hook ``SLaK.ReparamLargeKernelConv`` looks for: it normalises the block's
    parallel branches with one collective per pass.
    """

    # Benchmarks set this to take the fused path in a single process too (no collective; PyTorch's fused kernels).
    FUSE_SINGLE_PROCESS = False
    # One collective per block for its parallel branches; SLAK_SYNCBN_FUSE_BRANCHES=0 gives one per BN (A/B runs).
    FUSE_BRANCHES = os.environ.get('SLAK_SYNCBN_FUSE_BRANCHES', '1') != '0'

    def _fused_group(self, x: torch.Tensor):
        """(group, world size) when the host-sync-free path applies to input ``x``, else None."""
        if not (self.training and x.shape[0] > 0):
            return None
        if is_dist_avail_and_initialized():
            group = self.process_group or dist.group.WORLD
            size = dist.get_world_size(group)
            if size > 1:
                return group, size
        return (None, 1) if self.FUSE_SINGLE_PROCESS else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        found = self._fused_group(x)
        if found is None:
            return super().forward(x)
        self._check_input_dim(x)
        return sync_batch_norm_sum([x], [self], *found)

    def sum_of_branches(self, x: torch.Tensor, branches: List[torch.nn.Module],
                        fast_sum=None) -> Optional[torch.Tensor]:
        """``sum(b(x) for b in branches)`` for ``conv -> bn`` branches whose BNs all share this one's class and
        process group; None (nothing computed) when the fused path does not apply. ``fast_sum(x, branches, group,
        world_size)`` (SLaK passes cutlass/'s Triton branch-BN kernels when its convs are the fast ones) is tried
        first; it returns None for cases it does not take, and PyTorch's batch-norm kernels run instead. ``x`` may be
        a list with one input per branch (``SLaK._branch_inputs``)."""
        xs = list(x) if isinstance(x, (list, tuple)) else [x] * len(branches)
        x = xs[0]
        found = self._fused_group(x) if self.FUSE_BRANCHES else None
        if found is None or x.dim() != 4:
            return None
        bns = [getattr(b, 'bn', None) for b in branches]
        if any(type(bn) is not type(self) or bn.process_group is not self.process_group or not bn.training
               for bn in bns):
            return None
        if fast_sum is not None:
            out = fast_sum(xs, branches, *found)
            if out is not None:
                return out
        return sync_batch_norm_sum([b.conv(xi) for b, xi in zip(branches, xs)], bns, *found)


def convert_sync_batchnorm(module: torch.nn.Module, process_group=None) -> torch.nn.Module:
    """Replace every ``BatchNorm*d`` by :class:`SyncBatchNormWithoutHostSync`, keeping parameters and buffers."""
    batch_norm = torch.nn.modules.batchnorm._BatchNorm
    if isinstance(module, batch_norm) and not isinstance(module, SyncBatchNormWithoutHostSync):
        converted = SyncBatchNormWithoutHostSync(module.num_features, module.eps, module.momentum, module.affine,
                                                 module.track_running_stats, process_group)
        if module.affine:
            with torch.no_grad():
                converted.weight = module.weight
                converted.bias = module.bias
        converted.running_mean = module.running_mean
        converted.running_var = module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, process_group))
    return module


class SmoothedValue:
    """A series of values: windowed median/avg for progress lines, global average (``total / count``) for epochs."""

    def __init__(self, window_size: int = 20, fmt: Optional[str] = None):
        self.deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt or '{median:.4f} ({global_avg:.4f})'

    def update(self, value: float, n: int = 1) -> None:
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self, device='cpu') -> None:
        """All-reduce ``count`` and ``total`` (not the window) so ``global_avg`` is the average over all ranks."""
        self.count, self.total = all_reduce_sum([self.count, self.total], device)

    @property
    def median(self) -> float:
        return torch.tensor(list(self.deque)).median().item()

    @property
    def avg(self) -> float:
        return torch.tensor(list(self.deque), dtype=torch.float32).mean().item()

    @property
    def global_avg(self) -> float:
        return self.total / self.count if self.count else float('nan')

    @property
    def max(self) -> float:
        return max(self.deque)

    @property
    def value(self) -> float:
        return self.deque[-1]

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, max=self.max,
                               value=self.value)


class MetricLogger:
    """Named :class:`SmoothedValue` meters plus a progress printer (ETA, img/s, data time, max memory)."""

    def __init__(self, delimiter: str = '\t'):
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, n: int = 1, **kwargs) -> None:
        for k, v in kwargs.items():
            if v is None:
                continue
            if isinstance(v, torch.Tensor):
                v = v.item()
            if not isinstance(v, (float, int)):
                raise TypeError(f'meter {k} got a {type(v).__name__}; expected a number')
            self.meters[k].update(v, n=n)

    def __getattr__(self, attr):
        if attr in self.__dict__.get('meters', {}):
            return self.meters[attr]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{attr}'")

    def __str__(self) -> str:
        return self.delimiter.join(f'{name}: {meter}' for name, meter in self.meters.items())

    def synchronize_between_processes(self, device='cpu') -> None:
        for meter in self.meters.values():
            meter.synchronize_between_processes(device)

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def log_every(self, iterable, print_freq: int, header: str = ''):
        """Yield from ``iterable`` and print a progress line every ``print_freq`` items and at the last one."""
        i = 0
        start_time = end = time.time()
        iter_time = SmoothedValue(fmt='{avg:.4f}')
        data_time = SmoothedValue(fmt='{avg:.4f}')
        images = SmoothedValue(fmt='{avg:.1f}')
        n_digits = len(str(len(iterable)))
        parts = [header, f'[{{0:>{n_digits}}}/{len(iterable)}]', 'eta: {eta}', '{meters}', 'time: {time}',
                 'data: {data}', 'img/s: {ips:.1f}']
        if torch.cuda.is_available():
            parts.append('max mem: {memory:.0f}')
        line = self.delimiter.join(parts)
        for obj in iterable:
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            batch = obj[0] if isinstance(obj, (list, tuple)) else obj
            images.update(len(batch) if hasattr(batch, '__len__') else 1)
            if i % print_freq == 0 or i == len(iterable) - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (len(iterable) - i - 1)))
                ips = sum(images.deque) / max(sum(iter_time.deque), 1e-9)
                memory = torch.cuda.max_memory_allocated() / 2 ** 20 if torch.cuda.is_available() else 0
                print(line.format(i, eta=str(eta), meters=str(self), time=str(iter_time), data=str(data_time),
                                  ips=ips, memory=memory), flush=True)
            i += 1
            end = time.time()
        total_time = time.time() - start_time
        print(f'{header} Total time: {datetime.timedelta(seconds=int(total_time))} '
              f'({total_time / max(len(iterable), 1):.4f} s / it)', flush=True)


class TensorboardLogger:
    """tensorboardX writer with a global step; scalars are written as ``"{head}/{key}"`` (original tag names)."""

    def __init__(self, log_dir: str):
        from tensorboardX import SummaryWriter
        self.writer = SummaryWriter(logdir=log_dir)
        self.step = 0

    def set_step(self, step: Optional[int] = None) -> None:
        self.step = step if step is not None else self.step + 1

    def update(self, head: str = 'scalar', step: Optional[int] = None, **kwargs) -> None:
        for k, v in kwargs.items():
            if v is None:
                continue
            if isinstance(v, torch.Tensor):
                v = v.item()
            self.writer.add_scalar(f'{head}/{k}', v, self.step if step is None else step)

    def flush(self) -> None:
        self.writer.flush()


class WandbLogger:
    """Weights & Biases logging with the original's metric names; build it with :func:`create_wandb_logger`."""

    def __init__(self, args: argparse.Namespace, wandb_module):
        self._wandb = wandb_module
        if self._wandb.run is None:
            self._run = self._wandb.init(project=args.project, config=args_to_dict(args))
        else:
            self._run = self._wandb.run

    def log_epoch_metrics(self, metrics: Dict[str, Any], commit: bool = True) -> None:
        self._run.summary['n_parameters'] = metrics.get('n_parameters', None)
        metrics = dict(metrics)
        metrics.pop('n_parameters', None)
        self._wandb.log({'epoch': metrics.pop('epoch', None)}, commit=False)
        for k, v in metrics.items():
            if 'train' in k:
                self._wandb.log({f'Global Train/{k}': v}, commit=False)
            elif 'test' in k:
                self._wandb.log({f'Global Test/{k}': v}, commit=False)
        self._wandb.log({}, commit=commit)

    def log_batch(self, metrics: Dict[str, Any]) -> None:
        """Per-iteration metrics (``Rank-0 Batch Wise/*``), committed at once."""
        self._wandb.log(metrics, commit=True)

    def log_checkpoints(self, output_dir: str) -> None:
        artifact = self._wandb.Artifact(self._wandb.run.id + '_model', type='model')
        artifact.add_dir(output_dir)
        self._wandb.log_artifact(artifact, aliases=['latest', 'best'])

    def set_steps(self) -> None:
        self._wandb.define_metric('Rank-0 Batch Wise/*', step_metric='Rank-0 Batch Wise/global_train_step')
        self._wandb.define_metric('Global Train/*', step_metric='epoch')
        self._wandb.define_metric('Global Test/*', step_metric='epoch')


def create_wandb_logger(args: argparse.Namespace) -> Optional[WandbLogger]:
    """A :class:`WandbLogger`, or None with a warning when wandb is not installed or fails to start.

    Logging is a convenience: it must never stop a training run.
    """
    try:
        import wandb
    except ImportError:
        print('warning: --enable_wandb true but wandb is not installed (pip install wandb); continuing without it',
              file=sys.stderr)
        return None
    try:
        return WandbLogger(args, wandb)
    except Exception as e:  # network/auth problems of a third-party service
        print(f'warning: wandb could not start ({e}); continuing without it', file=sys.stderr)
        return None


# ---- AMP and gradients ---------------------------------------------------------------------------------------------
def get_grad_norm_(parameters: Iterable[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """Total norm of all existing gradients (the norm of the per-tensor norms), like ``clip_grad_norm_`` without
    clipping."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.)
    device = grads[0].device
    if norm_type == inf:
        return max(g.detach().abs().max().to(device) for g in grads)
    # one multi-tensor kernel per device and dtype instead of one norm kernel per tensor (~230 launches for SLaK-T)
    norms = torch._foreach_norm([g.detach() for g in grads], norm_type)
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), norm_type)


class NativeScalerWithGradNormCount:
    """Loss scaling + backward + (optional clipping) + optimizer step; returns the gradient norm.

    ``enabled=False`` (fp32 or bfloat16 autocast) keeps the same interface with no scaling. ``last_step_skipped`` tells
    whether the last update was skipped because of inf/NaN gradients (the scale then shrinks), which the sparse
    mask needs to know (``mask.after_step(stepped=not scaler.last_step_skipped)``).
    """
    state_dict_key = 'amp_scaler'

    def __init__(self, device: str = 'cuda', enabled: bool = True):
        device_type = torch.device(device).type
        self.enabled = bool(enabled)
        self._scaler = torch.amp.GradScaler(device_type, enabled=self.enabled)
        self.last_step_skipped = False

    def __call__(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, clip_grad: Optional[float] = None,
                 parameters: Optional[Iterable[torch.Tensor]] = None, create_graph: bool = False,
                 update_grad: bool = True) -> Optional[torch.Tensor]:
        self._scaler.scale(loss).backward(create_graph=create_graph)
        if not update_grad:
            return None
        parameters = [p for p in parameters if p.grad is not None] if parameters is not None else []
        self._scaler.unscale_(optimizer)
        if clip_grad is not None and clip_grad > 0:
            norm = torch.nn.utils.clip_grad_norm_(parameters, clip_grad)
        else:
            norm = get_grad_norm_(parameters)
        scale_before = self._scaler.get_scale() if self.enabled else 1.0
        self._scaler.step(optimizer)
        self._scaler.update()
        self.last_step_skipped = self.enabled and self._scaler.get_scale() < scale_before
        return norm

    def state_dict(self) -> dict:
        return self._scaler.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict:
            self._scaler.load_state_dict(state_dict)


# ---- schedules -----------------------------------------------------------------------------------------------------
def cosine_scheduler(base_value: float, final_value: float, epochs: int, niter_per_ep: int, warmup_epochs: int = 0,
                     start_warmup_value: float = 0, warmup_steps: int = -1) -> np.ndarray:
    """Per-optimizer-step values: linear warmup (both endpoints included) then a cosine from base to final.

    Identical to the original, including its warmup shape (``linspace`` reaches ``base_value`` on the last warmup
    step, so the first cosine step repeats it), except that ``warmup_steps > 0`` now builds the warmup even when
    ``warmup_epochs == 0`` (the original built none and then failed its length assertion).
    """
    warmup_iters = warmup_steps if warmup_steps > 0 else warmup_epochs * niter_per_ep
    total = epochs * niter_per_ep
    if warmup_iters > total:
        raise ValueError(f'warmup ({warmup_iters} steps) is longer than training ({total} steps); '
                         f'lower --warmup_epochs/--warmup_steps')
    warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_iters > 0 else np.array([])
    iters = np.arange(total - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup_schedule, schedule))


# ---- checkpoints ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def state_checksums(model: torch.nn.Module, masks: Dict[str, torch.Tensor]) -> Tuple[float, float]:
    """Position-sensitive float64 checksums of the parameters and of the masks (equal on identical replicas).

    Each element is weighted by (index mod 1009) + 1, so swapped positions change the sum. Buffers are left out: BN
    running statistics are per rank unless SyncBatchNorm is on.
    """
    def checksum(tensors) -> float:
        total = 0.0
        for t in tensors:
            flat = t.detach().reshape(-1).double()
            weights = torch.arange(flat.numel(), device=flat.device, dtype=torch.float64).remainder_(1009).add_(1)
            total += float((flat * weights).sum())
        return total
    return checksum(p for _, p in model.named_parameters()), checksum(masks[k] for k in sorted(masks))


def args_to_dict(args: argparse.Namespace) -> Dict[str, Any]:
    """``args`` as a dict of builtins (what ``torch.load(weights_only=True)`` accepts); other values become str."""
    def plain(v):
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        return str(v)
    return {k: plain(v) for k, v in vars(args).items()}


def get_rng_state() -> Dict[str, Any]:
    """torch / numpy / python / CUDA generator states as tensors and builtins (weights_only-loadable)."""
    np_state = np.random.get_state()
    state = {
        'torch': torch.get_rng_state(),
        'numpy': [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        'python': list(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Inverse of :func:`get_rng_state`."""
    torch.set_rng_state(state['torch'])
    name, keys, pos, has_gauss, gauss = state['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state['python']
    random.setstate((version, tuple(internal), gauss_next))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def gather_rng_states() -> List[Dict[str, Any]]:
    """Every process's :func:`get_rng_state`, in rank order; a collective, so every rank must call it.

    Ranks are seeded ``--seed + rank`` and must keep distinct streams after a resume: restoring rank 0's state on
    every rank would give all ranks the same augmentations, drop-path and mixup draws.
    """
    state = get_rng_state()
    if get_world_size() == 1:
        return [state]
    states: List[Optional[Dict[str, Any]]] = [None] * get_world_size()
    dist.all_gather_object(states, state)
    return states


def restore_rng_states(states) -> None:
    """Set this process's RNG from :func:`gather_rng_states` output (or one :func:`get_rng_state` dict).

    With a different number of processes than the run that saved them, the streams are left as seeded.
    """
    if isinstance(states, dict):
        states = [states]
    if len(states) == get_world_size():
        set_rng_state(states[get_rank()])
    else:
        print(f'note: the checkpoint holds the random states of {len(states)} processes, this run has '
              f'{get_world_size()}; random streams continue from --seed + rank instead')


class _WriteRecorder:
    """A binary file that remembers the OSError of a failed ``write``: ``torch.save`` reports a full disk only as a
    cryptic ``inline_container ... unexpected pos`` RuntimeError, so the real cause is kept here to be named."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.file.flush()


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace``: a crash mid-write never leaves a
    truncated checkpoint under the final name (auto-resume would pick it).

    A write that fails (full disk, quota, I/O error) raises ``ValueError`` naming the path and the cause; the earlier
    file under ``path`` is untouched and the temporary file is removed.
    """
    folder = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    for stale in glob.glob(os.path.join(glob.escape(folder), f'.{glob.escape(name)}.tmp*')):
        os.remove(stale)  # left by a process killed mid-write (SIGKILL skips the cleanup below)
    tmp = os.path.join(folder, f'.{name}.tmp{os.getpid()}')
    try:
        with open(tmp, 'wb') as f:
            recorder = _WriteRecorder(f)
            try:
                torch.save(obj, recorder)
            except RuntimeError:
                if recorder.error is None:
                    raise
                raise recorder.error from None
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the rename makes it visible
        os.replace(tmp, path)
    except OSError as e:
        raise ValueError(f'cannot write {path}: {e.strerror or e}; the files already there are untouched (free space '
                         f'or choose another --output_dir, then resume with --auto_resume true)') from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_on_master(obj: Any, path: str) -> None:
    if is_main_process():
        atomic_save(obj, path)


def save_model(args: argparse.Namespace, epoch, model, model_without_ddp, optimizer, loss_scaler, model_ema=None,
               mask=None, extra: Optional[Dict[str, Any]] = None, max_accuracy: Optional[float] = None,
               max_accuracy_ema: Optional[float] = None) -> None:
    """Write ``output_dir/checkpoint-{epoch}.pth`` (epoch: int, ``'best'`` or ``'best-ema'``) on the main process.

    Every rank must call it (the RNG states of all ranks are gathered); only the main process writes.
    Keys: ``model``, ``optimizer``, ``epoch``, ``scaler``, ``args`` (plain dict), ``model_ema`` (with EMA), ``mask``
    (``mask.state_dict()``: masks, mask step and prune-rate schedule), ``rng`` (one state per rank), the best
    accuracies so far, plus one key per entry of ``extra`` (objects with ``state_dict()``, e.g. a distillation
    projector). After an int epoch ``e``, ``checkpoint-{e - save_ckpt_num * save_ckpt_freq}.pth`` is deleted (keeps
    the last ``save_ckpt_num``).
    """
    rng = gather_rng_states()  # a collective: every rank calls save_model
    if not is_main_process():
        return
    path = os.path.join(args.output_dir, f'checkpoint-{epoch}.pth')
    to_save = {
        'model': model_without_ddp.state_dict(),
        'optimizer': optimizer.state_dict(),
        'epoch': epoch,
        'scaler': loss_scaler.state_dict(),
        'args': args_to_dict(args),
        'rng': rng,
    }
    if max_accuracy is not None:
        to_save['max_accuracy'] = float(max_accuracy)
    if max_accuracy_ema is not None:
        to_save['max_accuracy_ema'] = float(max_accuracy_ema)
    if model_ema is not None:
        to_save['model_ema'] = model_ema.ema.state_dict()
    if mask is not None:
        to_save['mask'] = mask.state_dict()
    for key, obj in (extra or {}).items():
        if key in to_save:
            raise ValueError(f'save_model: extra key {key!r} collides with a built-in checkpoint key')
        to_save[key] = obj.state_dict()
    atomic_save(to_save, path)
    if isinstance(epoch, int):
        old = os.path.join(args.output_dir, f'checkpoint-{epoch - args.save_ckpt_num * args.save_ckpt_freq}.pth')
        if os.path.exists(old):
            os.remove(old)


def latest_checkpoint(output_dir: str) -> Optional[str]:
    """The ``checkpoint-<N>.pth`` in ``output_dir`` with the largest integer N, or None."""
    best_n, best_path = -1, None
    for path in glob.glob(os.path.join(glob.escape(output_dir), 'checkpoint-*.pth')):
        m = re.fullmatch(r'checkpoint-(\d+)\.pth', os.path.basename(path))
        if m and int(m.group(1)) > best_n:
            best_n, best_path = int(m.group(1)), path
    return best_path


def auto_load_model(args: argparse.Namespace, model, model_without_ddp, optimizer, loss_scaler, model_ema=None,
                    extra: Optional[Dict[str, Any]] = None) -> Optional[dict]:
    """Resume from ``--resume`` or, when it is empty and ``--auto_resume`` is on, the newest ``checkpoint-N.pth``
    in ``--output_dir``. Returns the checkpoint's mask state (or None) so the caller builds the mask from it.

    Sets ``args.start_epoch`` (epoch + 1) and ``args.max_accuracy``/``args.max_accuracy_ema`` and restores the
    optimizer, loss scaler and RNG states when the checkpoint holds a training state (not with ``--eval true``). The
    file is read by ``SLaK.load_checkpoint_file`` (``weights_only=True``) and the model loaded strictly, so an
    architecture mismatch names the offending keys; every mismatch names the file (an auto-resumed one too).
    """
    import SLaK
    if not args.resume and args.auto_resume and args.output_dir:
        latest = latest_checkpoint(args.output_dir)
        if latest is not None:
            args.resume = latest
            print(f'Auto resume checkpoint: {latest}')
    if not args.resume:
        return None
    checkpoint = SLaK.load_checkpoint_file(args.resume)
    print(f'Resume checkpoint {args.resume}')
    SLaK.load_checkpoint(model_without_ddp, checkpoint, strict=True, keys=('model',), source=args.resume)
    # --eval needs only the weights: skipping the optimizer lets it read checkpoints of other --opt/--layer_decay runs
    if 'optimizer' in checkpoint and 'epoch' in checkpoint and not getattr(args, 'eval', False):
        if not isinstance(checkpoint['epoch'], int):
            raise ValueError(f'{args.resume} is a best-accuracy checkpoint (epoch={checkpoint["epoch"]!r}); it can be '
                             f'evaluated (--eval true) or used with --finetune, not resumed')
        try:
            optimizer.load_state_dict(checkpoint['optimizer'])
        except ValueError as e:
            raise ValueError(f'{args.resume}: its optimizer state does not fit this run ({e}); resume with the flags '
                             f'that wrote it, or take only its weights with --finetune') from None
        args.start_epoch = checkpoint['epoch'] + 1
        if 'scaler' in checkpoint:
            loss_scaler.load_state_dict(checkpoint['scaler'])
        args.max_accuracy = checkpoint.get('max_accuracy', 0.0)
        args.max_accuracy_ema = checkpoint.get('max_accuracy_ema', 0.0)
        if 'rng' in checkpoint:
            restore_rng_states(checkpoint['rng'])
        print('With optim & sched!')
    if model_ema is not None:
        ema_state = checkpoint.get('model_ema', checkpoint.get('model', checkpoint))
        SLaK.load_checkpoint(model_ema.ema, ema_state, strict=True, keys=(), source=f'{args.resume} (model_ema)')
    for key, obj in (extra or {}).items():
        if key in checkpoint:
            try:
                obj.load_state_dict(checkpoint[key])
            except (RuntimeError, ValueError) as e:  # nn.Module.load_state_dict raises a multi-line RuntimeError
                cause = ' '.join(str(e).split())
                raise ValueError(f'{args.resume}: its {key!r} entry does not fit this run ({cause})') from None
    return checkpoint.get('mask')


def load_state_dict(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], prefix: str = '',
                    source: str = 'checkpoint') -> None:
    """Non-strict load for ``--finetune`` that prints what was not initialised and what was not used.

    As in the original, ``prefix`` (``--model_prefix``) is the prefix of the *checkpoint's* keys: the model's
    ``stages.0.0.gamma`` is read from ``<prefix>stages.0.0.gamma``; keys without the prefix are not used. A
    checkpoint that gives the model none of its weights (conv kernels, linear layers; a matching bias alone does not
    count) raises ``ValueError`` naming ``source`` (the original printed the lists and trained from scratch).
    """
    own = model.state_dict()
    outside = [k for k in state_dict if not k.startswith(prefix)]
    state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if prefix and not state_dict:
        raise ValueError(f'--model_prefix {prefix!r} matches no key of the checkpoint (its keys look like '
                         f'{outside[:3]})')
    missing = [k for k in own if k not in state_dict]
    unexpected = [prefix + k for k in state_dict if k not in own] + outside
    shape_mismatch = [k for k in state_dict if k in own and state_dict[k].shape != own[k].shape]
    if not any(k in state_dict and k not in shape_mismatch for k, p in model.named_parameters() if p.dim() > 1):
        raise ValueError(f'{source} gives {type(model).__name__} none of its weights ({len(shape_mismatch)} shape '
                         f'mismatches, e.g. {shape_mismatch[:2]}; {len(unexpected)} unknown names, e.g. '
                         f'{unexpected[:2]}); training would start from scratch. Check --model, --kernel_size, '
                         f'--width_factor, --Decom, --bn, --model_key and --model_prefix')
    model.load_state_dict({k: v for k, v in state_dict.items() if k in own and k not in shape_mismatch},
                          strict=False)
    if missing:
        print(f'Weights of {type(model).__name__} not initialized from pretrained model: {missing}')
    if unexpected:
        print(f'Weights from pretrained model not used in {type(model).__name__}: {unexpected}')
    if shape_mismatch:
        print(f'Weights with a different shape, not loaded: {shape_mismatch}')


def make_writable_dir(path: str, flag: str) -> None:
    """Create folder ``path`` and write (and delete) a file in it, so that a ``--output_dir``/``--log_dir`` that cannot
    hold files fails before any work starts (the original found out at its first save, after a whole epoch)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f'{flag} {path} is a file, not a folder; pass a folder path')
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ValueError(f'{flag} {path} is not a writable folder ({e.strerror or e}); pass a folder you can write '
                         f'to') from None


def append_log(output_dir: str, stats: Dict[str, Any]) -> None:
    """Append one JSON line to ``output_dir/log.txt`` (main process)."""
    if output_dir and is_main_process():
        with open(os.path.join(output_dir, 'log.txt'), mode='a', encoding='utf-8') as f:
            f.write(json.dumps(stats) + '\n')
