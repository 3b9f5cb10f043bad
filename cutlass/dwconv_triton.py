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
import inspect
import os
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.utils.flop_counter import register_flop_formula


@triton.jit
def _flat_index(cols, end, W, VEC: tl.constexpr):
    """(cols < end, cols // W, cols % W) for flattened (image, column) positions, with what the compiler cannot
    see for itself: when VEC divides W, ``end`` and the first of ``cols`` (the launchers guarantee it), each aligned
    group of VEC positions lies in one image row, so the image index is constant and the column contiguous over it.
    With the flat axis in memory order (K x k kernels on NCHW) the loads and stores then walk along rows together
    (measured on H200 before: 11.8 L1 sectors per request in the 51x5 forward, against 2.7 in the 5x51 one)."""
    ok = cols < end
    img = cols // W
    wpos = cols % W
    if VEC > 1:
        ok = tl.max_constancy(ok, VEC)
        img = tl.max_constancy(img, VEC)
        wpos = tl.max_contiguous(tl.multiple_of(wpos, VEC), VEC)
    return ok, img, wpos


@triton.jit
def dwconv_fwd_kernel(
    x_ptr, w_ptr, out_ptr,
    N, H, W,
    sxn, sxc, sxh, sxw,
    swc, swh, sww,
    son, soc, soh, sow,
    KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_TF32: tl.constexpr, UPCAST_DOT: tl.constexpr, VEC: tl.constexpr,
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
    col_ok, img, wpos = _flat_index(cols, N * W, W, VEC)
    img = img.to(tl.int64)
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
            acc = _dot_acc(a, b, acc, USE_TF32, UPCAST_DOT)
    out_ptrs = (out_ptr + c * soc + img[None, :] * son + wpos.to(tl.int64)[None, :] * sow
                + rows.to(tl.int64)[:, None] * soh)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=col_ok[None, :] & (rows < H)[:, None])


@triton.jit
def _dot_acc(a, b, acc, USE_TF32: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """acc + a @ b, accumulated in fp32: tf32 tensor cores for fp32 operands where allowed (``USE_TF32``), the
    operands upcast first under the interpreter (``UPCAST_DOT``, see ``_upcast_dot``)."""
    if UPCAST_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if USE_TF32:
        acc = tl.dot(a, b, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    return acc


@triton.jit
def _gram_tile(pid_t, H, PH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """(h0, k0, d_lo, d_hi) of the weight gradient's Gram tile ``pid_t``: its first dy row, its first x row, and
    the diagonals d = k - h it holds, clipped to the kernel's taps (d_lo > d_hi: none)."""
    n_ktiles = tl.cdiv(H, BLOCK_K)
    h0 = (pid_t // n_ktiles) * BLOCK_M
    k0 = (pid_t % n_ktiles) * BLOCK_K
    d_lo = tl.maximum(k0 - (h0 + BLOCK_M - 1), -PH)
    d_hi = tl.minimum(k0 + BLOCK_K - 1 - h0, PH)
    return h0, k0, d_lo, d_hi


@triton.jit
def dwconv_wgrad_kernel(
    x_ptr, dy_ptr, dw_ptr,
    N, H, W, COLS_PER_SPLIT,
    sxn, sxc, sxh, sxw,
    sdn, sdc, sdh, sdw,
    swc, swh, sww,
    KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_TF32: tl.constexpr, UPCAST_DOT: tl.constexpr, VEC: tl.constexpr,
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
    h0, k0, d_lo, d_hi = _gram_tile(pid_t, H, PH, BLOCK_M, BLOCK_K)
    if d_lo <= d_hi:
        rows = h0 + tl.arange(0, BLOCK_M)
        krow = k0 + tl.arange(0, BLOCK_K)
        row_ok = rows < H
        k_ok = krow < H
        col_start = pid_s * COLS_PER_SPLIT
        col_end = tl.minimum(col_start + COLS_PER_SPLIT, N * W)
        g = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for n0 in range(col_start, col_end, BLOCK_N):
            col_ok, img, wpos = _flat_index(n0 + tl.arange(0, BLOCK_N), col_end, W, VEC)
            img = img.to(tl.int64)
            win = wpos + (j - PW)
            win_ok = col_ok & (win >= 0) & (win < W)
            dy = tl.load(dy_ptr + c * sdc + img[None, :] * sdn + wpos.to(tl.int64)[None, :] * sdw
                         + rows.to(tl.int64)[:, None] * sdh,
                         mask=col_ok[None, :] & row_ok[:, None], other=0.0)
            xt = tl.load(x_ptr + c * sxc + img[:, None] * sxn + win.to(tl.int64)[:, None] * sxw
                         + krow.to(tl.int64)[None, :] * sxh,
                         mask=win_ok[:, None] & k_ok[None, :], other=0.0)
            g = _dot_acc(dy, xt, g, USE_TF32, UPCAST_DOT)
        diag = krow[None, :] - rows[:, None]
        for d in range(d_lo, d_hi + 1):
            val = tl.sum(tl.sum(tl.where(diag == d, g, 0.0), axis=1), axis=0)
            tl.atomic_add(dw_ptr + c * swc + (d + PH) * swh + j * sww, val)


@triton.jit
def dwconv_wgrad_allj_kernel(
    x_ptr, dy_ptr, dw_ptr, g_ptr,
    N, H, W, COLS_PER_SPLIT,
    sxn, sxc, sxh, sxw,
    sdn, sdc, sdh, sdw,
    swc, swh, sww,
    KH: tl.constexpr, KW: tl.constexpr, JP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
    USE_TF32: tl.constexpr, UPCAST_DOT: tl.constexpr, VEC: tl.constexpr,
):
    """``dwconv_wgrad_kernel`` for all kernel columns of a channel in one program (opt-in: ``WGRAD_ALLJ``).

    Grid: (C, cdiv(H, BLOCK_M) * cdiv(H, BLOCK_K), splits). The per-column kernel loads each dy tile once per column
    ``j``; here one dy tile (BLOCK_M, BLOCK_N) meets one wide x tile (BLOCK_N, JP * BLOCK_K) whose column
    ``q = j * BLOCK_K + kk`` holds ``x[k0 + kk, col + j - KW//2]`` (JP = next power of two >= KW; columns j >= KW
    are masked to zero), so a single ``tl.dot`` per column chunk forms the Gram blocks of every j side by side.
    The diagonals ``k - h = i - KH//2`` of block j go to ``dw[c, i, j]`` through this program's fp32 scratch slot
    (BLOCK_M, JP * BLOCK_K) in ``g_ptr``, read back gathered, BLOCK_T (diagonal, column) pairs at a time, one
    element per row and pair, as ``dwconv_plane_wgrad_kernel`` does. Masked sums over the register tile, as the
    per-column kernel does, would cost one pass over all BLOCK_M * JP * BLOCK_K elements (and a cross-warp
    reduction) per diagonal: 47 passes over 4,096 elements for the default 32 x (8 x 16) tile of a 51x5 layer,
    against one store of 4,096 and 235 x 32 gathered loads. Tiles and splits share diagonals: fp32 atomics.
    """
    PH: tl.constexpr = KH // 2
    PW: tl.constexpr = KW // 2
    c = tl.program_id(0).to(tl.int64)
    pid_t = tl.program_id(1)
    pid_s = tl.program_id(2)
    h0, k0, d_lo, d_hi = _gram_tile(pid_t, H, PH, BLOCK_M, BLOCK_K)
    if d_lo <= d_hi:
        m = tl.arange(0, BLOCK_M)
        rows = h0 + m
        q = tl.arange(0, JP * BLOCK_K)
        shift = q // BLOCK_K - PW
        krow = k0 + q % BLOCK_K
        q_ok = (q < KW * BLOCK_K) & (krow < H)
        x_rows = x_ptr + c * sxc + krow.to(tl.int64)[None, :] * sxh
        col_start = pid_s * COLS_PER_SPLIT
        col_end = tl.minimum(col_start + COLS_PER_SPLIT, N * W)
        g = tl.zeros((BLOCK_M, JP * BLOCK_K), dtype=tl.float32)
        for n0 in range(col_start, col_end, BLOCK_N):
            col_ok, img, wpos = _flat_index(n0 + tl.arange(0, BLOCK_N), col_end, W, VEC)
            img = img.to(tl.int64)
            win = wpos[:, None] + shift[None, :]
            win_ok = col_ok[:, None] & q_ok[None, :] & (win >= 0) & (win < W)
            dy = tl.load(dy_ptr + c * sdc + img[None, :] * sdn + wpos.to(tl.int64)[None, :] * sdw
                         + rows.to(tl.int64)[:, None] * sdh,
                         mask=col_ok[None, :] & (rows < H)[:, None], other=0.0)
            xt = tl.load(x_rows + img[:, None] * sxn + win.to(tl.int64) * sxw, mask=win_ok, other=0.0)
            g = _dot_acc(dy, xt, g, USE_TF32, UPCAST_DOT)
        slot = (c * tl.num_programs(1) + pid_t) * tl.num_programs(2) + pid_s
        g_base = g_ptr + slot * (BLOCK_M * JP * BLOCK_K)
        tl.store(g_base + m[:, None] * (JP * BLOCK_K) + q[None, :], g)
        tl.debug_barrier()  # the gathers below read elements other threads of this program wrote
        n_pairs = (d_hi - d_lo + 1) * KW
        for t0 in range(0, n_pairs, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            t_ok = t < n_pairs
            d = d_lo + t // KW
            j = t % KW
            # Row m of block j meets diagonal d at column kk = h0 + m + d - k0.
            kk = (h0 - k0) + d[:, None] + m[None, :]
            ok = t_ok[:, None] & (kk >= 0) & (kk < BLOCK_K)
            vals = tl.load(g_base + m[None, :] * (JP * BLOCK_K) + j[:, None] * BLOCK_K + kk, mask=ok, other=0.0)
            tl.atomic_add(dw_ptr + c * swc + (d + PH) * swh + j * sww, tl.sum(vals, axis=1), mask=t_ok)


@triton.jit
def dwconv_direct_fwd_kernel(
    x_ptr, w_ptr, out_ptr,
    P, C, H, W,
    KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_P: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
):
    """Direct (CUDA-core) forward for small kernels on NCHW-contiguous planes.

    Grid: (cdiv(P, BLOCK_P), cdiv(H, TH) * cdiv(W, TW)) with P = N * C planes. A program owns a
    (BLOCK_P, TH, TW) block and adds the KH * KW shifted, weighted input blocks (re-reads hit L1). The loop is
    bound by integer work, not bytes: offsets are int32 relative to the program's first plane and computed once,
    each tap adds one scalar to them, and its mask is the AND of a per-row and a per-column vector (the previous
    flattened version recomputed 2-D indices and bounds for every element and tap and ran 7x over its prediction).
    """
    PH: tl.constexpr = KH // 2
    PW: tl.constexpr = KW // 2
    n_wt = tl.cdiv(W, TW)
    h0 = (tl.program_id(1) // n_wt) * TH
    w0 = (tl.program_id(1) % n_wt) * TW
    p0 = tl.program_id(0) * BLOCK_P
    lp = tl.arange(0, BLOCK_P)
    p_ok = (p0 + lp) < P
    hh = h0 + tl.arange(0, TH)
    ww = w0 + tl.arange(0, TW)
    offs = (lp * (H * W))[:, None, None] + (hh * W)[None, :, None] + ww[None, None, :]
    x_blk = x_ptr + p0.to(tl.int64) * H * W
    wbase = ((p0 + lp) % C) * (KH * KW)
    acc = tl.zeros((BLOCK_P, TH, TW), dtype=tl.float32)
    for i in tl.static_range(KH):
        hi = hh + (i - PH)
        row_ok = p_ok[:, None, None] & ((hi >= 0) & (hi < H))[None, :, None]
        for j in tl.static_range(KW):
            wi = ww + (j - PW)
            col_ok = ((wi >= 0) & (wi < W))[None, None, :]
            xv = tl.load(x_blk + offs + ((i - PH) * W + (j - PW)), mask=row_ok & col_ok, other=0.0)
            wv = tl.load(w_ptr + wbase + (i * KW + j), mask=p_ok, other=0.0)
            acc += xv.to(tl.float32) * wv.to(tl.float32)[:, None, None]
    ok = p_ok[:, None, None] & (hh < H)[None, :, None] & (ww < W)[None, None, :]
    tl.store(out_ptr + p0.to(tl.int64) * H * W + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def dwconv_direct_wgrad_kernel(
    x_ptr, dy_ptr, dw_ptr,
    N, C, H, W, IMGS_PER_SPLIT,
    KH: tl.constexpr, KW: tl.constexpr, TAPS: tl.constexpr,
    TH: tl.constexpr, TW: tl.constexpr,
):
    """Direct weight gradient for small kernels: one channel, one TH x TW spatial tile, a share of the images.

    Grid: (C, cdiv(H, TH) * cdiv(W, TW), splits). Offsets and masks of the (TAPS, TH * TW) window depend only on
    the tile, so they are computed once; the image loop is then one load and one FMA per element and tap into a
    (TAPS, TH * TW) fp32 accumulator, reduced once at the end and added to dw[c] (fp32 atomics).
    """
    PH: tl.constexpr = KH // 2
    PW: tl.constexpr = KW // 2
    c = tl.program_id(0)
    n_wt = tl.cdiv(W, TW)
    h0 = (tl.program_id(1) // n_wt) * TH
    w0 = (tl.program_id(1) % n_wt) * TW
    n_lo = tl.program_id(2) * IMGS_PER_SPLIT
    n_hi = tl.minimum(n_lo + IMGS_PER_SPLIT, N)
    t = tl.arange(0, TAPS)
    t_ok = t < KH * KW
    ti = t // KW - PH
    tj = t % KW - PW
    s = tl.arange(0, TH * TW)
    hh = h0 + s // TW
    ww = w0 + s % TW
    s_ok = (hh < H) & (ww < W)
    hi = hh[None, :] + ti[:, None]
    wi = ww[None, :] + tj[:, None]
    x_ok = s_ok[None, :] & t_ok[:, None] & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
    x_offs = hi * W + wi
    dy_offs = hh * W + ww
    acc = tl.zeros((TAPS, TH * TW), dtype=tl.float32)
    for n in range(n_lo, n_hi):
        base = (n * C + c).to(tl.int64) * H * W
        dy = tl.load(dy_ptr + base + dy_offs, mask=s_ok, other=0.0).to(tl.float32)
        xv = tl.load(x_ptr + base + x_offs, mask=x_ok, other=0.0).to(tl.float32)
        acc += xv * dy[None, :]
    tl.atomic_add(dw_ptr + c * (KH * KW) + t, tl.sum(acc, axis=1), mask=t_ok)


@triton.jit
def dwconv_plane_fwd_kernel(
    x_ptr, w_ptr, out_ptr,
    N, H, W,
    sxn, sxc, sxh, sxw,
    son, soc, soh, sow,
    KH: tl.constexpr, KW: tl.constexpr, PIX: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_TF32: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """Whole-plane forward for maps of at most PIX pixels (7x7 stage): one dense GEMM per channel.

    Grid: (cdiv(N, BLOCK_N), C). With p, q flattened pixel indices, ``out_c[p, n] = sum_q M_c[p, q] x_c[q, n]``
    where ``M_c[p, q] = w[c, hq - hp + KH//2, wq - wp + KW//2]`` (zero outside the kernel). M_c is gathered from the
    weight in registers; the images of the batch form the GEMM's N dimension, so one tensor-core product per program
    replaces KH * KW masked passes over a 49-pixel plane.
    """
    PH: tl.constexpr = KH // 2
    PW: tl.constexpr = KW // 2
    c = tl.program_id(1).to(tl.int64)
    p = tl.arange(0, PIX)
    hp = p // W
    wp = p % W
    p_ok = p < H * W
    dh = hp[None, :] - hp[:, None] + PH
    dw = wp[None, :] - wp[:, None] + PW
    m_ok = p_ok[:, None] & p_ok[None, :] & (dh >= 0) & (dh < KH) & (dw >= 0) & (dw < KW)
    a = tl.load(w_ptr + c * (KH * KW) + dh * KW + dw, mask=m_ok, other=0.0)
    imgs = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    n_ok = imgs < N
    b = tl.load(x_ptr + c * sxc + imgs[None, :] * sxn + (hp * sxh + wp * sxw)[:, None],
                mask=p_ok[:, None] & n_ok[None, :], other=0.0)
    if UPCAST_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if USE_TF32:
        acc = tl.dot(a, b, input_precision="tf32")
    else:
        acc = tl.dot(a, b, input_precision="ieee")
    tl.store(out_ptr + c * soc + imgs[None, :] * son + (hp * soh + wp * sow)[:, None],
             acc.to(out_ptr.dtype.element_ty), mask=p_ok[:, None] & n_ok[None, :])


@triton.jit
def dwconv_plane_wgrad_kernel(
    x_ptr, dy_ptr, dw_ptr, g_ptr,
    N, H, W, DH_LO, DW_LO, R_W, N_TAPS,
    sxn, sxc, sxh, sxw,
    sdn, sdc, sdh, sdw,
    KH: tl.constexpr, KW: tl.constexpr, PIX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
    USE_TF32: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """Whole-plane weight gradient for maps of at most PIX pixels: one channel per program, all images.

    Grid: (C,). ``G[p, q] = sum_n dy[n, c, p] x[n, c, q]`` on tensor cores; ``dw[c, i, j]`` is the sum of G over the
    pairs with ``(hq - hp, wq - wp) == (i - KH//2, j - KW//2)``. G goes to this program's (PIX, PIX) fp32 scratch
    slot and is read back gathered: per tap one load per pixel p (at q = p shifted by the tap), BLOCK_T taps at a
    time, one reduction along p. (The earlier version summed a masked full PIX x PIX copy of G per tap: 65
    reductions of 4,096 elements for 13x5, 0.109 ms.) Only the N_TAPS taps reachable on this map (rows DH_LO..,
    columns DW_LO.. DW_LO + R_W - 1) are visited; the caller's zeroed buffer holds the rest. No atomics.
    """
    PH: tl.constexpr = KH // 2
    PW: tl.constexpr = KW // 2
    c = tl.program_id(0).to(tl.int64)
    p = tl.arange(0, PIX)
    hp = p // W
    wp = p % W
    p_ok = p < H * W
    g = tl.zeros((PIX, PIX), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        imgs = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        n_ok = imgs < N
        dy = tl.load(dy_ptr + c * sdc + imgs[None, :] * sdn + (hp * sdh + wp * sdw)[:, None],
                     mask=p_ok[:, None] & n_ok[None, :], other=0.0)
        xt = tl.load(x_ptr + c * sxc + imgs[:, None] * sxn + (hp * sxh + wp * sxw)[None, :],
                     mask=n_ok[:, None] & p_ok[None, :], other=0.0)
        g = _dot_acc(dy, xt, g, USE_TF32, UPCAST_DOT)
    g_base = g_ptr + c * (PIX * PIX)
    tl.store(g_base + p[:, None] * PIX + p[None, :], g)
    tl.debug_barrier()  # the gathers below read elements other threads of this program wrote
    for t0 in range(0, N_TAPS, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < N_TAPS
        di = DH_LO + t // R_W - PH
        dj = DW_LO + t % R_W - PW
        hq = hp[None, :] + di[:, None]
        wq = wp[None, :] + dj[:, None]
        ok = t_ok[:, None] & p_ok[None, :] & (hq >= 0) & (hq < H) & (wq >= 0) & (wq < W)
        vals = tl.load(g_base + p[None, :] * PIX + hq * W + wq, mask=ok, other=0.0)
        tl.store(dw_ptr + c * (KH * KW) + (di + PH) * KW + (dj + PW), tl.sum(vals, axis=1), mask=t_ok)


def _size_agnostic_twin(kernel):
    """The same kernel compiled without Triton's divisibility-by-16 specialisation of its integer arguments.

    Triton compiles a kernel once per key: constexprs, num_warps, and for each integer argument whether it is 1 or a
    multiple of 16. Classification feeds four map sizes, so that costs nothing; detection's multi-scale training
    changes the map sizes every iteration, and each new combination of sizes and strides that are or are not
    multiples of 16 was a new compile in the training loop (``benchmarks/triton_variants.py``: 164 compiles of these
    kernels over 50 iterations of the cascade config, still growing). The twin does not specialise its sizes at all
    (so a batch of 1 at evaluation reuses the training batch's versions) and keeps the value-1 specialisation of
    its strides (unit strides stay constants: contiguous loads), and the launch plans' constexprs; see ``_pick``."""
    fn = getattr(kernel, "fn", None)
    if fn is None:  # not a Triton kernel (tests may stand one in)
        return kernel
    sizes, strides = _int_params(fn)
    try:
        return triton.jit(fn, do_not_specialize=sizes, do_not_specialize_on_alignment=strides)
    except Exception:  # noqa: BLE001 - a Triton without these options: the specialised kernel serves every size
        return kernel


def _int_params(fn) -> Tuple[list, list]:
    """A kernel's integer parameters: (sizes, strides). Sizes (N, H, W, ...: upper case) only bound loops and masks;
    strides (sxh, ...: lower case) also place addresses, and a unit stride must stay a constant (contiguous loads)."""
    names = [name for name, param in inspect.signature(fn).parameters.items()
             if not name.endswith("_ptr") and "constexpr" not in str(param.annotation)]
    return [n for n in names if not n.islower()], [n for n in names if n.islower()]


_TWINS: dict = {}  # kernel name -> (the kernel, its twin), made on first use
# The first SPECIALISED_SIZES distinct map sizes (h, w) a process launches run the fully specialised kernels (a
# classifier's four stages at its training resolution and four more); later sizes run the twins, whose compiles
# do not depend on the sizes' divisibility. SLAK_DWCONV_SPECIALISED_SIZES overrides the 8 (a large number: every
# size specialised, as before; 0: twins only, what SLaK.prefer_size_agnostic_kernels sets for detection unless the
# variable is set). reset_specialised_sizes() empties the set (tests, benchmarks).
def _specialised_sizes_setting() -> int:
    raw = os.environ.get("SLAK_DWCONV_SPECIALISED_SIZES", "8")
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"SLAK_DWCONV_SPECIALISED_SIZES must be a whole number >= 0 (map sizes launched with fully "
                         f"specialised Triton kernels); got {raw!r}")
    return value


SPECIALISED_SIZES = _specialised_sizes_setting()
_specialised_sizes: set = set()


def reset_specialised_sizes() -> None:
    _specialised_sizes.clear()


_recording: Optional[list] = None  # set by twin_launch_keys: _pick hands out recorders instead of kernels


class _TwinKeyRecorder:
    """Stands in for a twin kernel in a dry run: appends the key Triton would compile the launch under (kernel,
    dtypes, unit-stride pattern, constexprs and num_warps: what the twins specialise on) to ``out``."""

    _params: dict = {}  # kernel -> (parameter names, stride names)

    def __init__(self, name: str, out: list):
        self.name, self.out = name, out
        kernel = globals()[name]
        if kernel not in self._params:
            fn = getattr(kernel, "fn", None)
            self._params[kernel] = ((list(inspect.signature(fn).parameters), set(_int_params(fn)[1])) if fn
                                    else ([], set()))
        self.params, self.strides = self._params[kernel]

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            sig = tuple(str(a.dtype) if isinstance(a, torch.Tensor)
                        else ("1" if p in self.strides and a == 1 else "") + ("L" if abs(a) >= 2 ** 31 else "")
                        if isinstance(a, int) else repr(a) for p, a in zip(self.params, args))
            self.out.append((self.name, sig, tuple(sorted(kwargs.items()))))
        return launch


def twin_launch_keys(n: int, c: int, h: int, w: int, kh: int, kw: int, dtype: torch.dtype) -> set:
    """The twin-kernel versions (Triton compile keys) that one layer's forward, input gradient and weight gradient
    on an (n, c, h, w) map launch, found without launching anything (meta tensors, recorders)."""
    return set(_dry_run("_recording", n, c, h, w, kh, kw, dtype))


def _dry_run(switch: str, n: int, c: int, h: int, w: int, kh: int, kw: int, dtype: torch.dtype) -> list:
    """One layer's launches on meta tensors with the module global ``switch`` (``_recording``: twin keys, or
    ``_capturing``: launches) set to a fresh list for ``_pick``'s stand-ins to fill; returns the list."""
    out: list = []
    globals()[switch] = out
    try:
        launch_layer_on_meta(n, c, h, w, kh, kw, dtype)
    finally:
        globals()[switch] = None
    return out


def launch_layer_on_meta(n: int, c: int, h: int, w: int, kh: int, kw: int, dtype: torch.dtype) -> None:
    """One layer's launches on meta tensors: forward, input gradient (the forward with the kernel flipped, as the
    backward runs it) and weight gradient. Nothing runs: for dry runs whose kernels are recorders."""
    x = torch.empty(n, c, h, w, device="meta", dtype=dtype)
    wt = torch.empty(c, 1, kh, kw, device="meta", dtype=dtype)
    launch_forward(x, wt)
    launch_forward(x, wt.flip(2, 3))
    launch_weight_grad(x, x, wt)


def twin_warm_plan(n: int, c: int, kh: int, kw: int, lengths, dtype: torch.dtype) -> list:
    """(h, w) maps, one per twin version that a layer (c channels, kh x kw) reaches at batch n on h, w in
    ``lengths``: running each once compiles every version those maps can ask for (``SLaK.warm_size_agnostic_
    kernels`` does so in background processes for detection)."""
    seen: set = set()
    plan = []
    for h in lengths:
        for w in lengths:
            new = twin_launch_keys(n, c, h, w, kh, kw, dtype) - seen
            if new:
                seen |= new
                plan.append((h, w))
    return plan


_capturing: Optional[list] = None  # set by layer_launches: _pick wraps the kernel it chose in a _LaunchCapture


class _LaunchCapture:
    """Stands in for a kernel in a capture run: appends ``(kernel, args, kwargs)`` of each launch to ``out``, tensor
    arguments replaced by their dtypes (what ``JITFunction.warmup`` takes for a tensor)."""

    def __init__(self, kernel, out: list):
        self.kernel, self.out = kernel, out

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.out.append((self.kernel, tuple(a.dtype if isinstance(a, torch.Tensor) else a for a in args),
                             dict(kwargs)))
        return launch


def layer_launches(n: int, c: int, h: int, w: int, kh: int, kw: int, dtype: torch.dtype) -> list:
    """The launches (kernel, args with tensors as dtypes, kwargs) of one layer's forward, input gradient and weight
    gradient on an (n, c, h, w) map, with the kernels a real call would pick (specialised or twin; the map size
    counts as seen), found on meta tensors without launching anything. Not thread-safe: call it from the thread
    that launches the kernels."""
    return _dry_run("_capturing", n, c, h, w, kh, kw, dtype)


def precompile(launches: list, workers: int = 8) -> int:
    """Compile, without launching, every distinct launch of ``launches`` (from :func:`layer_launches`) for the
    current CUDA device, ``workers`` at a time through Triton's ``AsyncCompileMode`` (compiles in threads; its
    passes run without the GIL), into the kernels' in-memory and on-disk caches. Returns how many; 0 where Triton
    has no ``AsyncCompileMode`` (then the first launches compile, as before)."""
    mode = getattr(triton, "AsyncCompileMode", None)
    if mode is None or not launches:
        return 0
    from concurrent.futures import ThreadPoolExecutor
    distinct: dict = {}
    for kernel, args, kwargs in launches:
        distinct.setdefault((id(kernel), args, tuple(sorted(kwargs.items()))), (kernel, args, kwargs))
    with ThreadPoolExecutor(max(1, workers)) as pool, mode(pool):
        for kernel, args, kwargs in distinct.values():
            kernel.warmup(*args, grid=(1,), **kwargs)
    return len(distinct)


def _pick(name: str, h: int, w: int):
    """The kernel ``name`` for an h x w map: the specialised one for the first SPECIALISED_SIZES sizes, else its
    size-agnostic twin. Looked up in the module's globals at call time, so tests may replace either."""
    if _recording is not None:
        return _TwinKeyRecorder(name, _recording)
    kernel = globals()[name]
    if (h, w) in _specialised_sizes or len(_specialised_sizes) < SPECIALISED_SIZES:
        _specialised_sizes.add((h, w))
        chosen = kernel
    else:
        twin = _TWINS.get(name)
        if twin is None or twin[0] is not kernel:
            twin = _TWINS[name] = (kernel, _size_agnostic_twin(kernel))
        chosen = twin[1]
    return _LaunchCapture(chosen, _capturing) if _capturing is not None else chosen


def _use_tf32(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 and torch.backends.cudnn.allow_tf32 and os.environ.get("TRITON_INTERPRET", "0") != "1"


def _upcast_dot(dtype: torch.dtype) -> bool:
    # Triton's interpreter (3.8) returns garbage from tl.dot on bf16 operands; fp32 operands hold bf16 values exactly.
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _flat_vec(flat: int, block_n: int) -> int:
    """Largest power of two up to 8 dividing the flat length and the column tile (``_flat_index``'s groups)."""
    vec = 8
    while flat % vec or block_n % vec:
        vec //= 2
    return vec


def _band_views(t: torch.Tensor, w: torch.Tensor):
    """Return (H, W, strides of t, strides of w) with the band (longer-kernel) axis first; swaps axes for kw > kh."""
    _, _, h, wd = t.shape
    st = t.stride()
    sw = (w.stride(0), w.stride(2), w.stride(3))
    kh, kw = w.shape[2:]
    if kw > kh:
        return wd, h, (st[0], st[1], st[3], st[2]), (sw[0], sw[2], sw[1]), kw, kh
    return h, wd, st, sw, kh, kw


def _fwd_config(band_len: int, kband: int, cols: int, tall: bool = True) -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) for the forward kernel (and the input gradient, which runs it)."""
    # Sweep (H200, batch 64, with the alignment hints, round 9): (64, 128, 32) on 56-row bands, 51x5 0.163 vs 0.260
    # ms for (32, 64, 16), 5x51 0.314 vs 0.335, 5x5 0.162; (32, 128, 32) on 28-row bands of tall kernels, 49x5 0.073
    # vs 0.076 ms, 5x5 0.073; (32, 64, 16) stays best for wide kernels on 28-row bands; 16-row tiles on 14-row maps.
    if band_len >= 56 or (tall and band_len >= 28):
        return min(64, _next_pow2(band_len)), 128, 32, 4
    return min(32, max(16, _next_pow2(band_len))), 64, 16, 4


# (pass, tall kernel, VEC) where round 9's sweep measured the alignment hints of _flat_index slower than none (H200,
# batch 64): the weight gradient on 28-wide flat axes (49x5 0.342 vs 0.301 ms, 5x49 0.515 vs 0.379) and the wide
# forward on 14-long flat axes (5x47 0.064 vs 0.058). Everywhere else they helped or tied.
_HINTS_OFF = {("wgrad", True, 4), ("wgrad", False, 4), ("fwd", False, 2)}


def _hint_vec(pass_: str, tall: bool, flat: int, block_n: int, max_vec: int = 8) -> int:
    """The VEC passed to the banded kernels: ``_flat_vec`` capped by ``max_vec``, 1 where ``_HINTS_OFF`` says."""
    vec = min(max_vec, _flat_vec(flat, block_n))
    return 1 if (pass_, tall, vec) in _HINTS_OFF else vec


def _launch_fwd(x: torch.Tensor, w: torch.Tensor, out: Optional[torch.Tensor] = None,
                config: Optional[Tuple[int, ...]] = None) -> torch.Tensor:
    """Forward kernel launch; ``out`` (NCHW-contiguous) and ``config`` may be given by tests and benchmarks:
    (BLOCK_M, BLOCK_N, BLOCK_K, num_warps), optionally a fifth entry ``max_vec`` capping the alignment hints of
    ``_flat_index`` (1 = none; benchmarks compare)."""
    n, c = x.shape[:2]
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    band, flat, sx, sw, kband, kflat = _band_views(x, w)
    so = _band_views(out, w)[2]
    tall = w.shape[2] >= w.shape[3]
    bm, bn, bk, warps, max_vec = ((tuple(config) + (8,))[:5] if config
                                  else (*_fwd_config(band, kband, n * flat, tall), 8))
    grid = (triton.cdiv(n * flat, bn), triton.cdiv(band, bm), c)
    _pick("dwconv_fwd_kernel", *x.shape[2:])[grid](
        x, w, out, n, band, flat, *sx, *sw, *so,
        KH=kband, KW=kflat, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        USE_TF32=_use_tf32(x.dtype), UPCAST_DOT=_upcast_dot(x.dtype), VEC=_hint_vec("fwd", tall, flat, bn, max_vec),
        num_warps=warps)
    return out


# Banded weight gradients of kernels with at most WGRAD_ALLJ_MAX_COLUMNS columns (the short side: SLaK's K x 5, 5 x K,
# 5 x 5) run dwconv_wgrad_allj_kernel, which loads each dy tile once for all columns instead of once per column:
# 1.8-3.4x faster than the per-column kernel on every SLaK-T layer of maps 14-56, 1.3-1.4x faster than the direct one
# on 5x5 (H100, session 12: 51x5@56 0.597 -> 0.267 ms, 5x51@56 0.851 -> 0.445, 5x5@56 0.302 (direct) -> 0.223,
# 47x5@14 0.153 -> 0.045; benchmarks/RESULTS.md).
# SLAK_WGRAD_ALLJ=0 restores the per-column kernel (and the direct weight gradient of 5x5 and 7x7 kernels).
WGRAD_ALLJ = os.environ.get("SLAK_WGRAD_ALLJ", "1") != "0"
WGRAD_ALLJ_MAX_COLUMNS = 8
# ... on band axes of at most this length (the sweep's maps are 14-56). Longer ones (detection and segmentation:
# 200-336 on stage 1) keep the per-column / direct kernels, measured there: the all-columns kernel's fp32 scratch has
# a slot for every Gram tile pair, also those without a diagonal of the kernel (~470 MiB for 5x51 on a 200x336 map).
WGRAD_ALLJ_MAX_BAND = 64


class WgradPlan(NamedTuple):
    """One banded weight-gradient launch: which kernel, its tiles and how the (image, column) axis is split."""
    all_columns: bool  # dwconv_wgrad_allj_kernel, else dwconv_wgrad_kernel (one program per kernel column)
    block: int  # BLOCK_M, the dy rows of a Gram block
    block_k: int  # BLOCK_K, the x rows of a Gram block (= block in the per-column kernel)
    block_n: int
    warps: int
    splits: int
    per_split: int  # flattened (image, column) positions per split, a multiple of block_n
    vec: int

    def config(self, max_vec: int = 8) -> Tuple:
        """The ``config`` of :func:`_launch_wgrad` that launches these tiles, its hints capped by ``max_vec``."""
        if self.all_columns:
            return ("allj", self.block, self.block_k, self.block_n, self.warps, max_vec)
        return (self.block, self.block_n, self.warps, max_vec)


def _wgrad_allj_tile(band: int, kband: int, kflat: int, tall: bool = True) -> Tuple[int, int, int, int]:
    """(BLOCK, BLOCK_K, BLOCK_N, num_warps) of the all-columns kernel, from the H100 sweep of session 12 (batch 64
    bf16, ms; `bench_dwconv.py --sweep --sweep-pass wgrad`): 16-row x blocks (the fp32 accumulator is
    BLOCK x (JP * BLOCK_K)) and, mostly, 32 x 32 Gram/column tiles on 4 warps. Exceptions measured: the tall kernel
    on the 56-row map takes 64-row tiles on 8 warps (51x5@56: 0.267 vs 0.308); tall and square kernels on maps of
    <= 16 rows take 16-row tiles with 64 columns (47x5@14: 0.045 vs 0.072, 5x5@14: 0.037 vs 0.055), while the wide
    kernel there keeps 32 x 32 (5x47@14: 0.089 vs 0.157)."""
    if tall and band <= 16:
        return 16, 16, 64, 4
    if tall and band > 32 and kband > 32:
        return 64, 16, 32, 8
    return 32, 16, 32, 4


def _allj_applies(band: int, kflat: int) -> bool:
    """Whether a banded weight gradient takes the all-columns kernel by default (``WGRAD_ALLJ``)."""
    return WGRAD_ALLJ and kflat <= WGRAD_ALLJ_MAX_COLUMNS and band <= WGRAD_ALLJ_MAX_BAND


def _wgrad_plan(n: int, c: int, band: int, flat: int, kband: int, kflat: int, tall: bool,
                config: Optional[Tuple] = None) -> WgradPlan:
    """The launch plan of a weight gradient; ``config`` as for :func:`_launch_wgrad`."""
    if config and config[0] == "allj":
        if len(config) not in (1, 5, 6):
            raise ValueError(f"an all-columns config is ('allj',) or ('allj', BLOCK, BLOCK_K, BLOCK_N, num_warps"
                             f"[, max_vec]); got {config!r}")
        tile = tuple(config[1:]) or _wgrad_allj_tile(band, kband, kflat, tall)
        block, block_k, block_n, warps, max_vec = (tile + (8,))[:5]
        all_columns = True
    elif config:
        block, block_n, warps, max_vec = (tuple(config) + (8,))[:4]
        block_k, all_columns = block, False
    elif _allj_applies(band, kflat):
        (block, block_k, block_n, warps), max_vec, all_columns = _wgrad_allj_tile(band, kband, kflat, tall), 8, True
    else:
        # Sweep (H200): 32-row Gram tiles for tall kernels (51x5@56: 0.726 vs 0.805 ms), 64 for wide ones (5x51).
        cap = 32 if tall else 64
        block, block_n, warps, max_vec = min(cap, max(16, _next_pow2(band)), max(16, _next_pow2(kband))), 64, 4, 8
        block_k, all_columns = block, False
    cols = n * flat
    programs = c * (1 if all_columns else kflat) * triton.cdiv(band, block) * triton.cdiv(band, block_k)
    # Split the (image, column) reduction when there are too few programs to fill the GPU.
    splits = max(1, min(triton.cdiv(cols, 4 * block_n), triton.cdiv(2048, programs)))
    per_split = triton.cdiv(triton.cdiv(cols, splits), block_n) * block_n
    return WgradPlan(all_columns, block, block_k, block_n, warps, triton.cdiv(cols, per_split), per_split,
                     _hint_vec("wgrad", tall, flat, block_n, max_vec))


def _launch_wgrad(dy: torch.Tensor, x: torch.Tensor, w_shape: Tuple[int, ...],
                  config: Optional[Tuple] = None) -> torch.Tensor:
    """Weight-gradient launch into a fresh fp32 buffer; ``config``, for tests and benchmarks, is (BLOCK, BLOCK_N,
    num_warps), optionally a fourth entry ``max_vec`` capping the alignment hints (1 = none), or ``("allj",)`` for
    the all-columns kernel with its default tiles, ``("allj", BLOCK, BLOCK_K, BLOCK_N, num_warps[, max_vec])``
    with these."""
    n, c = x.shape[:2]
    dw = torch.zeros(w_shape, device=x.device, dtype=torch.float32)
    band, flat, sx, sdw, kband, kflat = _band_views(x, dw)
    sd = _band_views(dy, dw)[2]
    plan = _wgrad_plan(n, c, band, flat, kband, kflat, w_shape[2] >= w_shape[3], config)
    tiles = triton.cdiv(band, plan.block) * triton.cdiv(band, plan.block_k)
    common = dict(KH=kband, KW=kflat, BLOCK_M=plan.block, BLOCK_N=plan.block_n, BLOCK_K=plan.block_k,
                  USE_TF32=_use_tf32(x.dtype), UPCAST_DOT=_upcast_dot(x.dtype), VEC=plan.vec, num_warps=plan.warps)
    if plan.all_columns:
        jp = _next_pow2(kflat)
        scratch = torch.empty((c * tiles * plan.splits, plan.block, jp * plan.block_k), device=x.device,
                              dtype=torch.float32)
        _pick("dwconv_wgrad_allj_kernel", *x.shape[2:])[(c, tiles, plan.splits)](
            x, dy, dw, scratch, n, band, flat, plan.per_split, *sx, *sd, *sdw, JP=jp, BLOCK_T=64, **common)
    else:
        _pick("dwconv_wgrad_kernel", *x.shape[2:])[(c * kflat, tiles, plan.splits)](
            x, dy, dw, n, band, flat, plan.per_split, *sx, *sd, *sdw, **common)
    return dw


PLANE_MAX_PIXELS = 64
DIRECT_MIN_PIXELS = 256
DIRECT_FWD_MAX_KERNEL = 3
DIRECT_WGRAD_MAX_KERNEL = 7


def kernel_path(h: int, w: int, kh: int, kw: int, weight_grad: bool = False) -> str:
    """Which kernels run a layer's forward and input gradient (or, with ``weight_grad``, its weight gradient):
    "plane" (maps <= PLANE_MAX_PIXELS, any kernel: one dense tensor-core GEMM per channel), "direct" (CUDA cores) or
    "banded" (Toeplitz GEMMs). Direct runs the forward of kernels <= 3 only (``DIRECT_FWD_MAX_KERNEL``) on maps
    > DIRECT_MIN_PIXELS: for 5x5 the banded forward won the sweep on every map (H200, round 9: 0.170 vs 0.258 ms at
    56x56, 0.074 vs 0.152 at 28x28; 25 % on 14x14). So does, since session 12, the weight gradient: the all-columns
    banded kernel (``WGRAD_ALLJ``) beat the direct one on 5x5 (H100: 0.223 vs 0.302 ms at 56x56, 0.106 vs 0.140 at
    28x28), so direct keeps the weight gradient of kernels <= 3 only where that kernel applies (band axis <=
    ``WGRAD_ALLJ_MAX_BAND``); elsewhere, and with ``WGRAD_ALLJ`` off, of kernels <= 7 (``DIRECT_WGRAD_MAX_KERNEL``)
    as before."""
    if h * w <= PLANE_MAX_PIXELS:
        return "plane"
    allj = weight_grad and _allj_applies(h if kh >= kw else w, min(kh, kw))
    max_kernel = DIRECT_WGRAD_MAX_KERNEL if weight_grad and not allj else DIRECT_FWD_MAX_KERNEL
    return "direct" if max(kh, kw) <= max_kernel and h * w > DIRECT_MIN_PIXELS else "banded"


def _direct_fwd_config(h: int, w: int) -> Tuple[int, int, int, int]:
    """(BLOCK_P, TH, TW, num_warps): full-width row strips of about 512 pixels, 1024 elements per program;
    8 warps on 64-wide strips (sweep, 56x56: 0.259 vs 0.312 ms)."""
    tw = min(64, max(8, _next_pow2(w)))
    th = min(max(1, 512 // tw), _next_pow2(h))
    return max(1, 1024 // (th * tw)), th, tw, 8 if tw == 64 else 4


def _launch_direct_fwd(x: torch.Tensor, w: torch.Tensor, out: Optional[torch.Tensor] = None,
                       config: Optional[Tuple[int, int, int, int]] = None) -> torch.Tensor:
    """Direct forward on NCHW-contiguous x and (C, 1, kh, kw)-contiguous w; ``config`` = (BLOCK_P, TH, TW, warps)."""
    n, c, h, wd = x.shape
    kh, kw = w.shape[2:]
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    bp, th, tw, warps = config or _direct_fwd_config(h, wd)
    grid = (triton.cdiv(n * c, bp), triton.cdiv(h, th) * triton.cdiv(wd, tw))
    kernel = _pick("dwconv_direct_fwd_kernel", h, wd)
    kernel[grid](x, w, out, n * c, c, h, wd, KH=kh, KW=kw, BLOCK_P=bp, TH=th, TW=tw, num_warps=warps)
    return out


def _launch_direct_wgrad(dy: torch.Tensor, x: torch.Tensor, w_shape: Tuple[int, ...],
                         config: Optional[Tuple[int, int, int]] = None) -> torch.Tensor:
    """Direct weight gradient into a fresh fp32 buffer; ``config`` = (TH, TW, num_warps) for benchmarks."""
    n, c, h, wd = x.shape
    kh, kw = w_shape[2:]
    dw = torch.zeros(w_shape, device=x.device, dtype=torch.float32)
    taps = _next_pow2(kh * kw)
    if config is None:
        # 64-pixel tiles (sweep: 8x8 on 56x56 0.303 ms, 4x16 on 28x28 0.140 ms; 64-wide strips 0.33 / 0.26 ms).
        tw = 8 if wd >= 32 and wd % 8 == 0 else 16
        config = (64 // tw, tw, 4)
    th, tw, warps = config
    tiles = triton.cdiv(h, th) * triton.cdiv(wd, tw)
    splits = max(1, min(n, triton.cdiv(4096, c * tiles)))
    per_split = triton.cdiv(n, splits)
    grid = (c, tiles, triton.cdiv(n, per_split))
    kernel = _pick("dwconv_direct_wgrad_kernel", h, wd)
    kernel[grid](x, dy, dw, n, c, h, wd, per_split, KH=kh, KW=kw, TAPS=taps, TH=th, TW=tw, num_warps=warps)
    return dw


def _plane_block_n(n: int) -> int:
    return min(64, max(16, _next_pow2(n)))


def _launch_plane_fwd(x: torch.Tensor, w: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Whole-plane forward (maps <= PLANE_MAX_PIXELS) on x of any strides and a (C, 1, kh, kw)-contiguous w."""
    n, c, h, wd = x.shape
    kh, kw = w.shape[2:]
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    block_n = _plane_block_n(n)
    grid = (triton.cdiv(n, block_n), c)
    _pick("dwconv_plane_fwd_kernel", h, wd)[grid](
        x, w, out, n, h, wd, *x.stride(), *out.stride(), KH=kh, KW=kw, PIX=max(16, _next_pow2(h * wd)),
        BLOCK_N=block_n, USE_TF32=_use_tf32(x.dtype), UPCAST_DOT=_upcast_dot(x.dtype), num_warps=4)
    return out


def _launch_plane_wgrad(dy: torch.Tensor, x: torch.Tensor, w_shape: Tuple[int, ...]) -> torch.Tensor:
    n, c, h, wd = x.shape
    kh, kw = w_shape[2:]
    dw = torch.zeros(w_shape, device=x.device, dtype=torch.float32)
    ph, pw = kh // 2, kw // 2
    # Taps whose shift lands inside an h x wd map at least once; on a 7x7 map a 13x5 kernel reaches all 65.
    dh_lo, dh_hi = max(0, ph - h + 1), min(kh - 1, ph + h - 1)
    dw_lo, dw_hi = max(0, pw - wd + 1), min(kw - 1, pw + wd - 1)
    pix = max(16, _next_pow2(h * wd))
    scratch = torch.empty((c, pix, pix), device=x.device, dtype=torch.float32)
    _pick("dwconv_plane_wgrad_kernel", h, wd)[(c,)](
        x, dy, dw, scratch, n, h, wd, dh_lo, dw_lo, dw_hi - dw_lo + 1, (dh_hi - dh_lo + 1) * (dw_hi - dw_lo + 1),
        *x.stride(), *dy.stride(), KH=kh, KW=kw, PIX=pix, BLOCK_N=_plane_block_n(n), BLOCK_T=32,
        USE_TF32=_use_tf32(x.dtype), UPCAST_DOT=_upcast_dot(x.dtype), num_warps=4)
    return dw


_FWD_LAUNCH = {"plane": _launch_plane_fwd, "direct": _launch_direct_fwd, "banded": _launch_fwd}
_WGRAD_LAUNCH = {"plane": _launch_plane_wgrad, "direct": _launch_direct_wgrad, "banded": _launch_wgrad}


def launch_forward(x: torch.Tensor, w: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Forward on NCHW-contiguous x and contiguous w through the path ``kernel_path`` picks (tests pass ``out``)."""
    return _FWD_LAUNCH[kernel_path(*x.shape[2:], *w.shape[2:])](x, w, out)


def launch_weight_grad(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                       dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Weight gradient in ``dtype`` (default weight's; accumulated in fp32) through the path ``kernel_path`` picks."""
    launch = _WGRAD_LAUNCH[kernel_path(*x.shape[2:], *weight.shape[2:], weight_grad=True)]
    return launch(grad_out.contiguous(), x.contiguous(), tuple(weight.shape)).to(dtype or weight.dtype)


class DWConv2dEager(torch.autograd.Function):
    """The op's eager twin: same kernels, same maths, but a plain autograd Function that calls the launchers.

    ``torch.library`` ops pay for dispatcher and schema handling on every call, three times per forward+backward;
    for SLaK-T's 72 depthwise convs per step that CPU time exceeded the GPU time of the small-map layers. The
    registered op stays the route whenever something must see it (``torch.compile``, FlopCounterMode, fake tensors):
    ``depthwise_conv2d_implicit_gemm.depthwise_conv2d`` picks. The weight may come in another dtype than x (fp32
    master weights under bf16 autocast): it is cast here, and its gradient leaves the fp32 accumulator in the
    weight's own dtype, so there is no bf16 rounding of the weight gradient and no cast nodes around the op.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x, w = x.contiguous(), weight.to(x.dtype).contiguous()
        ctx.save_for_backward(x, w)
        ctx.weight_dtype = weight.dtype
        return launch_forward(x, w)

    @staticmethod
    @torch.autograd.function.once_differentiable  # the launchers are not differentiable: say so on double backward
    def backward(ctx, grad_out: torch.Tensor):
        x, w = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        dx = launch_forward(grad_out, w.flip(2, 3)) if ctx.needs_input_grad[0] else None
        dw = launch_weight_grad(grad_out, x, w, ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return dx, dw


dwconv2d_eager = DWConv2dEager.apply


@torch.library.custom_op("slak::dwconv2d", mutates_args=())
def dwconv2d(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Depthwise 'same' conv of NCHW-contiguous x (N, C, H, W) with weight (C, 1, kh, kw) of x's dtype."""
    return launch_forward(x.contiguous(), weight.contiguous())


@dwconv2d.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("slak::dwconv2d_weight_grad", mutates_args=())
def dwconv2d_weight_grad(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weight gradient (same shape and dtype as weight), accumulated in fp32."""
    return launch_weight_grad(grad_out, x, weight)


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
