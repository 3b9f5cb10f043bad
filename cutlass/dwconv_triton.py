"""Triton kernels for stride-1 "same" depthwise convolution as banded (Toeplitz) matrix products.

Also registers the torch ops ``slak::dwconv2d`` and ``slak::dwconv2d_weight_grad`` (autograd, fake tensors,
FLOP formulas). Loaded by file path from ``depthwise_conv2d_implicit_gemm.py`` (never ``import cutlass.x``:
NVIDIA's ``cutlass`` package must not be shadowed). See that module's docstring for the algorithm and the public API.

Both kernels work on one "band axis" of length ``H`` and one "flat axis" of length ``W``; the caller passes strides
so that the band axis is the one along which the kernel is longer (``H`` for 51x5, ``W`` for 5x51). Along the band
axis a kernel column ``j`` is a Toeplitz matrix ``T_j[h, k] = w[k - h + PH, j]`` that multiplies the input rows; along
the flat axis the images of the batch and the ``W`` positions are flattened into one GEMM dimension, which keeps the
tensor cores busy on small feature maps (7x7, 14x14) where one image alone would fill a tile poorly.
"""
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.utils.flop_counter import register_flop_formula


@triton.jit
def dwconv_fwd_kernel(
    x_ptr, w_ptr, out_ptr,
    N, H, W,
    sxn, sxc, sxh, sxw,
    swc, swh, sww,
    son, soc, soh, sow,
    KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_TF32: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """out[n, c, h, w] = sum_{i, j} x[n, c, h + i - KH//2, w + j - KW//2] * w[c, i, j] (zero padded).

    Grid: (cdiv(N * W, BLOCK_N), cdiv(H, BLOCK_M), C). Each program owns BLOCK_M output rows of one channel and
    BLOCK_N flattened (image, column) positions, and accumulates ``T_j @ X_j`` in fp32 over kernel columns ``j``
    and chunks of input rows.
    """
    PH: tl.constexpr = KH // 2
    PW: tl.constexpr = KW // 2
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    c = tl.program_id(2).to(tl.int64)

    h0 = pid_m * BLOCK_M
    rows = h0 + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N * W
    img = (cols // W).to(tl.int64)
    wpos = cols % W
    x_col_base = x_ptr + c * sxc + img * sxn
    w_base = w_ptr + c * swc

    # Only input rows inside the image and inside the band of this row tile contribute.
    k_lo = tl.maximum(h0 - PH, 0)
    k_hi = tl.minimum(h0 + BLOCK_M + PH, H)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    kk = tl.arange(0, BLOCK_K)
    for j in range(KW):
        win = wpos + (j - PW)
        win_ok = col_ok & (win >= 0) & (win < W)
        x_cols = x_col_base + win.to(tl.int64) * sxw
        for k0 in range(k_lo, k_hi, BLOCK_K):
            krow = k0 + kk
            # Toeplitz block of the weight: A[m, k] = w[c, krow[k] - rows[m] + PH, j].
            tap = krow[None, :] - rows[:, None] + PH
            a = tl.load(w_base + tap * swh + j * sww, mask=(tap >= 0) & (tap < KH), other=0.0)
            b = tl.load(x_cols[None, :] + krow.to(tl.int64)[:, None] * sxh,
                        mask=win_ok[None, :] & (krow < k_hi)[:, None], other=0.0)
            if UPCAST_DOT:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            if USE_TF32:
                acc = tl.dot(a, b, acc, input_precision="tf32")
            else:
                acc = tl.dot(a, b, acc, input_precision="ieee")
    out_ptrs = (out_ptr + c * soc + img[None, :] * son + wpos.to(tl.int64)[None, :] * sow
                + rows.to(tl.int64)[:, None] * soh)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=col_ok[None, :] & (rows < H)[:, None])


@triton.jit
def dwconv_wgrad_kernel(
    x_ptr, dy_ptr, dw_ptr,
    N, H, W, COLS_PER_SPLIT,
    sxn, sxc, sxh, sxw,
    sdn, sdc, sdh, sdw,
    swc, swh, sww,
    KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_TF32: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """dw[c, i, j] += sum_{n, h, w} dy[n, c, h, w] * x[n, c, h + i - KH//2, w + j - KW//2] into an fp32 buffer.

    Grid: (C * KW, cdiv(H, BLOCK_M) * cdiv(H, BLOCK_K), splits). A program forms the Gram block
    ``G[h, k] = sum_cols dy[h, col] * x[k, col + j - PW]`` over its share of the flattened (image, column) axis on
    tensor cores, then sums each diagonal ``k - h = i - PH`` of ``G`` into ``dw[c, i, j]`` with atomics (tiles and
    splits that share a diagonal add into the same element).
    """
    PH: tl.constexpr = KH // 2
    PW: tl.constexpr = KW // 2
    pid_cj = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_s = tl.program_id(2)
    c = (pid_cj // KW).to(tl.int64)
    j = pid_cj % KW
    n_ktiles = tl.cdiv(H, BLOCK_K)
    h0 = (pid_t // n_ktiles) * BLOCK_M
    k0 = (pid_t % n_ktiles) * BLOCK_K
    # Diagonals d = k - h present in this tile, clipped to the kernel's taps.
    d_lo = tl.maximum(k0 - (h0 + BLOCK_M - 1), -PH)
    d_hi = tl.minimum(k0 + BLOCK_K - 1 - h0, PH)
    if d_lo <= d_hi:
        rows = h0 + tl.arange(0, BLOCK_M)
        krow = k0 + tl.arange(0, BLOCK_K)
        row_ok = rows < H
        k_ok = krow < H
        col_start = pid_s * COLS_PER_SPLIT
        col_end = tl.minimum(col_start + COLS_PER_SPLIT, N * W)
        g = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for n0 in range(col_start, col_end, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < col_end
            img = (cols // W).to(tl.int64)
            wpos = cols % W
            win = wpos + (j - PW)
            win_ok = col_ok & (win >= 0) & (win < W)
            dy = tl.load(dy_ptr + c * sdc + img[None, :] * sdn + wpos.to(tl.int64)[None, :] * sdw
                         + rows.to(tl.int64)[:, None] * sdh,
                         mask=col_ok[None, :] & row_ok[:, None], other=0.0)
            xt = tl.load(x_ptr + c * sxc + img[:, None] * sxn + win.to(tl.int64)[:, None] * sxw
                         + krow.to(tl.int64)[None, :] * sxh,
                         mask=win_ok[:, None] & k_ok[None, :], other=0.0)
            if UPCAST_DOT:
                dy = dy.to(tl.float32)
                xt = xt.to(tl.float32)
            if USE_TF32:
                g = tl.dot(dy, xt, g, input_precision="tf32")
            else:
                g = tl.dot(dy, xt, g, input_precision="ieee")
        diag = krow[None, :] - rows[:, None]
        for d in range(d_lo, d_hi + 1):
            val = tl.sum(tl.sum(tl.where(diag == d, g, 0.0), axis=1), axis=0)
            tl.atomic_add(dw_ptr + c * swc + (d + PH) * swh + j * sww, val)


@triton.jit
def dwconv_direct_fwd_kernel(
    x_ptr, w_ptr, out_ptr,
    P, C, H, W,
    KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_P: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
):
    """Direct (CUDA-core) forward for small kernels or small maps on NCHW-contiguous planes.

    Grid: (cdiv(P, BLOCK_P), cdiv(H, TH) * cdiv(W, TW)) with P = N * C planes. A program owns BLOCK_P planes times a
    TH x TW spatial tile and adds the KH * KW shifted, weighted input tiles (re-reads hit L1).
    """
    PH: tl.constexpr = KH // 2
    PW: tl.constexpr = KW // 2
    n_wt = tl.cdiv(W, TW)
    h0 = (tl.program_id(1) // n_wt) * TH
    w0 = (tl.program_id(1) % n_wt) * TW
    planes = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    s = tl.arange(0, TH * TW)
    hh = h0 + s // TW
    ww = w0 + s % TW
    p_ok = planes < P
    base = planes.to(tl.int64) * H * W
    wbase = (planes % C) * (KH * KW)
    acc = tl.zeros((BLOCK_P, TH * TW), dtype=tl.float32)
    for i in range(KH):
        hi = hh + (i - PH)
        h_ok = (hi >= 0) & (hi < H)
        for j in range(KW):
            wi = ww + (j - PW)
            ok = h_ok & (wi >= 0) & (wi < W)
            xv = tl.load(x_ptr + base[:, None] + (hi * W + wi)[None, :], mask=p_ok[:, None] & ok[None, :], other=0.0)
            wv = tl.load(w_ptr + wbase + i * KW + j, mask=p_ok, other=0.0)
            acc += xv.to(tl.float32) * wv.to(tl.float32)[:, None]
    tl.store(out_ptr + base[:, None] + (hh * W + ww)[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=p_ok[:, None] & ((hh < H) & (ww < W))[None, :])


@triton.jit
def dwconv_direct_wgrad_kernel(
    x_ptr, dy_ptr, dw_ptr,
    N, C, H, W, IMGS_PER_SPLIT,
    KH: tl.constexpr, KW: tl.constexpr, TAPS: tl.constexpr,
    TH: tl.constexpr, TW: tl.constexpr,
):
    """Direct weight gradient for small kernels: one channel, a share of the images, all taps as a vector.

    Grid: (C, splits). ``acc[t] = sum dy[h, w] * x[h + i_t - PH, w + j_t - PW]`` for the KH * KW taps (padded to
    TAPS), accumulated over spatial tiles of TH x TW and the program's images, then added to dw[c] (fp32 atomics).
    """
    PH: tl.constexpr = KH // 2
    PW: tl.constexpr = KW // 2
    c = tl.program_id(0)
    n_lo = tl.program_id(1) * IMGS_PER_SPLIT
    n_hi = tl.minimum(n_lo + IMGS_PER_SPLIT, N)
    t = tl.arange(0, TAPS)
    t_ok = t < KH * KW
    ti = t // KW - PH
    tj = t % KW - PW
    s = tl.arange(0, TH * TW)
    acc = tl.zeros((TAPS,), dtype=tl.float32)
    for n in range(n_lo, n_hi):
        base = (n * C + c).to(tl.int64) * H * W
        for h0 in range(0, H, TH):
            for w0 in range(0, W, TW):
                hh = h0 + s // TW
                ww = w0 + s % TW
                s_ok = (hh < H) & (ww < W)
                dy = tl.load(dy_ptr + base + hh * W + ww, mask=s_ok, other=0.0).to(tl.float32)
                hi = hh[None, :] + ti[:, None]
                wi = ww[None, :] + tj[:, None]
                ok = s_ok[None, :] & t_ok[:, None] & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
                xv = tl.load(x_ptr + base + hi * W + wi, mask=ok, other=0.0).to(tl.float32)
                acc += tl.sum(xv * dy[None, :], axis=1)
    tl.atomic_add(dw_ptr + c * (KH * KW) + t, acc, mask=t_ok)


def _use_tf32(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 and torch.backends.cudnn.allow_tf32 and os.environ.get("TRITON_INTERPRET", "0") != "1"


def _upcast_dot(dtype: torch.dtype) -> bool:
    # Triton's interpreter (3.8) returns garbage from tl.dot on bf16 operands; fp32 operands hold bf16 values exactly.
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _band_views(t: torch.Tensor, w: torch.Tensor):
    """Return (H, W, strides of t, strides of w) with the band (longer-kernel) axis first; swaps axes for kw > kh."""
    _, _, h, wd = t.shape
    st = t.stride()
    sw = (w.stride(0), w.stride(2), w.stride(3))
    kh, kw = w.shape[2:]
    if kw > kh:
        return wd, h, (st[0], st[1], st[3], st[2]), (sw[0], sw[2], sw[1]), kw, kh
    return h, wd, st, sw, kh, kw


def _fwd_config(band_len: int, kband: int, cols: int) -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) for the forward kernel."""
    block_m = min(64, max(16, _next_pow2(band_len)))
    if kband <= 7:
        block_m = min(block_m, 32)
    block_k = 32 if band_len >= 32 else 16
    block_n = 128 if cols >= 2048 else 64
    return block_m, block_n, block_k, 4


def _launch_fwd(x: torch.Tensor, w: torch.Tensor, out: Optional[torch.Tensor] = None,
                config: Optional[Tuple[int, int, int, int]] = None) -> torch.Tensor:
    """Forward kernel launch; ``out`` (NCHW-contiguous) and ``config`` may be given by tests and benchmarks."""
    n, c = x.shape[:2]
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    band, flat, sx, sw, kband, kflat = _band_views(x, w)
    so = _band_views(out, w)[2]
    bm, bn, bk, warps = config or _fwd_config(band, kband, n * flat)
    grid = (triton.cdiv(n * flat, bn), triton.cdiv(band, bm), c)
    dwconv_fwd_kernel[grid](
        x, w, out, n, band, flat, *sx, *sw, *so,
        KH=kband, KW=kflat, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        USE_TF32=_use_tf32(x.dtype), UPCAST_DOT=_upcast_dot(x.dtype), num_warps=warps)
    return out


def _launch_wgrad(dy: torch.Tensor, x: torch.Tensor, w_shape: Tuple[int, ...],
                  config: Optional[Tuple[int, int, int]] = None) -> torch.Tensor:
    """Weight-gradient launch into a fresh fp32 buffer; ``config`` = (BLOCK, BLOCK_N, num_warps) for benchmarks."""
    n, c = x.shape[:2]
    dw = torch.zeros(w_shape, device=x.device, dtype=torch.float32)
    band, flat, sx, sdw, kband, kflat = _band_views(x, dw)
    sd = _band_views(dy, dw)[2]
    block, block_n, warps = config or (min(64, max(16, _next_pow2(band)), max(16, _next_pow2(kband))), 64, 4)
    cols = n * flat
    tiles = triton.cdiv(band, block) ** 2
    programs = c * kflat * tiles
    # Split the (image, column) reduction when there are too few programs to fill the GPU.
    splits = max(1, min(triton.cdiv(cols, 4 * block_n), triton.cdiv(2048, programs)))
    per_split = triton.cdiv(triton.cdiv(cols, splits), block_n) * block_n
    splits = triton.cdiv(cols, per_split)
    grid = (c * kflat, tiles, splits)
    dwconv_wgrad_kernel[grid](
        x, dy, dw, n, band, flat, per_split, *sx, *sd, *sdw,
        KH=kband, KW=kflat, BLOCK_M=block, BLOCK_N=block_n, BLOCK_K=block,
        USE_TF32=_use_tf32(x.dtype), UPCAST_DOT=_upcast_dot(x.dtype), num_warps=warps)
    return dw


def use_direct(h: int, w: int, kh: int, kw: int) -> bool:
    """Direct CUDA-core kernels for small kernels (5x5) and small maps (7x7), where banded GEMMs waste the tile."""
    return max(kh, kw) <= 7 or h * w <= 64


def _direct_tile(h: int, w: int) -> Tuple[int, int]:
    tw = min(64, max(8, _next_pow2(w)))
    th = min(max(1, 512 // tw), _next_pow2(h))
    return th, tw


def _launch_direct_fwd(x: torch.Tensor, w: torch.Tensor, out: Optional[torch.Tensor] = None,
                       config: Optional[Tuple[int, int, int, int]] = None) -> torch.Tensor:
    """Direct forward on NCHW-contiguous x and (C, 1, kh, kw)-contiguous w; ``config`` = (BLOCK_P, TH, TW, warps)."""
    n, c, h, wd = x.shape
    kh, kw = w.shape[2:]
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if config is None:
        th, tw = _direct_tile(h, wd)
        config = (max(1, 1024 // _next_pow2(th * tw)), th, tw, 4)
    bp, th, tw, warps = config
    grid = (triton.cdiv(n * c, bp), triton.cdiv(h, th) * triton.cdiv(wd, tw))
    dwconv_direct_fwd_kernel[grid](x, w, out, n * c, c, h, wd, KH=kh, KW=kw, BLOCK_P=bp, TH=th, TW=tw,
                                   num_warps=warps)
    return out


def _launch_direct_wgrad(dy: torch.Tensor, x: torch.Tensor, w_shape: Tuple[int, ...]) -> torch.Tensor:
    n, c, h, wd = x.shape
    kh, kw = w_shape[2:]
    dw = torch.zeros(w_shape, device=x.device, dtype=torch.float32)
    th, tw = _direct_tile(h, wd)
    taps = _next_pow2(kh * kw)
    th = max(1, min(th, 4096 // (taps * tw)))
    splits = min(n, triton.cdiv(1024, c))
    per_split = triton.cdiv(n, splits)
    grid = (c, triton.cdiv(n, per_split))
    dwconv_direct_wgrad_kernel[grid](x, dy, dw, n, c, h, wd, per_split, KH=kh, KW=kw, TAPS=taps, TH=th, TW=tw,
                                     num_warps=4)
    return dw


@torch.library.custom_op("slak::dwconv2d", mutates_args=())
def dwconv2d(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Depthwise 'same' conv of NCHW-contiguous x (N, C, H, W) with weight (C, 1, kh, kw) of x's dtype."""
    x, weight = x.contiguous(), weight.contiguous()
    if use_direct(*x.shape[2:], *weight.shape[2:]):
        return _launch_direct_fwd(x, weight)
    return _launch_fwd(x, weight)


@dwconv2d.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("slak::dwconv2d_weight_grad", mutates_args=())
def dwconv2d_weight_grad(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weight gradient (same shape and dtype as weight), accumulated in fp32."""
    launch = _launch_direct_wgrad if use_direct(*x.shape[2:], *weight.shape[2:]) else _launch_wgrad
    dw = launch(grad_out.contiguous(), x.contiguous(), tuple(weight.shape))
    return dw.to(weight.dtype)


@dwconv2d_weight_grad.register_fake
def _(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output) -> None:
    x, weight = inputs
    ctx.save_for_backward(x, weight)


def _backward(ctx, grad_out: torch.Tensor):
    x, weight = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    dx = dw = None
    if ctx.needs_input_grad[0]:
        # Correlation with the kernel flipped on both axes; odd kernels keep the same padding.
        dx = dwconv2d(grad_out, weight.flip(2, 3))
    if ctx.needs_input_grad[1]:
        dw = dwconv2d_weight_grad(grad_out, x, weight)
    return dx, dw


dwconv2d.register_autograd(_backward, setup_context=_setup_context)


def _conv_flops(x_shape, w_shape) -> int:
    n, c, h, w = x_shape
    return 2 * n * c * h * w * w_shape[-2] * w_shape[-1]


@register_flop_formula(torch.ops.slak.dwconv2d)
def _dwconv2d_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return _conv_flops(x_shape, w_shape)


@register_flop_formula(torch.ops.slak.dwconv2d_weight_grad)
def _dwconv2d_weight_grad_flops(grad_shape, x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return _conv_flops(x_shape, w_shape)
