"""Large-kernel depthwise convolution (stride 1, per-axis "same" padding) with Triton kernels.

Drop-in replacement for the original SLaK/RepLKNet CUDA extension ``depthwise_conv2d_implicit_gemm`` (built from
MegEngine's CUTLASS fork). Same public name and constructor: ``DepthWiseConv2dImplicitGEMM(channels, kernel,
bias=False)`` is an ``nn.Conv2d(channels, channels, kernel, groups=channels, bias=bias)`` whose ``forward`` always
computes a stride-1, dilation-1 cross-correlation with zero padding ``kh // 2`` on top/bottom and ``kw // 2`` on
left/right, so the output has the input's spatial size (the module's own ``padding``/``stride`` attributes are
ignored, as in the original, which derived the padding from the weight shape).

Algorithm (implicit GEMM on a banded matrix). Call the longer kernel axis the *band axis* (rows for 51x5, columns
for 5x51; the kernels get strides that swap the two axes, so no data is moved). For one channel and one kernel tap
``j`` across the short axis, the band-axis correlation is a product with a Toeplitz matrix
``T_j[h, k] = w[k - h + kh // 2, j]``: ``out[h, col] = sum_j sum_k T_j[h, k] * x[k, col + j - kw // 2]``, where
``col`` runs over every (image, position) pair of the short axis. The kernels build ``T_j`` blocks from the weight in
registers and run the products on tensor cores (``tl.dot``: bf16/fp16 operands, fp32 accumulation; fp32 inputs use
tf32 when ``torch.backends.cudnn.allow_tf32`` is set, as cuDNN would, else exact fp32). Flattening the batch into
the GEMM's N dimension is what keeps small maps (14x14) efficient. Maps of <= 64 pixels (the 7x7 stage) run one
dense GEMM per channel over the whole plane (the conv as a 49x49 matrix times the batch). On maps over 256 pixels
direct CUDA-core kernels run the weight gradient of small kernels (both sides <= 7) and the forward of 3x3 ones,
where a banded tile would be mostly zeros (a 5x5 forward is still faster banded: ``dwconv_triton.kernel_path``).
Gradients:

* input gradient: the same forward kernel applied to ``grad_out`` with the kernel flipped on both axes (odd kernels
  keep the same padding under the flip);
* weight gradient: a Gram block ``G[h, k] = sum_col dy[h, col] * x[k, col + j - kw // 2]`` per channel and tap ``j``
  on tensor cores, whose diagonals ``k - h = i - kh // 2`` are summed into ``dw[c, i, j]`` (fp32 atomics).

The op is registered as ``torch.ops.slak.dwconv2d`` (with ``slak::dwconv2d_weight_grad`` for the backward) through
``torch.library.custom_op`` with fake (meta) implementations, so it traces under ``torch.compile``, and with FLOP
formulas (``2 * N * C * H * W * kh * kw`` per op, so FlopCounterMode counts the backward as twice the forward).
Plain eager calls skip the dispatcher through an ``autograd.Function`` twin that runs the same kernels
(``_needs_registered_op`` decides), because the registered op's per-call CPU cost made small-map layers CPU-bound.
Under ``torch.autocast`` the wrapper casts input and weight to the autocast dtype itself (custom ops are not
autocast-aware). Channels-last inputs are made NCHW-contiguous for the kernels and the output is returned
channels-last again.

Fallback. ``is_supported(x, weight)`` says whether the Triton path runs. It does not when: Triton cannot be imported;
the tensors are on CPU and ``TRITON_INTERPRET=1`` was not set before Triton was imported (with it, the kernels run
through Triton's interpreter, which is how CPU-only CI tests them); the dtype is not fp32/fp16/bf16; a kernel side
exceeds ``MAX_KERNEL_SIZE``; or the weight is not depthwise-shaped for ``x``. Then the module computes
``F.conv2d(x, w, b, padding=(kh // 2, kw // 2), groups=C)`` and warns once per reason. Small kernels in fp32 on
CUDA (5x5, 13x5: ``routes_to_cudnn``) take that path by choice, silently: cuDNN was measured faster there. Even
kernel sizes raise ``ValueError`` (constructor and functional form): "same" padding is not defined for them and the
original extension wrote out of bounds.

Name-clash rule: this folder is called ``cutlass/`` for fidelity with the original repository but has no
``__init__.py`` and must never get one: NVIDIA ships a real ``cutlass`` Python package, which must stay importable.
Load this file by path (``importlib.util.spec_from_file_location``); it loads its sibling ``dwconv_triton.py`` the
same way, registered in ``sys.modules`` as ``slak_dwconv_triton``. Without NVIDIA's package, ``import cutlass`` from
the repository root still finds this folder as an (empty) namespace package, so ``importlib.util.find_spec('cutlass')``
is not None there: code that probes for NVIDIA's package that way must also check for an attribute it needs.
"""
import importlib.util
import os
import sys
import warnings
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DepthWiseConv2dImplicitGEMM", "depthwise_conv2d", "is_supported", "MAX_KERNEL_SIZE", "branch_bn_sum"]

MAX_KERNEL_SIZE = 127
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _load_sibling(name: str, filename: str):
    """Import a sibling kernel file by path (the folder is not a package) as ``sys.modules[name]``; None if Triton is
    unavailable."""
    if name in sys.modules:
        return sys.modules[name]
    try:
        import triton  # noqa: F401
    except ImportError:
        return None
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(filename))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules[name]  # never leave a half-initialised module behind for the next import
        raise
    return module


_kernels = _load_sibling("slak_dwconv_triton", "dwconv_triton.py")
# the fused branch-BatchNorm kernels (training; see branch_bn_sum below)
_bn_kernels = _load_sibling("slak_branch_bn_triton", "branch_bn_triton.py")
_warned_reasons = set()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernels_run_on(t: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on ``t``'s device: CUDA, or CPU through the interpreter."""
    return t.device.type == "cuda" or (t.device.type == "cpu" and _interpreting())


def _check_odd(kh: int, kw: int) -> None:
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"DepthWiseConv2dImplicitGEMM needs odd kernel sizes for 'same' padding; got {kh}x{kw}")


def is_supported(x: torch.Tensor, weight: torch.Tensor) -> Tuple[bool, str]:
    """Whether the Triton kernels can run on these tensors.

    Args:
        x: input of shape (N, C, H, W).
        weight: depthwise weight of shape (C, 1, kh, kw).

    Returns:
        (True, "") when the Triton path runs, else (False, reason).
    """
    if _kernels is None:
        return False, "triton is not installed"
    if x.dim() != 4 or weight.dim() != 4 or weight.shape[1] != 1 or weight.shape[0] != x.shape[1]:
        return False, f"not a depthwise conv: x {tuple(x.shape)}, weight {tuple(weight.shape)}"
    if x.device != weight.device:
        return False, f"x on {x.device} but weight on {weight.device}"
    if x.dtype not in _SUPPORTED_DTYPES:
        return False, f"dtype {x.dtype} is not supported"
    if max(weight.shape[2:]) > MAX_KERNEL_SIZE:
        return False, f"kernel {tuple(weight.shape[2:])} exceeds MAX_KERNEL_SIZE={MAX_KERNEL_SIZE}"
    if x.device.type == "cpu":
        if not _interpreting():
            return False, "CPU tensors (set TRITON_INTERPRET=1 before importing triton to run the kernels on CPU)"
    elif x.device.type != "cuda":
        return False, f"device {x.device.type} is not supported"
    return True, ""


# Small kernels in fp32 run on cuDNN. Measured on one H100 (benchmarks/RESULTS.md, issue 19, session 9; detection's
# fp32 maps at batch 2, forward + both gradients): cuDNN took 0.40-0.92x our time on every 5x5 layer and on stage 4's
# 13x5 / 5x13, while our kernels won the long ones (51x5 at 200x336: 2.66 vs 11.08 ms). In bf16 (autocast
# training) ours stay: there cuDNN took 2.0x ours on the 5x5 (RESULTS round 4). Kernels of at most this many taps
# go to cuDNN in fp32 on CUDA; SLAK_DWCONV_CUDNN_FP32_MAX_TAPS=0 keeps every size on ours.
CUDNN_FP32_MAX_TAPS = int(os.environ.get("SLAK_DWCONV_CUDNN_FP32_MAX_TAPS", "65"))


def routes_to_cudnn(dtype: torch.dtype, device_type: str, kh: int, kw: int) -> bool:
    """Whether a (kh, kw) depthwise conv of ``dtype`` input on ``device_type`` runs on cuDNN by choice (fp32 small
    kernels on CUDA, see ``CUDNN_FP32_MAX_TAPS``)."""
    return device_type == "cuda" and dtype == torch.float32 and kh * kw <= CUDNN_FP32_MAX_TAPS


# Set to True to route every call through the registered op (benchmarks compare the two routes).
ALWAYS_REGISTERED_OP = False


def _needs_registered_op() -> bool:
    """Whether this call must go through ``torch.ops.slak.dwconv2d``: under ``torch.compile`` tracing and under any
    TorchDispatchMode (FlopCounterMode, FakeTensorMode, ...), which only see registered ops. Plain eager calls take
    the autograd-Function twin, which runs the same kernels without the dispatcher's per-call CPU cost."""
    if ALWAYS_REGISTERED_OP or torch.compiler.is_compiling():
        return True
    stack_len = getattr(torch._C, "_len_torch_dispatch_stack", None)
    return stack_len is None or stack_len() > 0


def _warn_once(reason: str) -> None:
    """One warning per reason; none while torch.compile traces (a warning call there breaks the graph)."""
    if reason not in _warned_reasons and not torch.compiler.is_compiling():
        _warned_reasons.add(reason)
        warnings.warn(f"depthwise_conv2d: falling back to F.conv2d ({reason})", stacklevel=3)


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Stride-1 depthwise cross-correlation with per-axis 'same' zero padding (kh // 2, kw // 2).

    Args:
        x: input (N, C, H, W), NCHW or channels-last, fp32/fp16/bf16.
        weight: (C, 1, kh, kw) with odd kh and kw.
        bias: optional (C,) added per channel.

    Returns:
        Output of x's shape (and memory format); dtype of x, or the autocast dtype under ``torch.autocast``.

    Raises:
        ValueError: for even kernel sizes.
    """
    kh, kw = weight.shape[-2:]
    _check_odd(kh, kw)
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x = x.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    ok, reason = is_supported(x, weight)
    if not ok or routes_to_cudnn(x.dtype, x.device.type, kh, kw):
        if not ok:
            _warn_once(reason)
        bias = bias.to(x.dtype) if bias is not None else None  # e.g. a folded fp32 bias with bf16 input
        return F.conv2d(x, weight.to(x.dtype), bias, padding=(kh // 2, kw // 2), groups=weight.shape[0])
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    if _needs_registered_op():
        out = _kernels.dwconv2d(x.contiguous(), weight.to(x.dtype))
    else:  # casts the weight itself; its gradient comes back in the weight's dtype straight from fp32
        out = _kernels.dwconv2d_eager(x, weight)
    if bias is not None:
        out = out + bias.to(out.dtype).view(1, -1, 1, 1)
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    return out


# SLaK's ReparamLargeKernelConv sums its branches' BatchNorms through branch_bn_sum when this is on;
# SLAK_FUSED_BRANCH_BN=0 keeps one nn.BatchNorm2d call per branch (benchmarks compare the two).
FUSED_BRANCH_BN = os.environ.get("SLAK_FUSED_BRANCH_BN", "1") != "0"
# Under torch.compile (a model compiled as a whole) the fused branch BatchNorms run as the registered op
# slak::branch_bn_sum when this is on (opt-in: SLAK_COMPILED_BRANCH_BN=1; not yet measured on a GPU), else Inductor
# compiles the plain BatchNorms (5.7 ms of an H100 step against 3.5 ms for these kernels; RESULTS, session 11).
COMPILED_BRANCH_BN = os.environ.get("SLAK_COMPILED_BRANCH_BN", "0") == "1"
# SLaK's blocks sum their input's gradients (branch handles + shortcut) through fan_in_sum when this is on.
FUSED_FAN_IN = os.environ.get("SLAK_FUSED_FAN_IN", "1") != "0"


def _fusable_bn(bn, first, synced: bool) -> bool:
    """A training-mode BatchNorm2d (any BatchNorm when the caller is a SyncBN with 4-D input: ``synced``) whose
    settings and fp32 state the fused kernels reproduce exactly."""
    kind_ok = isinstance(bn, nn.modules.batchnorm._BatchNorm) if synced else type(bn) is nn.BatchNorm2d
    return (kind_ok and type(bn) is type(first) and bn.training and bn.affine and bn.track_running_stats
            and bn.momentum is not None and bn.momentum == first.momentum and bn.eps == first.eps
            and all(t.dtype == torch.float32 and t.is_contiguous()
                    for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var)))


def branch_bn_sum(x: torch.Tensor, branches, group=None, world_size: Optional[int] = None) -> Optional[torch.Tensor]:
    """``sum(b(x) for b in branches)`` for 2-3 ``conv -> bn`` branches (``SLaK.conv_bn``) in training mode, with all
    BatchNorms and the sum in three Triton kernels per pass (``branch_bn_triton.py``); same maths as the separate
    ``nn.BatchNorm2d`` calls (batch statistics in fp32, unbiased running variance, ``num_batches_tracked``).

    ``group``/``world_size``: given by a SyncBN (``utils.SyncBatchNormWithoutHostSync.sum_of_branches``; its BNs are
    then accepted): the statistics cover every rank's batch, with one all-gather forward and one all-reduce backward
    (none for ``world_size == 1``).

    Returns None, having computed nothing, when the fused path does not apply: switched off (``FUSED_BRANCH_BN``),
    no Triton, CPU without the interpreter, a BN that is not a plain training-mode ``nn.BatchNorm2d`` with fp32
    state and shared eps/momentum, a single value per channel, or under dispatch modes (the FLOP counter sees the
    plain modules) and ``torch.compile`` -- there, with ``COMPILED_BRANCH_BN`` and one process, the same kernels run
    as the registered op ``slak::branch_bn_sum`` instead. ``x`` may also be a list with one input per branch (the
    same values: SLaK hands each branch its own handle on one autocast copy, ``SLaK._branch_inputs``).
    """
    xs = list(x) if isinstance(x, (list, tuple)) else [x] * len(branches)
    x = xs[0]
    if not FUSED_BRANCH_BN or _bn_kernels is None or not 2 <= len(branches) <= 3 or x.dim() != 4:
        return None
    if not _kernels_run_on(x):
        return None
    bns = [getattr(b, "bn", None) for b in branches]
    synced = world_size is not None
    if bns[0] is None or not all(bn is not None and _fusable_bn(bn, bns[0], synced) for bn in bns):
        return None
    as_op = (COMPILED_BRANCH_BN and not synced and torch.compiler.is_compiling()
             and getattr(_bn_kernels, "OP_UNAVAILABLE", "") is None)
    if (_needs_registered_op() and not as_op) or x.shape[0] * x.shape[2] * x.shape[3] < 2:
        return None
    if any(t.device != x.device for bn in bns for t in (bn.weight, bn.running_mean)):
        return None
    ys = [b.conv(xi) for b, xi in zip(branches, xs)]
    if ys[0].dtype not in _SUPPORTED_DTYPES or any(y.shape != ys[0].shape or y.dtype != ys[0].dtype for y in ys):
        return sum(bn(y) for bn, y in zip(bns, ys))  # (not reached in SLaK: its branch convs agree)
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    ys = [y.contiguous() for y in ys]
    for bn in bns:
        bn.num_batches_tracked.add_(1)
    bn0 = bns[0]
    if as_op:  # (a functional op: it returns the new running statistics, copied into the buffers here)
        res = torch.ops.slak.branch_bn_sum(ys, [bn.weight for bn in bns], [bn.bias for bn in bns],
                                           [bn.running_mean for bn in bns], [bn.running_var for bn in bns],
                                           float(bn0.eps), float(bn0.momentum))
        for i, bn in enumerate(bns):
            bn.running_mean.copy_(res[2 + i])
            bn.running_var.copy_(res[2 + len(bns) + i])
        out = res[0]
        return out.contiguous(memory_format=torch.channels_last) if channels_last else out
    out = _bn_kernels.BranchBatchNormSum.apply(
        bn0.eps, bn0.momentum, len(bns), group, world_size or 1, *ys, *[bn.weight for bn in bns],
        *[bn.bias for bn in bns], *[bn.running_mean for bn in bns], *[bn.running_var for bn in bns])
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def fan_in_sum(grads, shortcut: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The gradient of a block input from its 1-3 branch handles' gradients and the shortcut's, in one Triton pass
    (``branch_bn_triton.fan_in_sum``: the same additions in the same order as PyTorch's ops, so the same bits), or
    None where that does not apply: no Triton, CPU without the interpreter, a missing gradient, or tensors that are
    not all contiguous and of one shape."""
    if _bn_kernels is None or not FUSED_FAN_IN or not grads or any(g is None for g in grads):
        return None
    ts = list(grads) + ([shortcut] if shortcut is not None else [])
    first = ts[0]
    if not _kernels_run_on(first):
        return None
    if len(grads) > 3 or any(t.shape != first.shape or t.device != first.device or not t.is_contiguous() for t in ts):
        return None
    if _needs_registered_op():
        return None
    return _bn_kernels.fan_in_sum(list(grads), shortcut, dtype)


class DepthWiseConv2dImplicitGEMM(nn.Conv2d):
    """Depthwise 'same' convolution with large odd kernels (original SLaK/RepLKNet extension's name and signature).

    Args:
        channels: number of input (= output) channels.
        kernel: odd kernel size, an int or a (kh, kw) pair.
        bias: whether to learn a per-channel bias.
    """

    def __init__(self, channels: int, kernel, bias: bool = False):
        super().__init__(channels, channels, kernel, groups=channels, bias=bias)
        _check_odd(*self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depthwise_conv2d(x, self.weight, self.bias)


def _self_test() -> None:
    """Compare with nn.Conv2d on the original's __main__ shape (64x384x32x32, 31x31) when a GPU is present."""
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to test")
        return
    torch.manual_seed(0)
    x = torch.randn(64, 384, 32, 32, device="cuda", requires_grad=True)
    ours = DepthWiseConv2dImplicitGEMM(384, 31).cuda()
    ref = nn.Conv2d(384, 384, 31, padding=15, groups=384, bias=False).cuda()
    ref.weight.data.copy_(ours.weight.data)
    y1, y2 = ours(x), ref(x)
    g = torch.randn_like(y1)
    (dx1, dw1), (dx2, dw2) = (torch.autograd.grad(y, (x, m.weight), g) for y, m in ((y1, ours), (y2, ref)))
    for name, a, b in (("out", y1, y2), ("dx", dx1, dx2), ("dw", dw1, dw2)):
        print(f"{name}: relative error {((a - b).norm() / b.norm()).item():.2e}")


if __name__ == "__main__":
    _self_test()
