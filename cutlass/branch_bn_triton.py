"""Training-mode BatchNorm of a SLaK block's parallel branches, summed, in three Triton kernels per pass.

``out = sum_i BN_i(y_i)`` for the 2 or 3 branch outputs ``y_i`` of ``ReparamLargeKernelConv`` (LoRA1, LoRA2,
small_conv), NCHW-contiguous, fp32/fp16/bf16, with fp32 statistics. PyTorch runs each BN on its own (bf16 NCHW:
ATen's native kernels; ``batch_norm_backward_kernel`` alone took 9.0 ms of a 92 ms SLaK-T step on an H200, against
a ~1.3 ms bandwidth floor for all 54 BNs) and then adds the outputs. Here the branches share every pass:

forward   1. ``stats``:    per (channel, batch split) sums of ``y_i - s_i`` and its square (``s_i`` = the channel's
                           first value: a shift against cancellation), written as partials (no atomics: same
                           result every run);
          2. ``finalize``: per channel mean and variance (Chan's combination of the partials, each with its own
                           shift), invstd, ``scale_i = w_i * invstd_i`` and the running-statistics update
                           (unbiased variance, as ``nn.BatchNorm2d``);
          3. ``apply``:    ``out = sum_i (y_i - mean_i) * scale_i + sum_i b_i``: reads each ``y_i`` once, writes once.
backward  1. ``reduce``:   per (channel, split) ``sum dy`` and ``sum dy * (y_i - mean_i)``;
          2. ``finalize``: weight and bias gradients, per-channel coefficients;
          3. ``apply``:    ``dx_i = a_i * (dy - mean(dy)) - a_i * k_i * (y_i - mean_i)`` with ``a_i = w_i invstd_i``,
                           ``k_i = invstd_i^2 mean(dy (y_i - mean_i))``: reads ``dy`` once for all branches.

With a process group (SyncBN, as ``utils.SyncBatchNormWithoutHostSync`` sets up) the statistics span every rank's
batch: between ``stats`` and ``finalize`` one all-gather of the partials, between ``reduce`` and ``finalize`` one
all-reduce, for all branches of the block together (and no host synchronisation).

Bytes per block for T = one branch tensor: forward 7 T (3 reads for the statistics, 3 reads + 1 write to apply),
backward 11 T, against ~21 T for three separate BatchNorms plus two additions. This file is loaded by path
(``cutlass/`` is not a package) from ``depthwise_conv2d_implicit_gemm.py``, which decides when it applies.
"""
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
import triton
import triton.language as tl


# Each kernel handles 1-3 branches with explicit pointers and compile-time ``if NB > k`` guards (one helper call per
# branch), so no pointer is ever selected at run time.

@triton.jit
def _stats_one(y, buf, i, s, c, N, C, HW, SPLIT, NB: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    shift = tl.load(y + c.to(tl.int64) * HW).to(tl.float32)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK], dtype=tl.float32)
    for n in range(s, N, SPLIT):
        base = (n * C + c).to(tl.int64) * HW
        for h0 in range(0, HW, BLOCK):
            idx = h0 + offs
            ok = idx < HW
            d = tl.where(ok, tl.load(y + base + idx, mask=ok, other=0.0).to(tl.float32) - shift, 0.0)
            acc += d
            acc2 += d * d
    tl.store(buf + (s * 2 * NB + 2 * i) * C + c, tl.sum(acc, axis=0))
    tl.store(buf + (s * 2 * NB + 2 * i + 1) * C + c, tl.sum(acc2, axis=0))
    if s == 0:
        tl.store(buf + (SPLIT * 2 * NB + i) * C + c, shift)


@triton.jit
def bn_stats_kernel(y0, y1, y2, buf, N, C, HW, SPLIT, NB: tl.constexpr, BLOCK: tl.constexpr):
    """One rank's statistics, as rows of C values: ``buf[s * 2NB + 2i] = sum (y_i - shift_i)`` and
    ``buf[s * 2NB + 2i + 1] = sum (y_i - shift_i)^2`` over images s, s + SPLIT, ...; ``buf[SPLIT * 2NB + i] =
    shift_i`` (the channel's first value); ``buf[SPLIT * 2NB + NB] = N`` (this rank's images)."""
    c = tl.program_id(0)
    s = tl.program_id(1)
    _stats_one(y0, buf, 0, s, c, N, C, HW, SPLIT, NB, BLOCK)
    if NB > 1:
        _stats_one(y1, buf, 1, s, c, N, C, HW, SPLIT, NB, BLOCK)
    if NB > 2:
        _stats_one(y2, buf, 2, s, c, N, C, HW, SPLIT, NB, BLOCK)
    if s == 0:
        tl.store(buf + (SPLIT * 2 * NB + NB) * C + c, N.to(tl.float32))


@triton.jit
def _partials(buf, r, i, cs, c_ok, sp, ok2, C, HW, SPLIT, NB: tl.constexpr):
    """Rank ``r``'s partials of branch ``i``: (pixel count, shifted sum, shifted sum of squares) per (split,
    channel), and the rank's shift per channel."""
    base = buf + r * (SPLIT * 2 * NB + NB + 1) * C
    images = tl.load(base + (SPLIT * 2 * NB + NB) * C + cs, mask=c_ok, other=0.0).to(tl.int32)
    count = tl.where(ok2, ((images[None, :] - sp[:, None] + SPLIT - 1) // SPLIT) * HW, 0).to(tl.float32)
    s1 = tl.load(base + (sp[:, None] * 2 * NB + 2 * i) * C + cs[None, :], mask=ok2, other=0.0)
    s2 = tl.load(base + (sp[:, None] * 2 * NB + 2 * i + 1) * C + cs[None, :], mask=ok2, other=0.0)
    shift = tl.load(base + (SPLIT * 2 * NB + i) * C + cs, mask=c_ok, other=0.0)
    return count, s1, s2, shift


@triton.jit
def _fwd_finalize_one(buf, WORLD, w_ptr, b_ptr, rm, rv, coef_ptr, i, cs, c_ok, sp, ok2, C, HW, SPLIT, eps,
                      momentum, NB: tl.constexpr):
    # Chan's combination of the (rank, split) partials, each with its own shift: first the mean ...
    total = tl.zeros_like(cs).to(tl.float32)
    acc = tl.zeros_like(cs).to(tl.float32)
    for r in range(0, WORLD):
        count, s1, s2, shift = _partials(buf, r, i, cs, c_ok, sp, ok2, C, HW, SPLIT, NB)
        n_r = tl.sum(count, 0)
        total += n_r
        acc += n_r * shift + tl.sum(s1, 0)
    mean = acc / total
    # ... then the sum of squared deviations: within each partial plus between partials.
    m2 = tl.zeros_like(cs).to(tl.float32)
    for r in range(0, WORLD):
        count, s1, s2, shift = _partials(buf, r, i, cs, c_ok, sp, ok2, C, HW, SPLIT, NB)
        safe = tl.maximum(count, 1.0)
        d = shift[None, :] + s1 / safe - mean[None, :]
        m2 += tl.sum(tl.where(count > 0, s2 - s1 * s1 / safe + count * d * d, 0.0), 0)
    var = tl.maximum(m2 / total, 0.0)
    invstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + cs, mask=c_ok, other=1.0)
    tl.store(coef_ptr + (0 * NB + i) * C + cs, mean, mask=c_ok)
    tl.store(coef_ptr + (1 * NB + i) * C + cs, invstd, mask=c_ok)
    tl.store(coef_ptr + (2 * NB + i) * C + cs, w * invstd, mask=c_ok)
    old_m = tl.load(rm + cs, mask=c_ok, other=0.0)
    old_v = tl.load(rv + cs, mask=c_ok, other=0.0)
    tl.store(rm + cs, (1.0 - momentum) * old_m + momentum * mean, mask=c_ok)
    tl.store(rv + cs, (1.0 - momentum) * old_v + momentum * var * (total / (total - 1.0)), mask=c_ok)
    tl.store(coef_ptr + (3 * NB + 1) * C + cs, total, mask=c_ok)
    return tl.load(b_ptr + cs, mask=c_ok, other=0.0)


@triton.jit
def bn_fwd_finalize_kernel(buf, WORLD, w0, w1, w2, b0, b1, b2, rm0, rm1, rm2, rv0, rv1, rv2, coef_ptr,
                           C, HW, SPLIT, eps, momentum, NB: tl.constexpr, BLOCK_C: tl.constexpr,
                           SPLIT_P2: tl.constexpr):
    """From the statistics of WORLD ranks (``buf``: WORLD blocks laid out as ``bn_stats_kernel`` writes them):
    coef[0, i] = mean_i, coef[1, i] = invstd_i, coef[2, i] = scale_i (3 x NB rows of C), coef[3 NB] = sum_i b_i,
    coef[3 NB + 1] = the pixel count over all ranks; running statistics updated in place."""
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cs < C
    sp = tl.arange(0, SPLIT_P2)
    ok2 = (sp < SPLIT)[:, None] & c_ok[None, :]
    bias_sum = _fwd_finalize_one(buf, WORLD, w0, b0, rm0, rv0, coef_ptr, 0, cs, c_ok, sp, ok2, C, HW, SPLIT, eps,
                                 momentum, NB)
    if NB > 1:
        bias_sum += _fwd_finalize_one(buf, WORLD, w1, b1, rm1, rv1, coef_ptr, 1, cs, c_ok, sp, ok2, C, HW, SPLIT,
                                      eps, momentum, NB)
    if NB > 2:
        bias_sum += _fwd_finalize_one(buf, WORLD, w2, b2, rm2, rv2, coef_ptr, 2, cs, c_ok, sp, ok2, C, HW, SPLIT,
                                      eps, momentum, NB)
    tl.store(coef_ptr + 3 * NB * C + cs, bias_sum, mask=c_ok)


@triton.jit
def _fwd_apply_one(y, coef_ptr, i, offs, ok, c, C, NB: tl.constexpr):
    v = tl.load(y + offs, mask=ok, other=0.0).to(tl.float32)
    mean = tl.load(coef_ptr + (0 * NB + i) * C + c, mask=ok, other=0.0)
    scale = tl.load(coef_ptr + (2 * NB + i) * C + c, mask=ok, other=0.0)
    return (v - mean) * scale


@triton.jit
def bn_fwd_apply_kernel(y0, y1, y2, out_ptr, coef_ptr, C, HW, total, NB: tl.constexpr, BLOCK: tl.constexpr,
                        WIDE: tl.constexpr):
    if WIDE:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < total
    c = (offs // HW) % C
    acc = tl.load(coef_ptr + 3 * NB * C + c, mask=ok, other=0.0)
    acc += _fwd_apply_one(y0, coef_ptr, 0, offs, ok, c, C, NB)
    if NB > 1:
        acc += _fwd_apply_one(y1, coef_ptr, 1, offs, ok, c, C, NB)
    if NB > 2:
        acc += _fwd_apply_one(y2, coef_ptr, 2, offs, ok, c, C, NB)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def bn_bwd_reduce_kernel(dy_ptr, y0, y1, y2, coef_ptr, part_ptr, N, C, HW, SPLIT, NB: tl.constexpr,
                         BLOCK: tl.constexpr):
    """part[s, 0, c] = sum dy, part[s, 1 + i, c] = sum dy * (y_i - mean_i)."""
    c = tl.program_id(0)
    s = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    m0 = tl.load(coef_ptr + 0 * C + c)
    m1 = tl.load(coef_ptr + (1 % NB) * C + c)
    m2 = tl.load(coef_ptr + (2 % NB) * C + c)
    g = tl.zeros([BLOCK], dtype=tl.float32)
    h0 = tl.zeros([BLOCK], dtype=tl.float32)
    h1 = tl.zeros([BLOCK], dtype=tl.float32)
    h2 = tl.zeros([BLOCK], dtype=tl.float32)
    for n in range(s, N, SPLIT):
        base = (n * C + c).to(tl.int64) * HW
        for p0 in range(0, HW, BLOCK):
            idx = p0 + offs
            ok = idx < HW
            dy = tl.load(dy_ptr + base + idx, mask=ok, other=0.0).to(tl.float32)
            g += dy
            h0 += dy * tl.where(ok, tl.load(y0 + base + idx, mask=ok, other=0.0).to(tl.float32) - m0, 0.0)
            if NB > 1:
                h1 += dy * tl.where(ok, tl.load(y1 + base + idx, mask=ok, other=0.0).to(tl.float32) - m1, 0.0)
            if NB > 2:
                h2 += dy * tl.where(ok, tl.load(y2 + base + idx, mask=ok, other=0.0).to(tl.float32) - m2, 0.0)
    row = part_ptr + s * (1 + NB) * C + c
    tl.store(row, tl.sum(g, axis=0))
    tl.store(row + C, tl.sum(h0, axis=0))
    if NB > 1:
        tl.store(row + 2 * C, tl.sum(h1, axis=0))
    if NB > 2:
        tl.store(row + 3 * C, tl.sum(h2, axis=0))


@triton.jit
def _bwd_finalize_one(part_ptr, glob_ptr, coef_ptr, w_ptr, gw_ptr, gb_ptr, bcoef_ptr, g, i, cs, c_ok, sp, ok2, C,
                      count, NB: tl.constexpr):
    rows = (sp[:, None] * (1 + NB) + 1 + i) * C + cs[None, :]
    h = tl.sum(tl.load(part_ptr + rows, mask=ok2, other=0.0), 0)
    h_all = tl.sum(tl.load(glob_ptr + rows, mask=ok2, other=0.0), 0)
    invstd = tl.load(coef_ptr + (NB + i) * C + cs, mask=c_ok, other=0.0)
    w = tl.load(w_ptr + cs, mask=c_ok, other=0.0)
    tl.store(gw_ptr + i * C + cs, h * invstd, mask=c_ok)
    tl.store(gb_ptr + i * C + cs, g, mask=c_ok)
    a = w * invstd
    tl.store(bcoef_ptr + (1 + i) * C + cs, a, mask=c_ok)
    tl.store(bcoef_ptr + (1 + NB + i) * C + cs, a * invstd * invstd * (h_all / count), mask=c_ok)


@triton.jit
def bn_bwd_finalize_kernel(part_ptr, glob_ptr, coef_ptr, w0, w1, w2, gw_ptr, gb_ptr, bcoef_ptr, C, SPLIT,
                           NB: tl.constexpr, BLOCK_C: tl.constexpr, SPLIT_P2: tl.constexpr):
    """gw[i] = sum dy (y_i - mean_i) * invstd_i, gb[i] = sum dy over this rank (``part``; the data-parallel
    wrapper averages parameter gradients, as for ``nn.SyncBatchNorm``); bcoef[0] = mean(dy), bcoef[1 + i] = a_i,
    bcoef[1 + NB + i] = a_i * k_i over all ranks (``glob``: ``part`` summed over ranks; ``part`` itself in one
    process)."""
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cs < C
    sp = tl.arange(0, SPLIT_P2)
    ok2 = (sp < SPLIT)[:, None] & c_ok[None, :]
    count = tl.load(coef_ptr + (3 * NB + 1) * C + cs, mask=c_ok, other=1.0)
    rows = (sp[:, None] * (1 + NB)) * C + cs[None, :]
    g = tl.sum(tl.load(part_ptr + rows, mask=ok2, other=0.0), 0)
    tl.store(bcoef_ptr + cs, tl.sum(tl.load(glob_ptr + rows, mask=ok2, other=0.0), 0) / count, mask=c_ok)
    _bwd_finalize_one(part_ptr, glob_ptr, coef_ptr, w0, gw_ptr, gb_ptr, bcoef_ptr, g, 0, cs, c_ok, sp, ok2, C, count,
                      NB)
    if NB > 1:
        _bwd_finalize_one(part_ptr, glob_ptr, coef_ptr, w1, gw_ptr, gb_ptr, bcoef_ptr, g, 1, cs, c_ok, sp, ok2, C,
                          count, NB)
    if NB > 2:
        _bwd_finalize_one(part_ptr, glob_ptr, coef_ptr, w2, gw_ptr, gb_ptr, bcoef_ptr, g, 2, cs, c_ok, sp, ok2, C,
                          count, NB)


@triton.jit
def _bwd_apply_one(y, dx, coef_ptr, bcoef_ptr, dy, i, offs, ok, c, C, NB: tl.constexpr):
    v = tl.load(y + offs, mask=ok, other=0.0).to(tl.float32)
    mean = tl.load(coef_ptr + i * C + c, mask=ok, other=0.0)
    a = tl.load(bcoef_ptr + (1 + i) * C + c, mask=ok, other=0.0)
    ak = tl.load(bcoef_ptr + (1 + NB + i) * C + c, mask=ok, other=0.0)
    tl.store(dx + offs, (a * dy - ak * (v - mean)).to(dx.dtype.element_ty), mask=ok)


@triton.jit
def bn_bwd_apply_kernel(dy_ptr, y0, y1, y2, dx0, dx1, dx2, coef_ptr, bcoef_ptr, C, HW, total, NB: tl.constexpr,
                        BLOCK: tl.constexpr, WIDE: tl.constexpr):
    if WIDE:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < total
    c = (offs // HW) % C
    dy = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(tl.float32) - tl.load(bcoef_ptr + c, mask=ok, other=0.0)
    _bwd_apply_one(y0, dx0, coef_ptr, bcoef_ptr, dy, 0, offs, ok, c, C, NB)
    if NB > 1:
        _bwd_apply_one(y1, dx1, coef_ptr, bcoef_ptr, dy, 1, offs, ok, c, C, NB)
    if NB > 2:
        _bwd_apply_one(y2, dx2, coef_ptr, bcoef_ptr, dy, 2, offs, ok, c, C, NB)


_APPLY_BLOCK = 2048
_FINALIZE_BLOCK_C = 128


_SM_COUNT = {}
# Across ranks the statistics buffers must have one layout whatever the GPU model and local batch: a fixed
# program budget instead of the SM count.
_DIST_PROGRAMS = 512


def _stats_config(n: int, c: int, hw: int, device: torch.device, distributed: bool = False):
    """(split, block): enough (channel, split) programs to fill the GPU; blocks of up to 1024 pixels."""
    block = min(1024, max(32, triton.next_power_of_2(hw)))
    if distributed:  # independent of the device and of n (splits past a rank's last image stay empty)
        return max(1, min(32, triton.cdiv(_DIST_PROGRAMS, c))), block
    sms = _SM_COUNT.get(device)
    if sms is None:
        sms = _SM_COUNT[device] = (torch.cuda.get_device_properties(device).multi_processor_count
                                   if device.type == "cuda" else 4)
    return max(1, min(n, 32, triton.cdiv(4 * sms, c))), block


def _three(ts: Sequence[Optional[torch.Tensor]]) -> List[Optional[torch.Tensor]]:
    """Kernels take three pointers; unused ones repeat the first (never read: NB is a compile-time constant)."""
    return list(ts) + [ts[0]] * (3 - len(ts))


# torch >= 2.14 renamed all_gather_into_tensor (same signature) and deprecates the old name.
_all_gather_single = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)


def bn_sum_forward(eps: float, momentum: float, ys: Sequence[torch.Tensor], ws: Sequence[torch.Tensor],
                   bs: Sequence[torch.Tensor], rms: Sequence[torch.Tensor], rvs: Sequence[torch.Tensor],
                   group=None, world_size: int = 1):
    """The forward pass of :class:`BranchBatchNormSum` (arguments as there, as sequences): ``(out, coef, split,
    block)``, ``coef`` the (3 nb + 2, C) fp32 per-channel coefficients the backward pass reads; updates the running
    statistics in place."""
    nb = len(ys)
    n, c, h, w = ys[0].shape
    hw, total = h * w, ys[0].numel()
    device = ys[0].device
    split, block = _stats_config(n, c, hw, device, distributed=world_size > 1)
    local = torch.empty((split * 2 * nb + nb + 1, c), device=device, dtype=torch.float32)
    bn_stats_kernel[(c, split)](*_three(ys), local, n, c, hw, split, NB=nb, BLOCK=block, num_warps=4)
    if world_size > 1:
        # (world * rows, C): the ranks' blocks one after another (the layout gloo and NCCL both accept)
        stats = torch.empty((world_size * local.shape[0], c), device=device, dtype=torch.float32)
        _all_gather_single(stats, local, group=group)
    else:
        stats = local
    coef = torch.empty((3 * nb + 2, c), device=device, dtype=torch.float32)
    bn_fwd_finalize_kernel[(triton.cdiv(c, _FINALIZE_BLOCK_C),)](
        stats, world_size, *_three(ws), *_three(bs), *_three(rms), *_three(rvs), coef, c, hw, split,
        float(eps), float(momentum), NB=nb, BLOCK_C=_FINALIZE_BLOCK_C,
        SPLIT_P2=triton.next_power_of_2(split), num_warps=4)
    out = torch.empty_like(ys[0])
    bn_fwd_apply_kernel[(triton.cdiv(total, _APPLY_BLOCK),)](
        *_three(ys), out, coef, c, hw, total, NB=nb, BLOCK=_APPLY_BLOCK, WIDE=total >= 2 ** 31 - _APPLY_BLOCK,
        num_warps=8)
    return out, coef, split, block


def bn_sum_backward(dy: torch.Tensor, ys: Sequence[torch.Tensor], ws: Sequence[torch.Tensor], coef: torch.Tensor,
                    split: int, block: int, group=None, world_size: int = 1):
    """The backward pass of :class:`BranchBatchNormSum`: ``(dxs, gw, gb)``, the branch input gradients and the
    (nb, C) fp32 weight and bias gradients, for the output gradient ``dy`` (NCHW-contiguous). The callers cast
    ``gw[i]``/``gb[i]`` to each weight's dtype (the registered op cannot: its outputs may not be views of one
    buffer)."""
    nb = len(ys)
    n, c, h, w = ys[0].shape
    hw, total = h * w, ys[0].numel()
    part = torch.empty((split, 1 + nb, c), device=dy.device, dtype=torch.float32)
    bn_bwd_reduce_kernel[(c, split)](dy, *_three(ys), coef, part, n, c, hw, split, NB=nb, BLOCK=block, num_warps=4)
    glob = part
    if world_size > 1:
        glob = part.clone()
        dist.all_reduce(glob, group=group)
    gw = torch.empty((nb, c), device=dy.device, dtype=torch.float32)
    gb = torch.empty((nb, c), device=dy.device, dtype=torch.float32)
    bcoef = torch.empty((1 + 2 * nb, c), device=dy.device, dtype=torch.float32)
    bn_bwd_finalize_kernel[(triton.cdiv(c, _FINALIZE_BLOCK_C),)](
        part, glob, coef, *_three(ws), gw, gb, bcoef, c, split, NB=nb, BLOCK_C=_FINALIZE_BLOCK_C,
        SPLIT_P2=triton.next_power_of_2(split), num_warps=4)
    dxs = [torch.empty_like(ys[0]) for _ in range(nb)]
    bn_bwd_apply_kernel[(triton.cdiv(total, _APPLY_BLOCK),)](
        dy, *_three(ys), *_three(dxs), coef, bcoef, c, hw, total, NB=nb, BLOCK=_APPLY_BLOCK,
        WIDE=total >= 2 ** 31 - _APPLY_BLOCK, num_warps=8)
    return dxs, gw, gb


class BranchBatchNormSum(torch.autograd.Function):
    """``sum_i batch_norm(y_i, running_mean_i, running_var_i, w_i, b_i, training=True, momentum, eps)``.

    Arguments after ``ctx``: ``eps``, ``momentum``, ``nb`` (2 or 3), ``group`` and ``world_size`` (the process
    group whose batch the statistics cover, as ``nn.SyncBatchNorm``; None and 1 for one process), then
    ``y_1..y_nb`` (same shape, NCHW-contiguous, same dtype), ``w_1..w_nb``, ``b_1..b_nb``,
    ``running_mean_1..nb``, ``running_var_1..nb`` (fp32, (C,)). Returns the sum in the dtype of the ``y_i``;
    gradients for the ``y_i``, weights and biases (fp32).

    Across ranks (batches may differ in size) each pass moves one small buffer: the forward all-gathers every
    rank's partial sums (a few thousand floats), the backward all-reduces them; no host synchronisation.
    """

    @staticmethod
    def forward(ctx, eps, momentum, nb, group, world_size, *tensors):
        ys, ws, bs = tensors[:nb], tensors[nb:2 * nb], tensors[2 * nb:3 * nb]
        rms, rvs = tensors[3 * nb:4 * nb], tensors[4 * nb:5 * nb]
        out, coef, split, block = bn_sum_forward(eps, momentum, ys, ws, bs, rms, rvs, group, world_size)
        ctx.nb, ctx.split, ctx.block = nb, split, block
        ctx.group, ctx.world_size = group, world_size
        ctx.save_for_backward(*ys, *ws, coef)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        nb = ctx.nb
        saved = ctx.saved_tensors
        ys, ws, coef = saved[:nb], saved[nb:2 * nb], saved[2 * nb]
        dxs, gw, gb = bn_sum_backward(grad_out.contiguous(), ys, ws, coef, ctx.split, ctx.block, ctx.group,
                                      ctx.world_size)
        grad_w = [gw[i].to(ws[i].dtype) for i in range(nb)]
        grad_b = [gb[i].to(ws[i].dtype) for i in range(nb)]
        return (None, None, None, None, None, *dxs, *grad_w, *grad_b, *([None] * (2 * nb)))


# ---- the same maths as registered ops, for a model compiled as a whole (torch.compile sees only registered ops) ----
# An op with an autograd formula must be functional: the forward op returns the new running statistics instead of
# writing them, and the caller copies them into the BatchNorms' buffers (a few hundred floats).
def _op_forward(ys: List[torch.Tensor], weights: List[torch.Tensor], biases: List[torch.Tensor],
                running_means: List[torch.Tensor], running_vars: List[torch.Tensor], eps: float,
                momentum: float) -> List[torch.Tensor]:
    """One process's :class:`BranchBatchNormSum` forward as a functional op: ``[out, coef, running_mean_1..nb,
    running_var_1..nb]`` (the sum, the coefficients its backward reads, the updated running statistics)."""
    rms = [t.clone() for t in running_means]
    rvs = [t.clone() for t in running_vars]
    out, coef, _, _ = bn_sum_forward(eps, momentum, [y.contiguous() for y in ys], weights, biases, rms, rvs)
    return [out, coef, *rms, *rvs]


def _op_forward_fake(ys, weights, biases, running_means, running_vars, eps, momentum):
    return ([torch.empty_like(ys[0], memory_format=torch.contiguous_format),
             ys[0].new_empty((3 * len(ys) + 2, ys[0].shape[1]), dtype=torch.float32)]
            + [torch.empty_like(t) for t in (*running_means, *running_vars)])


def _op_backward_impl(grad_out: torch.Tensor, ys: List[torch.Tensor], weights: List[torch.Tensor],
                      coef: torch.Tensor) -> List[torch.Tensor]:
    """``[dx_1..dx_nb, gw, gb]`` of the forward op (``gw``, ``gb``: (nb, C) fp32)."""
    n, c, h, w = ys[0].shape
    split, block = _stats_config(n, c, h * w, ys[0].device)  # as the forward chose them (one process)
    dxs, gw, gb = bn_sum_backward(grad_out.contiguous(), ys, weights, coef, split, block)
    return [*dxs, gw, gb]


def _op_backward_fake(grad_out, ys, weights, coef):
    nb, c = len(ys), ys[0].shape[1]
    return ([torch.empty_like(ys[0], memory_format=torch.contiguous_format) for _ in range(nb)]
            + [coef.new_empty((nb, c)), coef.new_empty((nb, c))])


def _op_setup_context(ctx, inputs, output) -> None:
    ys, weights = inputs[0], inputs[1]
    ctx.nb = len(ys)
    ctx.save_for_backward(*ys, *weights, output[1])


def _op_autograd(ctx, grads):
    nb = ctx.nb
    saved = ctx.saved_tensors
    ys, ws, coef = list(saved[:nb]), list(saved[nb:2 * nb]), saved[2 * nb]
    res = torch.ops.slak.branch_bn_sum_backward(grads[0].contiguous(), ys, ws, coef)
    gw, gb = res[nb], res[nb + 1]
    return (list(res[:nb]), [gw[i].to(ws[i].dtype) for i in range(nb)], [gb[i].to(ws[i].dtype) for i in range(nb)],
            [None] * nb, [None] * nb, None, None)  # (same structure as the inputs: lists for list arguments)


def _register_ops() -> Optional[str]:
    """Registers ``slak::branch_bn_sum`` and ``slak::branch_bn_sum_backward``; the reason as text if this torch
    refuses (the eager kernels above stay usable either way)."""
    try:
        fwd = torch.library.custom_op("slak::branch_bn_sum", _op_forward, mutates_args=())
        fwd.register_fake(_op_forward_fake)
        bwd = torch.library.custom_op("slak::branch_bn_sum_backward", _op_backward_impl, mutates_args=())
        bwd.register_fake(_op_backward_fake)
        fwd.register_autograd(_op_autograd, setup_context=_op_setup_context)
    except Exception as exc:  # noqa: BLE001 - an older/newer torch must not cost the eager fused kernels
        return f"{type(exc).__name__}: {exc}"
    return None


OP_UNAVAILABLE = _register_ops()  # None when torch.ops.slak.branch_bn_sum exists


# ---- the launches of one block, found without launching (for compiling them ahead) ---------------------------------
_KERNEL_NAMES = ("bn_stats_kernel", "bn_fwd_finalize_kernel", "bn_fwd_apply_kernel", "bn_bwd_reduce_kernel",
                 "bn_bwd_finalize_kernel", "bn_bwd_apply_kernel")


def block_launches(capture, n: int, c: int, h: int, w: int, nb: int, dtype: torch.dtype, sms: Optional[int] = None,
                   world_size: int = 1) -> list:
    """The launches ``(kernel, args, kwargs)`` (tensors given as their dtypes, what ``JITFunction.warmup`` takes) of
    one block's :class:`BranchBatchNormSum`, forward and backward, for ``nb`` branch outputs of shape (n, c, h, w)
    in ``dtype`` on a GPU with ``sms`` multiprocessors (the statistics' split depends on it; None: the fallback of 4)
    and a process group of ``world_size`` ranks. Found on meta tensors with the kernels replaced by ``capture(kernel,
    out)`` recorders (``dwconv_triton._LaunchCapture``: this file is loaded by path and does not import its sibling):
    nothing runs. Not thread-safe: call it where no other thread launches these kernels."""
    out: list = []
    meta = torch.device("meta")
    saved = {name: globals()[name] for name in _KERNEL_NAMES + ("_all_gather_single", "dist")}
    saved_sms = _SM_COUNT.get(meta)
    try:
        for name in _KERNEL_NAMES:
            globals()[name] = capture(saved[name], out)
        # the collectives of world_size > 1 move meta tensors: nothing to do
        globals()["_all_gather_single"] = lambda *args, **kwargs: None
        globals()["dist"] = type("NoCollectives", (), {"all_reduce": staticmethod(lambda *args, **kwargs: None)})
        _SM_COUNT[meta] = sms if sms is not None else 4
        ys = [torch.empty(n, c, h, w, device=meta, dtype=dtype, requires_grad=True) for _ in range(nb)]
        params = [torch.empty(c, device=meta, requires_grad=True) for _ in range(2 * nb)]
        stats = [torch.empty(c, device=meta) for _ in range(2 * nb)]
        with torch.enable_grad():  # (the caller may be under no_grad)
            y = BranchBatchNormSum.apply(1e-5, 0.1, nb, None, world_size, *ys, *params, *stats)
            y.backward(torch.empty_like(y))
    finally:
        globals().update(saved)
        if saved_sms is None:
            _SM_COUNT.pop(meta, None)
        else:
            _SM_COUNT[meta] = saved_sms
    return out


# ---- the block input's gradient: its branch handles' half-precision gradients and the shortcut's, in one pass --------
@triton.jit
def fan_in_kernel(out_ptr, s_ptr, g0, g1, g2, total, NB: tl.constexpr, HAS_S: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < total
    acc = tl.load(g0 + offs, mask=ok).to(tl.float32)
    if NB > 1:
        acc = acc + tl.load(g1 + offs, mask=ok).to(tl.float32)
    if NB > 2:
        acc = acc + tl.load(g2 + offs, mask=ok).to(tl.float32)
    if HAS_S:
        acc = acc + tl.load(s_ptr + offs, mask=ok).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


def fan_in_sum(grads: Sequence[torch.Tensor], shortcut: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``((g0 + g1) + g2) + shortcut`` in float32, then ``dtype``: the gradient of a block input that fed 1-3 branch
    convs through one half-precision copy (``SLaK._FanOutCast``) and the residual. Reads each gradient once and
    writes the sum once (PyTorch: a cast copy, one add per further branch and autograd's add of the shortcut's
    gradient, ~38 against ~14 bytes per fp32 element for three bf16 branches). Same additions in the same order as
    those ops, so the same bits. All tensors contiguous and of one shape (the caller checks)."""
    out = torch.empty(grads[0].shape, device=grads[0].device, dtype=dtype)
    total = out.numel()
    block = 1024
    g = _three(list(grads))
    fan_in_kernel[(triton.cdiv(total, block),)](out, shortcut if shortcut is not None else out, g[0], g[1], g[2],
                                                 total, NB=len(grads), HAS_S=shortcut is not None, BLOCK=block,
                                                 num_warps=4)
    return out


def fan_in_launches(capture, n: int, c: int, h: int, w: int, nb: int, dtype: torch.dtype) -> list:
    """The launch ``(kernel, args, kwargs)`` of :func:`fan_in_sum` for one block's input gradient: ``nb`` branch
    gradients in ``dtype`` and the float32 shortcut's, of shape (n, c, h, w), found as :func:`block_launches` finds
    its own (meta tensors, the kernel replaced by ``capture(kernel, out)``): nothing runs. Not thread-safe."""
    global fan_in_kernel
    out: list = []
    meta = torch.device("meta")
    real = fan_in_kernel
    try:
        fan_in_kernel = capture(real, out)
        fan_in_sum([torch.empty(n, c, h, w, device=meta, dtype=dtype) for _ in range(nb)],
                   torch.empty(n, c, h, w, device=meta), torch.float32)
    finally:
        fan_in_kernel = real
    return out
