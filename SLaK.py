"""SLaK: Sparse Large Kernel networks (and ConvNeXt emulated through the same code).

A faithful re-implementation of ``models/SLaK.py`` from "More ConvNets in the 2020s: Scaling up Kernels Beyond
51x51 using Sparsity" (ICLR 2023). Module and parameter names are the original's, so original checkpoints load with
``strict=True``; the constructor takes exactly the original arguments (extra options are keyword-only).

What differs from the original, on purpose (see README "Differences from the original"):

* The depthwise convolution goes through one seam, :func:`get_conv2d`. It picks the fast Triton kernel in
  ``cutlass/`` on CUDA and otherwise an ``nn.Conv2d`` with identical parameters, so the model runs on any device.
  Padding is per axis, ``(kh // 2, kw // 2)``: what the original CUDA extension derives from the weight shape
  (the Python code of the original *asks* for a scalar ``K // 2``, which breaks rectangular kernels: its issue #15).
* BatchNorm is ``nn.BatchNorm2d`` (same keys as the original's hard-wired ``SyncBatchNorm``); ``main.py`` converts it
  to SyncBatchNorm in distributed runs.
* Inference folding works for every layout (the original's ``merge_kernel`` fails for ``Decom`` and ``bn=False``).
* timm's model interface: the models are built by timm's builder with registered pretrained cfgs (no weights are
  shipped: ``pretrained=True`` loads ``pretrained_cfg_overlay=dict(file=...)``), ``forward_features`` returns the
  last stage's NCHW map (the original returned the pooled, normed vector: ``forward_head(forward_features(x),
  pre_logits=True)``), ``features_only=True`` works, and the model scripts (``torch.jit.script``) and FX-traces.
"""

import atexit
import copy
import importlib.util
import json
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import warnings
import zipfile
from typing import IO, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, SelectAdaptivePool2d, get_device_dtype, is_exportable, is_scriptable, trunc_normal_
from timm.models import (build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model,
                         register_notrace_module, resolve_pretrained_cfg)
from timm.models._features import feature_take_indices

__all__ = [
    'SLaK', 'Block', 'LayerNorm', 'ReparamLargeKernelConv', 'get_conv2d', 'conv_bn', 'fuse_bn',
    'load_checkpoint', 'for_single_pass', 'SLaK_tiny', 'SLaK_small', 'SLaK_base', 'SLaK_large', 'CONV_IMPLS',
    'load_checkpoint_file', 'CheckpointError',
]

_logger = logging.getLogger(__name__)

_REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
CONV_IMPLS = ('auto', 'cutlass', 'torch')
_DWCONV_MODULE_NAME = 'depthwise_conv2d_implicit_gemm'
GLOBAL_POOLS = ('avg', 'max', 'avgmax', '')


def _env_switch(name: str) -> Union[str, bool]:
    """'auto' unless the environment variable says 0/false/off (False) or 1/true/on (True)."""
    value = os.environ.get(name, 'auto').strip().lower()
    return {'0': False, 'false': False, 'off': False, '1': True, 'true': True, 'on': True}.get(value, 'auto')


def _load_fast_dwconv(path: Optional[str] = None):
    """Import ``DepthWiseConv2dImplicitGEMM`` from ``cutlass/`` (or from ``path``), or return None.

    The file is loaded by path rather than ``import cutlass...``: ``cutlass/`` has no ``__init__.py`` on purpose, so
    NVIDIA's real ``cutlass`` package is never shadowed by our folder (nor ours by theirs). ``path`` may also be the
    folder of the original MegEngine extension (RepLKNet's ``LARGE_KERNEL_CONV_IMPL`` convention).
    """
    if _DWCONV_MODULE_NAME in sys.modules and path is None:
        return getattr(sys.modules[_DWCONV_MODULE_NAME], 'DepthWiseConv2dImplicitGEMM', None)
    folder = path or os.path.join(_REPO_ROOT, 'cutlass')
    file = os.path.join(folder, _DWCONV_MODULE_NAME + '.py')
    if not os.path.isfile(file):
        return None
    try:
        spec = importlib.util.spec_from_file_location(_DWCONV_MODULE_NAME, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[_DWCONV_MODULE_NAME] = module
        if path is not None and folder not in sys.path:
            sys.path.append(folder)  # the original extension imports its compiled sibling module by name
        spec.loader.exec_module(module)
    except Exception as e:  # an unusable fast path must never break model construction
        sys.modules.pop(_DWCONV_MODULE_NAME, None)
        warnings.warn(f'fast depthwise conv in {folder} could not be imported ({e!r}); using nn.Conv2d')
        return None
    return getattr(module, 'DepthWiseConv2dImplicitGEMM', None)


def prefer_size_agnostic_kernels() -> bool:
    """For a process whose inputs change size every step (detection's multi-scale training; ``detection.slak`` calls
    this): launch every map size through the Triton kernels' size-agnostic twins (``SPECIALISED_SIZES = 0`` in
    ``cutlass/dwconv_triton.py``), not only the sizes after the first 8. Such a run visits each size a few times at
    most, so the specialised kernels of its first sizes would only add compiles (the cascade config's replay in
    ``benchmarks/triton_variants.py``: 62 instead of 96 over 50 iterations). ``SLAK_DWCONV_SPECIALISED_SIZES``, when
    set, wins. Returns whether the setting was changed."""
    if 'SLAK_DWCONV_SPECIALISED_SIZES' in os.environ or _load_fast_dwconv() is None:
        return False
    kernels = getattr(sys.modules.get(_DWCONV_MODULE_NAME), '_kernels', None)
    if kernels is None:  # no Triton: nn.Conv2d runs every size
        return False
    kernels.SPECIALISED_SIZES = 0
    return True


def _resolve_conv_impl(impl: Optional[str]) -> str:
    """Decide which depthwise implementation to build: ``'cutlass'`` or ``'torch'``.

    Priority: the explicit ``impl`` argument, then the ``LARGE_KERNEL_CONV_IMPL`` environment variable, then ``auto``.
    ``auto`` takes the fast kernel when CUDA is available and it imports, except for models built to be scripted or
    exported (``timm.create_model(..., scriptable=True)`` or ``exportable=True``: the Triton module's forward is
    neither), which get ``nn.Conv2d``; ``cutlass`` insists on it (error if it cannot be imported); ``torch`` always
    uses ``nn.Conv2d``. A folder path in the environment variable selects the kernel file in that folder (compatible
    with RepLKNet/SLaK instructions).
    """
    choice = impl if impl is not None else os.environ.get('LARGE_KERNEL_CONV_IMPL', 'auto')
    choice = choice.strip()
    path = None
    if choice not in CONV_IMPLS:
        if os.path.isdir(choice):
            path, choice = choice, 'cutlass'
        else:
            raise ValueError(f'conv_impl / LARGE_KERNEL_CONV_IMPL must be one of {CONV_IMPLS} or a folder holding '
                             f'{_DWCONV_MODULE_NAME}.py; got {choice!r}')
    if choice == 'torch' or (choice == 'auto' and (is_scriptable() or is_exportable())):
        return 'torch'
    fast = _load_fast_dwconv(path)
    if choice == 'cutlass':
        if fast is None:
            raise ValueError('conv_impl="cutlass" was requested but cutlass/depthwise_conv2d_implicit_gemm.py could '
                             'not be imported; use conv_impl="torch" or LARGE_KERNEL_CONV_IMPL=torch')
        return 'cutlass'
    return 'cutlass' if (fast is not None and torch.cuda.is_available()) else 'torch'


def get_conv2d(in_channels: int, out_channels: int, kernel_size: Union[int, Tuple[int, int]], stride: int,
               padding, dilation: int, groups: int, bias: bool, impl: Optional[str] = None, *,
               device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> nn.Conv2d:
    """The one place that decides how a (depthwise) large-kernel convolution is computed.

    Like the original, only ``in_channels``, ``kernel_size`` and ``bias`` really matter for the depthwise case: the
    result is always a stride-1 cross-correlation with per-axis "same" padding ``(kh // 2, kw // 2)`` (what the
    original CUDA extension derives from the weight shape). ``padding``/``stride``/``dilation`` are accepted for
    signature compatibility. Non-depthwise requests get a plain ``nn.Conv2d`` with the arguments as given.

    Both implementations are ``nn.Conv2d`` subclasses with a ``(C, 1, kh, kw)`` weight, so keys, init and FLOP hooks
    are identical whichever runs. ``device``/``dtype``: where the parameters are created (timm's factory kwargs).
    """
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    dd = dict(device=device, dtype=dtype)
    if not (in_channels == out_channels == groups):
        return nn.Conv2d(in_channels, out_channels, (kh, kw), stride, padding, dilation, groups, bias, **dd)
    if _resolve_conv_impl(impl) == 'cutlass':
        conv = _load_fast_dwconv()(in_channels, (kh, kw), bias=bias)  # the original's signature: no factory kwargs
        return conv.to(**dd) if device is not None or dtype is not None else conv
    return nn.Conv2d(in_channels, in_channels, (kh, kw), stride=1, padding=(kh // 2, kw // 2), groups=in_channels,
                     bias=bias, **dd)


def for_single_pass(model: nn.Module) -> nn.Module:
    """Prepare a throw-away copy of a model for a pass that runs once (SNIP's float32 scoring batch).

    The fast depthwise convs become plain ``nn.Conv2d`` sharing their parameters (cuDNN on CUDA) and the blocks run
    their tails eagerly: the Triton kernels and compiled graphs this pass would need serve no later step (training
    runs under autocast, in another dtype), and on a fresh machine compiling them cost more than the pass itself.
    Same maths. Returns ``model``.
    """
    fast = _load_fast_dwconv()
    for module in list(model.modules()):
        if isinstance(module, Block):
            module.COMPILE_TAIL = False
        for name, child in list(module.named_children()):
            if fast is not None and isinstance(child, fast):
                kh, kw = child.kernel_size
                plain = nn.Conv2d(child.in_channels, child.out_channels, (kh, kw), padding=(kh // 2, kw // 2),
                                  groups=child.groups, bias=child.bias is not None, device='meta')
                plain.weight, plain.bias = child.weight, child.bias
                setattr(module, name, plain)
    return model


def conv_bn(in_channels: int, out_channels: int, kernel_size, stride: int, padding, groups: int, dilation: int = 1,
            bn: bool = True, impl: Optional[str] = None, *, device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None) -> nn.Sequential:
    """``conv`` (no bias) followed, when ``bn``, by ``bn``: the original's child names (checkpoint keys)."""
    result = nn.Sequential()
    result.add_module('conv', get_conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                                         bias=False, impl=impl, device=device, dtype=dtype))
    if bn:
        result.add_module('bn', nn.BatchNorm2d(out_channels, device=device, dtype=dtype))
    return result


def fuse_bn(conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm into the preceding bias-free conv: returns (kernel, bias).

    t = gamma / sqrt(running_var + eps); kernel = W * t; bias = beta - running_mean * t. Without BN the bias is 0.
    """
    kernel = conv.weight
    if bn is None:
        return kernel, torch.zeros(kernel.shape[0], dtype=kernel.dtype, device=kernel.device)
    std = (bn.running_var + bn.eps).sqrt()
    t = (bn.weight / std).reshape(-1, 1, 1, 1)
    return kernel * t, bn.bias - bn.running_mean * bn.weight / std


def _pad_to(kernel: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad a (C, 1, kh, kw) kernel to (C, 1, size, size), centred (all branches use centred 'same' padding)."""
    kh, kw = kernel.shape[-2:]
    ph, pw = (size - kh) // 2, (size - kw) // 2
    return F.pad(kernel, [pw, pw, ph, ph])


class _FanOutCast(torch.autograd.Function):
    """``n`` handles on one half-precision copy of ``x``, whose gradients are summed in ``x``'s dtype; with
    ``shortcut``, first a handle on ``x`` itself (the block's residual), whose gradient joins the sum.

    Backward adds ``((g_1 + g_2) + g_3) + g_shortcut`` in float32, the additions PyTorch made before (a cast copy,
    an add per further branch, autograd's add of the residual's gradient), in one fused pass where the fast kernels
    are loaded (``fan_in_sum``): the same bits, a third of the memory traffic."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, n: int, dtype: torch.dtype, shortcut: bool = False):
        ctx.dtype, ctx.shortcut = x.dtype, shortcut
        y = x.to(dtype)
        return tuple(([x.view_as(x)] if shortcut else []) + [y] + [y.view_as(y) for _ in range(n - 1)])

    @staticmethod
    def backward(ctx, *grads):
        g_short, branch = (grads[0], grads[1:]) if ctx.shortcut else (None, grads)
        fast = sys.modules.get(_DWCONV_MODULE_NAME)
        fused = getattr(fast, 'fan_in_sum', None)
        acc = fused(branch, g_short, ctx.dtype) if fused is not None else None
        if acc is None:
            for g in branch:
                if g is not None:
                    acc = g.to(ctx.dtype, copy=True) if acc is None else acc.add_(g)
            if g_short is not None:
                acc = g_short.clone() if acc is None else acc.add_(g_short)
        return acc, None, None, None


# One autocast copy shared by a block's branches (see _branch_inputs); False gives each conv its own cast (A/B runs).
SHARE_AUTOCAST_CAST = True


def _branch_inputs(x: torch.Tensor, n: int) -> List[torch.Tensor]:
    """The input of each of ``n`` parallel branch convs.

    Under autocast every conv would cast the fp32 residual stream to half precision on its own: per block 2-3 casts
    forward, and backward as many casts back plus fp32 sums of the input gradients (about 1.9 ms of memory traffic
    per SLaK-T training step at batch 64). The branches share one cast instead, and their gradients are summed in
    fp32 as before (same values: each conv sees the copy autocast would have made for it). A scripted model
    (TorchScript) takes the plain list, and so do meta tensors (no autocast for them; timm's cfg tests run there).
    """
    if not torch.jit.is_scripting():
        handles = _fan_out(x, n, False)
        if handles is not None:
            return handles
    return [x] * n


def _shares_cast(n: int, input_dtype: torch.dtype, autocast_dtype: Optional[torch.dtype]) -> bool:
    """Where ``_FanOutCast`` applies: ``SHARE_AUTOCAST_CAST``, several branches, a float32 input, autocast on
    (``autocast_dtype`` not None). The one statement of the rule, for the forward pass and for the plans that compile
    its kernels ahead (:func:`fan_in_blocks`)."""
    return SHARE_AUTOCAST_CAST and n > 1 and input_dtype == torch.float32 and autocast_dtype is not None


def _fan_out(x: torch.Tensor, n: int, shortcut: bool) -> Optional[List[torch.Tensor]]:
    """``_FanOutCast``'s handles where it applies (:func:`_shares_cast`), else None."""
    device = x.device.type
    if x.is_meta or not torch.is_autocast_enabled(device):  # (meta tensors: no autocast state to ask for)
        return None
    autocast_dtype = torch.get_autocast_dtype(device)
    if _shares_cast(n, x.dtype, autocast_dtype):
        return list(_FanOutCast.apply(x, n, autocast_dtype, shortcut))
    return None


class ReparamLargeKernelConv(nn.Module):
    """The large-kernel depthwise convolution of a block, with its parallel branches.

    Branches (children names are checkpoint keys): ``Decom`` -> ``LoRA1`` (K x k, tall) + ``LoRA2`` (k x K, wide);
    otherwise ``lkb_origin`` (K x K). Plus ``small_conv`` (k x k) iff ``small_kernel < kernel_size``. Each is
    ``conv_bn``; outputs are summed (no nonlinearity in between). "LoRA" here means the two rectangular kernels of the
    paper's decomposition, not low-rank adapters.

    Inference folding (BN folded into each kernel; exact because every branch uses centred 'same' padding):

    * :meth:`merge_kernel` -> one ``lkb_reparam`` K x K conv with bias: one pass over the input, K*K MACs per pixel
      (2,601 for K = 51). Best when the conv is memory-bound or its cost does not grow with kernel area (small maps
      such as 7x7 where the whole map fits one tile; K = 13 stage 4).
    * :meth:`merge_kernel` with ``decomposed=True`` -> keeps the rectangular kernels separate (``lkb_decomposed``:
      tall K x k with the k x k kernel added into its centre rows, and wide k x K) with one summed bias: 2*K*k MACs
      per pixel (510 for K = 51, k = 5; 535 if the small kernel ran on its own), 5x fewer than K*K, in two passes over
      the input. Best for large maps with large K, where direct convolution is compute-bound (SLaK at 224 px with
      cuDNN or the Triton kernel: measured faster than the single K x K kernel on an H200, benchmarks/RESULTS.md).

    In training the branch BatchNorms may be applied together: ``utils.SyncBatchNormWithoutHostSync`` (one collective
    per block) or, with the Triton convs and plain BatchNorms, ``cutlass``'s fused kernels. Same maths, parameters and
    buffers; the ``bn`` modules' own ``forward`` (and any hook on them) is then not called.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, groups: int,
                 small_kernel: Optional[int], small_kernel_merged: bool = False, Decom: bool = False, bn: bool = True,
                 *, conv_impl: Optional[str] = None, device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.kernel_size = kernel_size
        self.small_kernel = small_kernel
        self.Decom = Decom
        self.conv_impl = conv_impl
        padding = kernel_size // 2  # only for signature compatibility; get_conv2d pads per axis
        conv_kwargs = dict(impl=conv_impl, device=device, dtype=dtype)
        if small_kernel_merged:
            self.lkb_reparam = get_conv2d(in_channels, out_channels, kernel_size, stride, padding, 1, groups, True,
                                          **conv_kwargs)
        else:
            if self.Decom:
                self.LoRA1 = conv_bn(in_channels, out_channels, (kernel_size, small_kernel), stride, padding, groups,
                                     bn=bn, **conv_kwargs)
                self.LoRA2 = conv_bn(in_channels, out_channels, (small_kernel, kernel_size), stride, padding, groups,
                                     bn=bn, **conv_kwargs)
            else:
                self.lkb_origin = conv_bn(in_channels, out_channels, kernel_size, stride, padding, groups, bn=bn,
                                          **conv_kwargs)
            if small_kernel is not None and small_kernel < kernel_size:
                self.small_conv = conv_bn(in_channels, out_channels, small_kernel, stride, small_kernel // 2, groups,
                                          bn=bn, **conv_kwargs)

    def forward(self, inputs: torch.Tensor, branch_inputs: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        """``branch_inputs``: the branches' own handles on ``inputs`` (``Block``'s fan-out with the shortcut)."""
        if hasattr(self, 'lkb_reparam'):
            return self.lkb_reparam(inputs)
        if hasattr(self, 'lkb_decomposed'):
            return _sum_parts(self._decomposed_parts(inputs), self.lkb_bias)
        n = self.branch_count()
        xs = branch_inputs if branch_inputs is not None else _branch_inputs(inputs, n)
        if not torch.jit.is_scripting():
            out = self._fused_branch_sum(xs)
            if out is not None:
                return out
        # branch by branch, submodules by name (TorchScript resolves each hasattr when it compiles)
        if hasattr(self, 'LoRA1'):
            out = self.LoRA1(xs[0]) + self.LoRA2(xs[1])
        else:
            out = self.lkb_origin(xs[0])
        if hasattr(self, 'small_conv'):
            out = out + self.small_conv(xs[n - 1])
        return out

    def _fused_branch_sum(self, xs: List[torch.Tensor]) -> Optional[torch.Tensor]:
        """The sum of the branches with their BatchNorms applied together, or None where that does not apply.

        With the fast conv, its module sums training-mode BatchNorms in fused kernels (None when that does not
        apply). A BN class may also normalise all branches at once itself (utils.SyncBatchNormWithoutHostSync: one
        collective per pass for the block instead of one per BN), handing the fast kernels its process group.
        """
        branches = [self.LoRA1, self.LoRA2] if hasattr(self, 'LoRA1') else [self.lkb_origin]
        if hasattr(self, 'small_conv'):
            branches.append(self.small_conv)
        fast = sys.modules.get(_DWCONV_MODULE_NAME)
        fast_sum = None
        if self.training and fast is not None and isinstance(getattr(branches[0], 'conv', None),
                                                             getattr(fast, 'DepthWiseConv2dImplicitGEMM', ())):
            fast_sum = fast.branch_bn_sum
        fused = getattr(getattr(branches[0], 'bn', None), 'sum_of_branches', None)
        if fused is not None:
            out = fused(xs, branches, fast_sum=fast_sum)
            if out is not None:
                return out
        return fast_sum(xs, branches) if fast_sum is not None else None

    def _decomposed_parts(self, inputs: torch.Tensor) -> List[torch.Tensor]:
        """The two conv outputs of the folded decomposed form (without ``lkb_bias``)."""
        xs = _branch_inputs(inputs, 2)
        return [self.lkb_decomposed['tall'](xs[0]), self.lkb_decomposed['wide'](xs[1])]

    def forward_parts(self, inputs: torch.Tensor, branch_inputs: Optional[List[torch.Tensor]] = None
                      ) -> Tuple[List[torch.Tensor], Optional[torch.Tensor]]:
        """(tensors, bias) whose sum (bias per channel) is :meth:`forward`'s output, so that a caller can fuse the
        sum into what follows (``Block``'s compiled tail): the folded decomposed form returns its two conv outputs
        and bias, every other form its output alone. ``branch_inputs`` as for :meth:`forward`."""
        if hasattr(self, 'lkb_decomposed'):
            return self._decomposed_parts(inputs), self.lkb_bias
        if branch_inputs is not None:
            return [self(inputs, branch_inputs)], None
        return [self(inputs)], None

    def branch_count(self) -> int:
        """How many branch convs the training form runs on the input (0 once folded)."""
        if hasattr(self, 'lkb_reparam') or hasattr(self, 'lkb_decomposed'):
            return 0
        return (2 if hasattr(self, 'LoRA1') else 1) + int(hasattr(self, 'small_conv'))

    def _branches(self) -> Dict[str, nn.Sequential]:
        names = ('LoRA1', 'LoRA2', 'lkb_origin', 'small_conv')
        return {n: getattr(self, n) for n in names if hasattr(self, n)}

    def _folded_size(self) -> int:
        """Side of the square kernel that holds every branch: K, or k when a decomposed k exceeds K."""
        return max(max(b.conv.weight.shape[-2:]) for b in self._branches().values())

    def get_equivalent_kernel_bias(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """One square kernel (normally K x K) and bias equal (in eval mode) to the sum of all branches."""
        size = self._folded_size()
        kernel, bias = 0, 0
        for branch in self._branches().values():
            k, b = fuse_bn(branch.conv, getattr(branch, 'bn', None))
            kernel = kernel + _pad_to(k, size)
            bias = bias + b
        return kernel, bias

    @torch.no_grad()
    def merge_kernel(self, decomposed: bool = False) -> None:
        """Fold all branches (and their BNs) for inference; see the class docstring for which form is faster.

        ``decomposed=False`` gives ``lkb_reparam`` (one K x K conv with bias, the original's key names);
        ``decomposed=True`` gives ``lkb_decomposed`` {tall, wide} plus ``lkb_bias`` (Decom layouts; others fold to
        ``lkb_reparam``).
        Idempotent: an already folded module is left alone.
        """
        if hasattr(self, 'lkb_reparam') or hasattr(self, 'lkb_decomposed'):
            return
        branches = self._branches()
        any_conv = next(iter(branches.values())).conv
        channels = any_conv.weight.shape[0]
        if decomposed and self.Decom:
            tall, tall_bias = fuse_bn(branches['LoRA1'].conv, getattr(branches['LoRA1'], 'bn', None))
            wide, bias = fuse_bn(branches['LoRA2'].conv, getattr(branches['LoRA2'], 'bn', None))
            bias = bias + tall_bias
            if 'small_conv' in branches:  # k x k fits inside the K x k kernel: add it to the centre rows (exact)
                small, small_bias = fuse_bn(branches['small_conv'].conv, getattr(branches['small_conv'], 'bn', None))
                rows = (tall.shape[-2] - small.shape[-2]) // 2
                cols = (tall.shape[-1] - small.shape[-1]) // 2
                tall = tall + F.pad(small, [cols, cols, rows, rows])
                bias = bias + small_bias
            folded = nn.ModuleDict()
            for key, kernel in (('tall', tall), ('wide', wide)):
                conv = get_conv2d(channels, channels, tuple(kernel.shape[-2:]), 1, 0, 1, channels, False,
                                  impl=self.conv_impl).to(kernel.device, kernel.dtype)
                conv.weight.copy_(kernel)
                folded[key] = conv
            self.lkb_decomposed = folded
            self.lkb_bias = nn.Parameter(bias.detach().clone())
        else:
            kernel, bias = self.get_equivalent_kernel_bias()
            size = kernel.shape[-1]
            conv = get_conv2d(channels, channels, size, 1, size // 2, 1, channels, True,
                              impl=self.conv_impl).to(kernel.device, kernel.dtype)
            conv.weight.copy_(kernel)
            conv.bias.copy_(bias)
            self.lkb_reparam = conv
        for name in branches:
            delattr(self, name)

    def reparameterize(self, decomposed: bool = False) -> None:
        """timm's ``reparameterize_model`` hook: same as :meth:`merge_kernel`."""
        self.merge_kernel(decomposed=decomposed)

    def extra_repr(self) -> str:
        impl = 'unknown'
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                impl = 'cutlass' if type(m).__name__ == 'DepthWiseConv2dImplicitGEMM' else 'torch'
                break
        return f'kernel_size={self.kernel_size}, small_kernel={self.small_kernel}, Decom={self.Decom}, conv_impl={impl}'


@register_notrace_module  # (FX: its forward asks the input's layout and dtype; a leaf in timm's traced graphs)
class LayerNorm(nn.Module):
    """LayerNorm over channels for ``channels_last`` (N, H, W, C) or ``channels_first`` (N, C, H, W) tensors.

    channels_first normalises each pixel over dim 1 with the biased variance, as the original (and ConvNeXt) do;
    it is correct for any memory format, including ``torch.channels_last``, and returns the input's format.

    The original spelled channels_first out in tensor ops (mean, subtract, square, mean, add, sqrt, divide, scale,
    shift): about 8 full-size kernels forward and 15 backward per LayerNorm, each a pass over the fp32 map, and
    under autocast a bfloat16 normalisation of the stem's half-precision output. Here it is ``F.layer_norm`` on a
    channels-last view instead: one kernel each way plus the layout copies, in the dtype the original's result had
    (float32 under autocast); the same maths, rounded differently. Counted for SLaK-T's stem and three downsampling
    LayerNorms at batch 64: ~37 passes over the map forward + backward before, ~14 now. Measured (H100, graph
    replays, benchmarks/RESULTS.md session 12): +3-4 % training throughput, but 3.2 % slower inference (its layout
    copies cost more there than the original's ops on the NCHW map).
    """

    FUSED_CHANNELS_FIRST: bool = True  # False: the original's spelled-out ops

    def __init__(self, normalized_shape: int, eps: float = 1e-6, data_format: str = 'channels_last', *,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(normalized_shape, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(normalized_shape, device=device, dtype=dtype))
        self.eps = eps
        self.data_format = data_format
        if self.data_format not in ('channels_last', 'channels_first'):
            raise NotImplementedError(f'data_format must be channels_last or channels_first; got {data_format!r}')
        self.normalized_shape = (normalized_shape,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.data_format == 'channels_last':
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        if not torch.jit.is_scripting() and self._original_ops():  # (A/B runs: benchmarks/bench_throughput.py)
            u = x.mean(1, keepdim=True)
            s = (x - u).pow(2).mean(1, keepdim=True)
            return self.weight[:, None, None] * ((x - u) / torch.sqrt(s + self.eps)) + self.bias[:, None, None]
        # (the original's result had the promoted dtype of x and the weight: float32 for a half-precision stem
        # output under autocast, which CPU autocast's layer_norm would otherwise leave in half precision)
        dtype = torch.promote_types(x.dtype, self.weight.dtype)
        y = F.layer_norm(x.permute(0, 2, 3, 1).to(dtype), self.normalized_shape, self.weight, self.bias,
                         self.eps).permute(0, 3, 1, 2)
        return y.contiguous() if x.is_contiguous() else y

    @torch.jit.unused
    def _original_ops(self) -> bool:
        return not self.FUSED_CHANNELS_FIRST


@register_notrace_module
class Block(nn.Module):
    """SLaK block: large-kernel depthwise conv -> LayerNorm -> Linear -> GELU -> Linear -> gamma -> residual.

    Like ConvNeXt's block, the pointwise layers run as ``nn.Linear`` on an NHWC permutation (the original's choice,
    and its checkpoint keys ``pwconv1``/``pwconv2`` are Linear weights of shape (4C, C) / (C, 4C)).

    Width 1.3 gives channel counts such as 249 and 499 that are not multiples of 8; cuBLAS then has no 16-byte
    aligned rows and falls back to slow unvectorised GEMM kernels (on an H200, SLaK-T's pointwise layers took 21 ms
    of a 93 ms training step, 3.5x ConvNeXt-T's time per FLOP). On CUDA the MLP therefore runs on copies zero-padded
    to multiples of 8 (input channels, hidden units, weights and biases; the padded units are exactly 0 after GELU),
    and the output is sliced back: same maths, same parameters and checkpoint keys. ``PAD_POINTWISE`` ('auto': on
    CUDA only, True, False) switches it for every block; ``POINTWISE_PAD_MULTIPLE`` (environment variable
    ``SLAK_POINTWISE_PAD``, default 8) sets the multiple (e.g. 64: whole GEMM tiles, 1-7 % more GEMM FLOPs per
    layer at width 1.3).

    Everything after the large-kernel convs (their sum, permute, LayerNorm, padded MLP, layer scale, drop path,
    residual) runs on CUDA as one ``torch.compile``'d pure function, ``_block_tail``: eagerly these are ~15 memory-bound
    kernels per block, several of them transposing copies, and they took more GPU time than the depthwise convs (H200,
    SLaK-T training step at batch 64: 1,273 vs 1,008 img/s, benchmarks/RESULTS.md round 10). Compiled once per stage
    shape, on first use; same maths. ``COMPILE_TAIL`` ('auto': on CUDA; True, False; environment variable
    ``SLAK_COMPILE_TAIL=0`` turns it off) switches it; FLOP counting, forward hooks on the tail's modules and a model
    compiled as a whole take the plain path, and a failing compiler gives one warning and the plain path.

    A scripted model (``torch.jit.script``) runs the plain maths; timm's FX tracing keeps the block as one leaf
    (``register_notrace_module``), so a traced graph runs each block's ``forward`` as here, fast paths included.
    """

    PAD_POINTWISE: Union[str, bool] = 'auto'
    COMPILE_TAIL: Union[str, bool] = _env_switch('SLAK_COMPILE_TAIL')

    def __init__(self, dim: int, drop_path: float = 0., layer_scale_init_value: float = 1e-6, kernel_size=(7, 7),
                 Decom=None, bn: bool = True, *, conv_impl: Optional[str] = None,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.large_kernel = ReparamLargeKernelConv(in_channels=dim, out_channels=dim, kernel_size=kernel_size[0],
                                                   stride=1, groups=dim, small_kernel=kernel_size[1],
                                                   small_kernel_merged=False, Decom=Decom, bn=bn, conv_impl=conv_impl,
                                                   **dd)
        self.norm = LayerNorm(dim, eps=1e-6, **dd)
        self.pwconv1 = nn.Linear(dim, 4 * dim, **dd)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim, **dd)
        self.gamma = (nn.Parameter(layer_scale_init_value * torch.ones(dim, **dd)) if layer_scale_init_value > 0
                      else None)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        if not torch.jit.is_scripting() and self._use_compiled_tail(x):
            # training under autocast: one fan-out gives the shortcut and the branches their handles on x, so that
            # the gradient of x is summed in one pass (_FanOutCast); else the large-kernel module fans out itself
            handles = None
            if torch.is_grad_enabled() and x.requires_grad and isinstance(self.large_kernel, ReparamLargeKernelConv):
                handles = _fan_out(x, self.large_kernel.branch_count(), True)
            if handles is not None:
                shortcut = handles[0]
                parts, bias = self.large_kernel.forward_parts(x, handles[1:])
            else:  # (any large-kernel module: forward_parts(x) is the interface)
                parts, bias = self.large_kernel.forward_parts(x)
                shortcut = self._promoted_shortcut(x)
            return _run_tail(parts, bias, shortcut, self.norm.weight, self.norm.bias, self.pwconv1.weight,
                             self.pwconv1.bias, self.pwconv2.weight, self.pwconv2.bias, self.gamma,
                             self._drop_scale(shortcut), self.norm.eps)
        x = self.large_kernel(x)
        x = x.permute(0, 2, 3, 1)
        x = self.norm(x)
        if not torch.jit.is_scripting() and self._pad_pointwise(x):
            x = self._padded_mlp(x)
        else:
            x = self.pwconv2(self.act(self.pwconv1(x)))
        if self.gamma is not None:
            x = self.gamma * x
        x = x.permute(0, 3, 1, 2)
        return shortcut + self.drop_path(x)

    @torch.jit.unused
    def _use_compiled_tail(self, x: torch.Tensor) -> bool:
        mode = self.COMPILE_TAIL
        if not mode or _TAIL_STATE['broken'] or not _no_dispatch_mode() or torch.compiler.is_compiling():
            return False  # (a model compiled as a whole by its user traces the plain path instead)
        if any(m._forward_hooks or m._forward_pre_hooks for m in (self.norm, self.pwconv1, self.act, self.pwconv2,
                                                                  self.drop_path)):
            return False  # hooks on the tail's modules would not run inside the compiled function
        return x.is_cuda or mode is True

    def _promoted_shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """The residual in the dtype the tail's sum promotes it to anyway (the layer scale's: float32 for the
        half-precision output of a downsampling conv under autocast): an exact up-cast, so that a stage's first block
        shares the compiled graph of its later blocks, whose input is already that float32 sum. One training graph
        and one evaluation graph per stage instead of two (SLaK-T: 4 + 4, not 7 + 7), each compiled on a fresh
        machine and traced again by every process. Same outputs bit for bit; the drop-path factors are then drawn
        in float32, as timm's DropPath draws them on the float32 branch."""
        if self.gamma is None or not x.is_floating_point():
            return x
        dtype = torch.promote_types(x.dtype, self.gamma.dtype)
        return x if dtype == x.dtype else x.to(dtype)

    def _drop_scale(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-sample factors of ``self.drop_path`` (timm's DropPath: Bernoulli(keep) / keep); None in evaluation.

        A training block without drop path (the first block: drop-path rates rise from 0) gets factors of 1 (no
        random draw), so that one compiled tail graph serves every block of a stage (x * 1 is exact)."""
        if not self.training:
            return None
        prob = getattr(self.drop_path, 'drop_prob', 0.)
        if not prob:
            return x.new_ones((x.shape[0], 1, 1, 1))
        keep = 1. - prob
        scale = x.new_empty((x.shape[0], 1, 1, 1)).bernoulli_(keep)
        return scale.div_(keep) if keep > 0. and getattr(self.drop_path, 'scale_by_keep', True) else scale

    @torch.jit.unused
    def _pad_pointwise(self, x: torch.Tensor) -> bool:
        dim, multiple = self.pwconv1.in_features, POINTWISE_PAD_MULTIPLE
        if dim % multiple == 0 and self.pwconv1.out_features % multiple == 0:
            return False
        mode = self.PAD_POINTWISE
        if not (x.is_cuda if mode == 'auto' else bool(mode)):
            return False
        # Under a TorchDispatchMode (FlopCounterMode in main.count_macs) keep nn.Linear: FLOPs are counted without
        # the padding and per module (the sparse count scales each Linear by its density).
        return _no_dispatch_mode()

    def _padded_mlp(self, x: torch.Tensor) -> torch.Tensor:
        """``pwconv2(act(pwconv1(x)))`` with every GEMM dimension zero-padded to a multiple of
        ``POINTWISE_PAD_MULTIPLE``."""
        return _mlp_padded(x, self.pwconv1.weight, self.pwconv1.bias, self.pwconv2.weight, self.pwconv2.bias,
                           self.act)


def _pointwise_pad_multiple() -> int:
    raw = os.environ.get('SLAK_POINTWISE_PAD', '8').strip()
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f'SLAK_POINTWISE_PAD must be a whole number >= 1 (the multiple that the blocks\' MLP GEMM '
                         f'dimensions are zero-padded to on CUDA; default 8); got {raw!r}')
    return int(raw)


POINTWISE_PAD_MULTIPLE = _pointwise_pad_multiple()


def _mlp_padded(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
                b2: Optional[torch.Tensor], act=F.gelu) -> torch.Tensor:
    """``linear(act(linear(x, w1, b1)), w2, b2)`` on (..., dim) inputs with every GEMM dimension zero-padded to a
    multiple of ``POINTWISE_PAD_MULTIPLE`` (see ``Block``); under autocast the half-precision copy is padded, not
    LayerNorm's fp32 output."""
    dim, hidden, multiple = w1.shape[1], w1.shape[0], POINTWISE_PAD_MULTIPLE
    pd, ph = -dim % multiple, -hidden % multiple
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    w1, w2 = F.pad(w1, (0, pd, 0, ph)), F.pad(w2, (0, ph, 0, pd))
    b1 = F.pad(b1, (0, ph)) if b1 is not None else None
    b2 = F.pad(b2, (0, pd)) if b2 is not None else None
    return F.linear(act(F.linear(F.pad(x, (0, pd)), w1, b1)), w2, b2)[..., :dim]


def _no_dispatch_mode() -> bool:
    """No TorchDispatchMode (FLOP counter) is active; while torch.compile traces, True without asking (Dynamo cannot
    trace the query: it was a graph break in every block of a model compiled as a whole)."""
    if torch.compiler.is_compiling():
        return True
    stack_len = getattr(torch._C, '_len_torch_dispatch_stack', None)
    return stack_len is not None and stack_len() == 0


def _sum_parts(parts: List[torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The sum of ``ReparamLargeKernelConv.forward_parts``: the tensors plus the per-channel bias."""
    x = parts[0]
    for part in parts[1:]:
        x = x + part
    return x if bias is None else x + bias.to(x.dtype).reshape(1, -1, 1, 1)


def _block_tail(parts: List[torch.Tensor], bias: Optional[torch.Tensor], shortcut: torch.Tensor,
                ln_w: torch.Tensor, ln_b: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor],
                w2: torch.Tensor, b2: Optional[torch.Tensor], gamma: Optional[torch.Tensor],
                drop_scale: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """``Block.forward`` after the large-kernel convs, as one pure function: the sum of ``parts`` (+ ``bias`` per
    channel), permute, LayerNorm, the MLP on GEMM dimensions zero-padded (``_mlp_padded``), layer scale, drop path
    (``drop_scale``: per-sample factors), permute back, residual."""
    x = _sum_parts(parts, bias)
    y = F.layer_norm(x.permute(0, 2, 3, 1), (w1.shape[1],), ln_w, ln_b, eps)
    y = _mlp_padded(y, w1, b1, w2, b2)
    if gamma is not None:
        y = gamma * y
    y = y.permute(0, 3, 1, 2)
    if drop_scale is not None:
        y = y * drop_scale
    return shortcut + y


# The compiled tail: built on first use; 'broken' once torch.compile has failed here (the blocks then run eagerly);
# 'keys': the call signatures compiled so far (one graph each); 'sizes': the map sizes each stage width and mode saw.
_TAIL_STATE = {'fn': None, 'broken': False, 'keys': set(), 'sizes': {}, 'full_warned': False}
TAIL_BACKEND = 'inductor'  # tests trace with 'aot_eager' (no code generation)
# Compiled graphs per process. A classification run needs 8 (4 stage shapes x training / evaluation, evaluation
# graphs serving every batch size); multi-scale detection at most 16 (per stage and mode one graph for the first map
# size and one for all others); past this limit new shapes run eagerly.
TAIL_MAX_GRAPHS = 32


def _tail_shapes() -> str:
    raw = os.environ.get('SLAK_TAIL_SHAPES', 'static').strip().lower()
    if raw not in ('static', 'dynamic'):
        raise ValueError(f"SLAK_TAIL_SHAPES must be 'static' (one compiled tail graph per stage shape, the default) or "
                         f"'dynamic' (one graph for every stage: symbolic channels and map sizes); got {raw!r}")
    return raw


# 'dynamic' (SLAK_TAIL_SHAPES=dynamic, opt-in): every stage's blocks share one training graph
# and one evaluation graph, with symbolic channels, height and width (the weights' matching sizes too): SLaK-T
# compiles 1 + 1 graphs instead of 4 + 4 on a fresh machine and traces one per process; the price is kernels
# generated for symbolic sizes (reductions over a symbolic channel count). On the CPU with Inductor's C++ backend the
# four stage shapes' training graphs compiled in 20.2 s as one against 28.4 s as four (benchmarks/tail_compile_time.py,
# RESULTS.md issue 18 session 14). Measured on an H100 through main.py (session 15) it does not pay: the background
# compile 45.3 s instead of 50.9 s, the cold first step 61 s instead of 65 s, warm 28 s instead of 25 s, and steady
# training 7-8 % slower; so 'static' stays the default.
TAIL_SHAPES = _tail_shapes()


def _symbolic_view(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A view of a tail weight (1-D: channels or hidden units; 2-D: the MLP's matrices) with every size marked
    symbolic for torch.compile (the weight itself stays unmarked); None stays None."""
    if tensor is None:
        return None
    view = tensor.view_as(tensor)
    torch._dynamo.mark_dynamic(view, list(range(view.dim())))
    return view


def _run_tail(parts: List[torch.Tensor], bias: Optional[torch.Tensor], shortcut: torch.Tensor,
              ln_w: torch.Tensor, ln_b: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
              b2: Optional[torch.Tensor], gamma: Optional[torch.Tensor], drop_scale: Optional[torch.Tensor],
              eps: float) -> torch.Tensor:
    """``_block_tail`` through ``torch.compile``; if compiling fails, one warning and the eager function."""
    state = _TAIL_STATE
    # what makes torch.compile trace a new graph: shapes, layouts, dtypes, modes
    device = shortcut.device.type
    autocast = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device)
    shape = list(parts[0].shape)
    grad = torch.is_grad_enabled()
    layout = (parts[0].is_contiguous(), parts[0].is_contiguous(memory_format=torch.channels_last),
              shortcut.is_contiguous(), shortcut.is_contiguous(memory_format=torch.channels_last))
    modes = (len(parts), parts[0].dtype, shortcut.dtype, str(shortcut.device), bias is None, b1 is None, b2 is None,
             gamma is None, drop_scale is None, grad, w1.requires_grad, autocast)
    dynamic = []
    if not grad and shape[0] > 1:
        # Evaluation: one graph for every batch size (the last, smaller batch of a validation set, EMA evaluation
        # at another batch) instead of one per size; training batches keep static shapes (drop_last).
        dynamic.append(0)
    # Map sizes stay static while a stage sees one size (classification); from a second size on (multi-scale
    # detection and segmentation) one graph with symbolic height and width serves them all, instead of a compile per
    # input size. (Sizes of 1 stay static: torch.compile specialises them.)
    one_graph = TAIL_SHAPES == 'dynamic'
    sizes = state['sizes'].setdefault((None if one_graph else shape[1], layout, modes), set())
    sizes.add(tuple(shape[2:]))
    if len(sizes) > 1 or one_graph:
        dynamic += [d for d in (2, 3) if shape[d] > 1]
    if one_graph and shape[1] > 1:
        dynamic.append(1)
    if dynamic:
        # Views are marked, not the caller's tensors, which a later call (training) must see static.
        parts, shortcut = [p.view_as(p) for p in parts], shortcut.view_as(shortcut)
        for tensor in (*parts, shortcut):
            torch._dynamo.mark_dynamic(tensor, dynamic)
        if 1 in dynamic:  # symbolic channels: the weights' sizes that follow them
            ln_w, ln_b, w1, b1, w2, b2, gamma, bias = (
                _symbolic_view(t) for t in (ln_w, ln_b, w1, b1, w2, b2, gamma, bias))
        for d in dynamic:
            shape[d] = None
    strides = layout if any(d in dynamic for d in (1, 2, 3)) else (parts[0].stride()[1:], shortcut.stride()[1:])
    args = (parts, bias, shortcut, ln_w, ln_b, w1, b1, w2, b2, gamma, drop_scale, eps)
    key = (tuple(shape), strides, modes)
    if key not in state['keys']:
        if len(state['keys']) >= TAIL_MAX_GRAPHS:
            if not state['full_warned']:
                state['full_warned'] = True
                warnings.warn(f'SLaK block tail: {TAIL_MAX_GRAPHS} shapes/modes compiled already; new ones run '
                              'eagerly (same maths, slower). For inputs of ever new sizes set SLAK_COMPILE_TAIL=0.')
            return _block_tail(*args)
        state['keys'].add(key)
    if state['fn'] is None:
        config = torch._dynamo.config
        for name in ('recompile_limit', 'cache_size_limit'):  # dynamo's own limit must not cut in first
            if hasattr(config, name):
                setattr(config, name, max(getattr(config, name), 2 * TAIL_MAX_GRAPHS))
        state['fn'] = torch.compile(_block_tail, backend=TAIL_BACKEND, dynamic=False)
    try:
        return state['fn'](*args)
    except torch._dynamo.exc.TorchDynamoException as e:
        state['broken'] = True
        warnings.warn(f'torch.compile of the SLaK block tail failed ({type(e).__name__}: {str(e)[:300]}); the '
                      'blocks run eagerly from now on (slower, same maths). Set SLAK_COMPILE_TAIL=0 to skip it.')
        return _block_tail(*args)


def _check_kernel_sizes(kernel_size: Sequence[int], Decom) -> List[int]:
    if not isinstance(kernel_size, (list, tuple)) or len(kernel_size) != 5:
        raise ValueError(f'kernel_size must list 5 ints (4 stage kernels + the small kernel), e.g. 51 49 47 13 5; '
                         f'got {kernel_size!r}')
    ks = [int(k) for k in kernel_size]
    if any(k < 1 for k in ks):
        raise ValueError(f'kernel_size entries must be positive; got {ks}')
    for i, k in enumerate(ks[:4]):
        if k % 2 == 0:
            raise ValueError(f'kernel_size[{i}] = {k} is even: kernels need a centre pixel for "same" padding; '
                             f'use an odd size such as {k + 1}')
    small = ks[4]
    small_used = bool(Decom) or any(small < k for k in ks[:4])
    if small_used and small % 2 == 0:
        raise ValueError(f'kernel_size[4] (the small kernel) = {small} is even; use an odd size such as {small + 1}')
    return ks


class SLaK(nn.Module):
    """SLaK (and, with ``kernel_size=[7, 7, 7, 7, 100]``, ConvNeXt) for image classification.

    Args are the original's, with the same defaults. ``width_factor`` scales every entry of ``dims`` with truncation
    (``int(d * width_factor)``: 1.3 gives 124/249/499/998). ``kernel_size`` = 4 stage kernels + 1 small kernel.
    Keyword-only extras: ``conv_impl`` ('auto' | 'cutlass' | 'torch', default: env ``LARGE_KERNEL_CONV_IMPL`` or
    'auto') chooses the depthwise implementation (see :func:`get_conv2d`); ``global_pool`` ('avg' as the original,
    'max', 'avgmax' or '' for none) is the head's pooling; ``device``/``dtype`` place the parameters (timm's factory
    kwargs).

    timm's interface: :meth:`forward_features` returns the last stage's (N, C3, H/32, W/32) map and
    :meth:`forward_head` pools it, applies ``norm`` and ``head``. The original's ``forward_features`` (the pooled,
    normed vector) is ``forward_head(forward_features(x), pre_logits=True)``. Stage feature maps come from
    :meth:`forward_intermediates`, the one feature API (``features_only=True``, segmentation, detection, ERF).
    """

    def __init__(self, in_chans: int = 3, num_classes: int = 1000, depths: Sequence[int] = (3, 3, 9, 3),
                 dims: Sequence[int] = (96, 192, 384, 768), drop_path_rate: float = 0.,
                 layer_scale_init_value: float = 1e-6, head_init_scale: float = 1.,
                 kernel_size: Sequence[int] = (51, 49, 47, 13, 5), width_factor: float = 1.0, Decom=None,
                 bn: bool = True, *, conv_impl: Optional[str] = None, global_pool: str = 'avg',
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        if not width_factor > 0:
            raise ValueError(f'width_factor must be > 0; got {width_factor!r}')
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError(f'depths and dims must have 4 entries; got depths={list(depths)}, dims={list(dims)}')
        kernel_size = _check_kernel_sizes(kernel_size, Decom)
        dims = [int(x * width_factor) for x in dims]
        if min(dims) < 1:
            raise ValueError(f'width_factor={width_factor} makes a stage with 0 channels: {dims}')
        dd = dict(device=device, dtype=dtype)
        self.dims = dims
        self.depths = list(depths)
        self.kernel_size = kernel_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = dims[-1]
        self.grad_checkpointing = False
        self.conv_impl = _resolve_conv_impl(conv_impl)

        self.downsample_layers = nn.ModuleList()
        self.downsample_layers.append(nn.Sequential(
            nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4, **dd),
            LayerNorm(dims[0], eps=1e-6, data_format='channels_first', **dd)))
        for i in range(3):
            self.downsample_layers.append(nn.Sequential(
                LayerNorm(dims[i], eps=1e-6, data_format='channels_first', **dd),
                nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2, **dd)))

        self.stages = nn.ModuleList()
        dp_rates = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths), device='cpu')]
        cur = 0
        for i in range(4):
            self.stages.append(nn.Sequential(*[
                Block(dim=dims[i], drop_path=dp_rates[cur + j], layer_scale_init_value=layer_scale_init_value,
                      kernel_size=(kernel_size[i], kernel_size[-1]), Decom=Decom, bn=bn, conv_impl=self.conv_impl,
                      **dd)
                for j in range(depths[i])]))
            cur += depths[i]

        self.global_pool = _global_pool(global_pool)
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6, **dd)
        self.head = nn.Linear(dims[-1], num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        if num_classes > 0:
            self.head.weight.data.mul_(head_init_scale)
            self.head.bias.data.mul_(head_init_scale)
        self.feature_info = [dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f'stages.{i}') for i in range(4)]
        _logger.info('SLaK: depthwise large-kernel conv implementation = %s', self.conv_impl)

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)

    # ---- timm-style interface -----------------------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Union[str, List]]:
        """Parameter groups for timm's layer decay and optimizer factory: the stem, then each stage's downsampling
        with its blocks (coarse) or block by block; ``norm``/``head`` form the last group."""
        return dict(
            stem=r'^downsample_layers\.0\.',
            blocks=r'^(?:downsample_layers|stages)\.(\d+)' if coarse else [
                (r'^downsample_layers\.(\d+)', (0,)),
                (r'^stages\.(\d+)\.(\d+)', None),
            ])

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Names of parameters exempt from weight decay beyond the usual 1-D ones: none (norms, biases and the layer
        scales ``gamma`` are 1-D, which the optimizer factories already exempt, as in the original)."""
        return set()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None, reset_other: bool = False) -> None:
        """A new (untrained) ``head`` for ``num_classes`` (0: none); ``global_pool`` replaces the pooling when given;
        ``reset_other`` also drops ``norm`` (as pruning does: the head then sits on the bare feature map)."""
        dd = get_device_dtype(self)
        if global_pool is not None:
            self.global_pool = _global_pool(global_pool).train(self.training)
        if reset_other:
            self.norm = nn.Identity().train(self.training)
        self.num_classes = num_classes
        self.head = (nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0
                     else nn.Identity()).train(self.training)

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = 'NCHW',
                              intermediates_only: bool = False
                              ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs (NCHW) — the one feature API of the project, with timm's signature.

        Args:
            indices: stage indices to return (default all); an int n means the last n stages.
            norm: accepted for timm compatibility; SLaK has no norm on feature maps (its ``norm`` follows the pooling,
                as ConvNeXt's head norm), so the maps are the same either way.
            stop_early: stop after the last requested stage (implied by ``intermediates_only``).
            output_fmt: 'NCHW' (the only layout).
            intermediates_only: return only the list of feature maps; otherwise ``(final, intermediates)`` with
                ``final`` the last-stage feature map (:meth:`forward_features`).
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt must be NCHW; got '{output_fmt}'")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last = max_index if stop_early or intermediates_only else len(self.stages) - 1
        intermediates = []
        for i, (downsample, stage) in enumerate(zip(self.downsample_layers, self.stages)):
            if i <= last:  # (TorchScript unrolls this loop and allows no break in it)
                x = downsample(x)
                if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                    x = checkpoint_seq(stage, x, use_reentrant=False)
                else:
                    x = stage(x)
                if i in take_indices:
                    intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the stages after the last of ``indices`` (and, with ``prune_head`` or when stages go, the pooling,
        ``norm`` and ``head``); returns the absolute indices. ``prune_norm`` has nothing to prune: no norm acts on the
        feature maps. timm's ``features_only`` wrapper calls this."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.downsample_layers = self.downsample_layers[:max_index + 1]
        self.stages = self.stages[:max_index + 1]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '', reset_other=True)
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's (N, C, H, W) feature map (timm convention). The original's ``forward_features``, the
        pooled and normed vector, is ``forward_head(forward_features(x), pre_logits=True)``."""
        for downsample, stage in zip(self.downsample_layers, self.stages):
            x = downsample(x)
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = checkpoint_seq(stage, x, use_reentrant=False)
            else:
                x = stage(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool (``global_pool``), ``norm``, then ``head`` unless ``pre_logits``. Without pooling (``global_pool=''``)
        the norm and the classifier act on every pixel and the output stays (N, C, H, W)."""
        x = self.global_pool(x)
        if self.global_pool.is_identity():
            x = self.norm(x.permute(0, 2, 3, 1))
            return (x if pre_logits else self.head(x)).permute(0, 3, 1, 2)
        x = self.norm(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def load_pretrained(self, checkpoint_path: str) -> None:
        """timm's hook (``custom_load``) for ``pretrained_cfg_overlay=dict(file=...)``: the checkpoint's ``model``
        entry (not ``model_ema``, which timm's generic loader would prefer) loaded strictly, as ``--resume`` does; a
        classifier for another number of classes is skipped (timm's ``num_classes`` convention)."""
        state = extract_state_dict(load_checkpoint_file(checkpoint_path))
        own = self.state_dict()
        other_head = any(k.startswith('head.') and (k not in own or v.shape != own[k].shape) for k, v in state.items())
        load_checkpoint(self, state, strict=True, ignore=('head.',) if other_head else ())

    # ---- inference folding ----------------------------------------------------------------------------------------
    def reparameterize(self, decomposed: bool = False) -> 'SLaK':
        """Fold every large-kernel module for inference (see :class:`ReparamLargeKernelConv`). Returns self."""
        for m in self.modules():
            if isinstance(m, ReparamLargeKernelConv):
                m.merge_kernel(decomposed=decomposed)
        return self


def _global_pool(pool_type: str) -> SelectAdaptivePool2d:
    """timm's pooling for ``global_pool``, in its mean/amax form (``x.mean((2, 3))``: the original's pooling, bit for
    bit); '' keeps the map."""
    if pool_type not in GLOBAL_POOLS:
        raise ValueError(f'global_pool must be one of {GLOBAL_POOLS}; got {pool_type!r} (pooling that widens the '
                         f'features, such as catavgmax, does not fit the norm)')
    return SelectAdaptivePool2d(pool_type=f'fast{pool_type}' if pool_type else '', flatten=bool(pool_type))


# ---- compile caches, warmed in parallel ----------------------------------------------------------------------------
# On a fresh machine the first training step compiles every stage's Triton depthwise kernels and its block-tail graphs
# (forward and backward) one after the other: most of a minute for SLaK-T. Both land in on-disk caches (Triton's and
# Inductor's) that a later process reuses. warm_compile_caches starts one process per stage that runs that stage's
# training step (and its folded evaluation) at the run's shapes, so the compiles happen side by side, while the
# main process loads data, builds the model and computes the SNIP masks; the main process then finds them cached.
# Measured on one H100 (benchmarks/RESULTS.md, issue 18, session 9) it lost both ways: 62 s of warming before a cold
# first step that still took 9.5 s (in-process, session 6: 52 s), and 41 s with warm caches, where the main process
# alone needs ~8 s (every process re-traces its graphs even when the compiled code is cached). So main.py starts
# them only when asked (SLAK_WARM_CACHES=1). The size-agnostic kernels' warm-up (warm_size_agnostic_kernels,
# detection) is not waited for and stays on unless SLAK_WARM_CACHES=0: there it turned 51 of 89 cold compiles into
# cache loads.
WARM_CACHES: Union[str, bool] = _env_switch('SLAK_WARM_CACHES')


class CacheWarmer:
    """The processes started by :func:`warm_compile_caches`; :meth:`wait` joins them (their failures only cost time:
    whatever they did not compile, the main process compiles itself). Processes still running when the interpreter
    exits (the run failed before waiting) are stopped."""

    def __init__(self, processes: List[Tuple[int, subprocess.Popen, IO[str]]], start: float):
        self.processes, self.start = processes, start
        atexit.register(self.stop)

    def stop(self) -> None:
        for _, proc, _ in self.processes:
            if proc.poll() is None:
                proc.kill()

    def wait(self, timeout: float = 240.) -> Dict[str, object]:
        """Join the processes (those running past ``timeout`` seconds from their start are stopped) and print one
        line on what they did; returns it as a dict (processes, seconds, graphs, failed)."""
        reports, failed = [], []
        for stage, proc, log in self.processes:
            try:
                proc.wait(timeout=max(1., timeout - (time.time() - self.start)))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                failed.append(f'stage {stage}: still running after {timeout:.0f} s')
                continue
            log.seek(0)
            out = log.read()
            log.close()
            line = next((ln for ln in reversed(out.splitlines()) if ln.startswith('{')), None)
            if proc.returncode == 0 and line:
                reports.append(json.loads(line))
            else:
                tail = [ln for ln in out.splitlines() if ln.strip()][-1:] or [f'exit code {proc.returncode}']
                failed.append(f'stage {stage}: {tail[0][:200]}')
        summary = {'processes': len(self.processes), 'seconds': time.time() - self.start,
                   'graphs': sum(r.get('graphs', 0) for r in reports), 'failed': failed, 'reports': reports}
        print(f'compile caches: {len(self.processes)} processes warmed {summary["graphs"]} block-tail graphs and '
              f'their kernels in {summary["seconds"]:.1f} s'
              + (f'; failed (the training process compiles those itself): {"; ".join(failed)}' if failed else ''))
        return summary


def warm_compile_caches(model: nn.Module, spec: Dict[str, object], batch: int, input_size: int,
                        amp_dtype: Optional[torch.dtype], device: Union[str, torch.device] = 'cuda',
                        channels_last: bool = False, eval_batch: Optional[int] = None,
                        force: bool = False) -> Optional[CacheWarmer]:
    """Start one process per stage of ``model`` (a :class:`SLaK`) that compiles what that stage's first training step
    and folded evaluation need into the on-disk caches, or return None where that does not apply: not asked for
    (``SLAK_WARM_CACHES=1``; off by default, see the note above :data:`WARM_CACHES`), not CUDA, the compiled tail
    off, or not a SLaK model.

    ``spec`` = ``{'name': timm model name, 'kwargs': create_model keyword arguments}`` (JSON values), from which each
    process builds the same model; ``batch``/``input_size``/``amp_dtype``/``channels_last`` are the training step's,
    ``eval_batch`` the evaluation batch (None: no evaluation). ``force`` starts them on any device (tests).
    """
    device = torch.device(device)
    if not isinstance(model, SLaK) or not force and (WARM_CACHES is not True or device.type != 'cuda'
                                                     or not Block.COMPILE_TAIL):
        return None
    stages = len(model.stages)
    cpus = os.cpu_count() or 1
    jobs = [dict(spec, stage=stage, batch=batch, input_size=input_size, device=str(device),
                 amp_dtype=str(amp_dtype).replace('torch.', '') if amp_dtype is not None else None,
                 channels_last=channels_last, eval_batch=eval_batch, backend=TAIL_BACKEND,
                 compile_tail=Block.COMPILE_TAIL) for stage in range(stages)]
    return _start_warmers('_warm_stage', jobs, env_defaults={
        'TORCHINDUCTOR_COMPILE_THREADS': str(max(1, cpus // (stages + 1)))})


# First lines of every warm-up process: on Linux it asks the kernel for SIGTERM when the process that started it
# dies (PR_SET_PDEATHSIG = 1), so that a training run killed by a signal, an OOM or a scheduler's time limit (no
# atexit then) leaves no compile processes behind; and it exits at once if that process is already gone. (The signal
# follows the starting *thread*: the warmers are started from the thread that runs the model, the main one.)
_TIED_TO_PARENT = ('import ctypes, os, signal, sys\n'
                   'if sys.platform.startswith("linux"):\n'
                   '    try:\n'
                   '        ctypes.CDLL(None).prctl(1, int(signal.SIGTERM), 0, 0, 0)\n'
                   '    except (OSError, AttributeError):\n'
                   '        pass\n'
                   'if os.getppid() != int(sys.argv[2]):\n'
                   '    sys.exit(0)\n')


def _start_warmers(entry: str, jobs: List[Dict[str, object]], env: Optional[Dict[str, str]] = None,
                   env_defaults: Optional[Dict[str, str]] = None, module: str = 'SLaK') -> CacheWarmer:
    """One process per job running ``<module>.<entry>(job)`` (``SLaK`` unless a test says otherwise) in this file's
    folder (this folder first on PYTHONPATH, relative cache folders made absolute, ``SLAK_WARM_CACHES=0`` so that it
    starts none of its own), its output to a temporary file; ``env`` is set over the environment, ``env_defaults``
    only where it is unset. Each process ends with this one (:data:`_TIED_TO_PARENT`; :class:`CacheWarmer` also stops
    them at a normal exit)."""
    start = time.time()
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, **(env or {}), SLAK_WARM_CACHES='0', PYTHONPATH=os.pathsep.join(
        [here] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]))
    for name in ('TORCHINDUCTOR_CACHE_DIR', 'TRITON_CACHE_DIR'):  # the processes run in this file's folder
        if env.get(name):
            env[name] = os.path.abspath(env[name])
    for name, value in (env_defaults or {}).items():
        env.setdefault(name, value)
    code = _TIED_TO_PARENT + f'import json, {module}\n{module}.{entry}(json.loads(sys.argv[1]))\n'
    processes = []
    for i, job in enumerate(jobs):
        log = tempfile.TemporaryFile(mode='w+')  # (a pipe could fill up and stall the process)
        proc = subprocess.Popen([sys.executable, '-c', code, json.dumps(job), str(os.getpid())], cwd=here, env=env,
                                stdout=log, stderr=subprocess.STDOUT, text=True)
        processes.append((i, proc, log))
    return CacheWarmer(processes, start)


def fast_dwconv_layers(model: nn.Module, dtype: Optional[torch.dtype] = None,
                       device_type: str = 'cuda') -> List[Tuple[int, int, int, int]]:
    """(channels, kh, kw, stride) of every distinct depthwise layer of ``model`` (a :class:`SLaK`) that runs our
    Triton kernels, with the stride of its stage's maps relative to the input (4, 8, 16, 32); with ``dtype``, less
    those that inputs of that dtype on ``device_type`` send to cuDNN instead (fp32 small kernels:
    ``routes_to_cudnn``)."""
    fast = _load_fast_dwconv()
    if fast is None or not isinstance(model, SLaK):
        return []
    routes_to_cudnn = getattr(sys.modules[fast.__module__], 'routes_to_cudnn', None)
    layers = []
    for i, stage in enumerate(model.stages):
        for m in stage.modules():
            if isinstance(m, fast):
                layer = (m.weight.shape[0], *m.weight.shape[2:], 4 * 2 ** i)
                if dtype is not None and routes_to_cudnn is not None and routes_to_cudnn(dtype, device_type,
                                                                                           *layer[1:3]):
                    continue
                if layer not in layers:
                    layers.append(layer)
    return layers


# ---- our Triton kernels, compiled in parallel before the first step ----------------------------------------------
# On a fresh machine the first training step compiled our depthwise kernels one after another as it met them (each
# layer's forward, input and weight gradient at each stage: tens of versions, ~0.3-0.7 s each measured on an H100).
# precompile_step_kernels finds the step's launches without launching anything (meta tensors) and compiles them in a
# background thread with Triton's parallel compile while main.py loads data and computes the SNIP masks (which use
# plain convolutions). One process, so nothing is traced twice (unlike the per-stage helper processes above).
# On by default on CUDA ('auto'; SLAK_PRECOMPILE=0 turns it off): measured on an H100 (benchmarks/RESULTS.md, issue
# 18, session 10, profile_startup.py in one call) the first step came 58.6 s after launch on a fresh machine instead
# of 65.3 s, and with warm caches it costs nothing on the training path (0.9 s in the background thread).
PRECOMPILE: Union[str, bool] = _env_switch('SLAK_PRECOMPILE')


class _StartUpJob:
    """Work for the first training step done in a background thread (after ``after``, another such job, if given);
    :meth:`wait` joins it and prints one line. ``work()`` returns how many things it prepared (``result[COUNT]``);
    a failure only costs time: the first step then does the work itself."""

    NAME = COUNT = DONE = FAILED = BUSY = ''  # thread name, result key, the line's start, its failure note, timeout
    WAIT_S = 300.  # how long wait() waits by default

    def __init__(self, work, cuda_index: Optional[int] = None, after: Optional['_StartUpJob'] = None,
                 meanwhile=None):
        self.start, self.result = time.time(), {self.COUNT: 0, 'error': None}

        def run():
            try:
                if meanwhile is not None:  # what need not wait for ``after``
                    meanwhile()
                if after is not None:
                    after.thread.join()
                if cuda_index is not None:  # a new thread starts on GPU 0
                    torch.cuda.set_device(cuda_index)
                self.result[self.COUNT] = work()
            except Exception as e:  # noqa: BLE001 - reported by wait()
                self.result['error'] = f'{type(e).__name__}: {str(e)[:200]}'
            self.result['seconds'] = time.time() - self.start

        self.thread = threading.Thread(target=run, name=self.NAME, daemon=True)
        self.thread.start()

    def wait(self, timeout: Optional[float] = None) -> Dict[str, object]:
        timeout = self.WAIT_S if timeout is None else timeout
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.result['error'] = f'{self.BUSY} after {timeout:.0f} s'
        self.result.setdefault('seconds', time.time() - self.start)
        print(f'{self.DONE.format(self.result[self.COUNT])} ahead of the first step in {self.result["seconds"]:.1f} s'
              + (f' (failed, {self.FAILED}: {self.result["error"]})' if self.result['error'] else ''))
        return self.result


class KernelPrecompile(_StartUpJob):
    """The background compile started by :func:`precompile_step_kernels` (Triton compiles for the current device)."""

    NAME, COUNT, DONE = 'slak-precompile', 'kernels', 'Triton kernels: {} versions compiled'
    FAILED, BUSY = 'the first step compiles them', 'still compiling'

    def __init__(self, launches: list, workers: int, cuda_index: Optional[int] = None):
        kernels = sys.modules[_DWCONV_MODULE_NAME]._kernels
        super().__init__(lambda: kernels.precompile(launches, workers), cuda_index)


def _background_workers() -> int:
    """How many compiles the background kernel warm-ups run side by side: half the cores, 1 to 8."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def precompile_step_kernels(model: nn.Module, batch: int, input_size: int, dtype: torch.dtype,
                            device: Union[str, torch.device] = 'cuda', workers: Optional[int] = None,
                            force: bool = False) -> Optional[KernelPrecompile]:
    """Start compiling, in a background thread, the versions of our Triton kernels that a training step of ``model``
    (a :class:`SLaK`) launches at ``batch`` x ``input_size`` in ``dtype`` (the autocast dtype, else the model's):
    every depthwise layer's forward, input gradient and weight gradient at its stage's map size, every block's
    fused branch-BatchNorm kernels (forward and backward, :func:`fused_branch_bn_blocks`) and its input gradient's
    fan-in (:func:`fan_in_blocks`). Returns None where it does not apply: switched off (``SLAK_PRECOMPILE=0``), not
    CUDA, no layer on our kernels. The launches are found here, in the calling thread (a dry run that must not
    overlap real launches); only the compiles run in the background. ``force`` plans on any device (tests)."""
    device = torch.device(device)
    fast = sys.modules.get(_DWCONV_MODULE_NAME)
    kernels = getattr(fast, '_kernels', None)
    if kernels is None or not force and (device.type != 'cuda' or PRECOMPILE is False):
        return None
    launches = []
    for c, kh, kw, stride in fast_dwconv_layers(model, dtype, device.type):
        side = input_size // stride  # (the stem and the downsampling convs have no padding: floors)
        launches += kernels.layer_launches(batch, c, side, side, kh, kw, dtype)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == 'cuda' else None
    for c, nb, stride, world_size in fused_branch_bn_blocks(model):  # ([] without the fused kernels)
        side = input_size // stride
        launches += fast._bn_kernels.block_launches(kernels._LaunchCapture, batch, c, side, side, nb, dtype, sms,
                                                    world_size)
    for c, nb, stride in fan_in_blocks(model, dtype):
        side = input_size // stride
        launches += fast._bn_kernels.fan_in_launches(kernels._LaunchCapture, batch, c, side, side, nb, dtype)
    if not launches:
        return None
    cuda_index = None
    if device.type == 'cuda':
        cuda_index = device.index if device.index is not None else torch.cuda.current_device()
    return KernelPrecompile(launches, workers or _background_workers(), cuda_index)


def fan_in_blocks(model: nn.Module, dtype: torch.dtype) -> List[Tuple[int, int, int]]:
    """(channels, branches, stride) of every distinct block of ``model`` (a :class:`SLaK` in float32) whose input
    gradient a training step under autocast to ``dtype`` sums in one fused pass (``_FanOutCast`` with the shortcut:
    compiled tails on, 2+ branches, the fast module's ``FUSED_FAN_IN``); [] elsewhere."""
    fast = sys.modules.get(_DWCONV_MODULE_NAME)
    if (not isinstance(model, SLaK) or not Block.COMPILE_TAIL or not getattr(fast, 'FUSED_FAN_IN', False)
            or not model.training):
        return []
    autocast_dtype = None if dtype == torch.float32 else dtype
    found = []
    for i, stage in enumerate(model.stages):
        for block in stage:
            lk = block.large_kernel
            # (a block's input has its parameters' dtype: float32 unless the model was cast)
            if not isinstance(lk, ReparamLargeKernelConv) or not _shares_cast(
                    lk.branch_count(), block.pwconv1.weight.dtype, autocast_dtype):
                continue
            key = (block.pwconv1.in_features, lk.branch_count(), 4 * 2 ** i)
            if key not in found:
                found.append(key)
    return found


def fused_branch_bn_blocks(model: nn.Module) -> List[Tuple[int, int, int, int]]:
    """(channels, branches, stride, world size) of every distinct block of ``model`` (a :class:`SLaK`) whose branch
    BatchNorms a training step sums in the fused Triton kernels (``branch_bn_sum``: 2-3 branches on our conv whose
    BatchNorms its own rule ``_fusable_bn`` accepts, plain or host-sync-free SyncBatchNorms; world size > 1 for the
    latter under an initialised process group), with the stride of its stage's maps relative to the input; [] where
    the fused kernels are off or absent."""
    fast = sys.modules.get(_DWCONV_MODULE_NAME)
    conv_type = getattr(fast, 'DepthWiseConv2dImplicitGEMM', None)
    if conv_type is None or getattr(fast, '_bn_kernels', None) is None or not getattr(fast, 'FUSED_BRANCH_BN', False) \
            or not isinstance(model, SLaK):
        return []
    blocks = []
    for i, stage in enumerate(model.stages):
        for m in stage.modules():
            if not isinstance(m, ReparamLargeKernelConv) or hasattr(m, 'lkb_reparam') or hasattr(m, 'lkb_decomposed'):
                continue
            branches = list(m._branches().values())
            bns = [getattr(b, 'bn', None) for b in branches]
            synced = hasattr(bns[0], 'sum_of_branches')  # (utils.SyncBatchNormWithoutHostSync)
            if not 2 <= len(branches) <= 3 or not all(isinstance(b.conv, conv_type) for b in branches) or \
                    not all(bn is not None and fast._fusable_bn(bn, bns[0], synced) for bn in bns):
                continue
            world_size = 1
            if synced and torch.distributed.is_available() and torch.distributed.is_initialized():
                world_size = torch.distributed.get_world_size()
            block = (branches[0].conv.weight.shape[0], len(branches), 4 * 2 ** i, world_size)
            if block not in blocks:
                blocks.append(block)
    return blocks


# ---- the training step's compiled tail graphs, traced before the first step ------------------------------------------
# With warm caches the first training step still spent ~5 s (H100, benchmarks/RESULTS.md issue 18 session 10) with
# Dynamo tracing the training tail graphs again and importing Inductor, while SNIP's ~4 s before it were half spent
# waiting for the first batch; on a fresh machine the first step compiled those graphs (~45 s). warm_step_graphs
# runs one training step of a small copy (each stage's downsampling layer and first block, drop path off, zeros in)
# in a background thread after the kernel precompile, so the graphs are traced and compiled while main.py prepares
# the masks; the real step (or main.py's CUDA-graph capture) then finds them in the same process. Nothing of the
# model is touched (a copy, no random numbers drawn). On by default on CUDA since session 14 ('auto';
# SLAK_WARM_GRAPHS=0 turns it off): before, each process traced them in its first step or capture.
WARM_GRAPHS: Union[str, bool] = _env_switch('SLAK_WARM_GRAPHS')


class GraphWarmUp(_StartUpJob):
    """The background step started by :func:`warm_step_graphs` (``run_step``), after the kernel precompile ``after``
    (the step would otherwise compile the same kernels a second time). While the precompile runs, it imports the
    compiler that tracing needs (:func:`_import_tail_compiler`: Inductor, ~1-2 s on the H100 hosts)."""

    NAME, COUNT, DONE = 'slak-warm-graphs', 'graphs', 'Block tails: {} training graphs traced'
    FAILED, BUSY, WAIT_S = 'the first step traces them', 'still tracing', 600.

    def __init__(self, run_step, after: Optional[KernelPrecompile] = None, cuda_index: Optional[int] = None,
                 meanwhile=None):
        def work():
            before = len(_TAIL_STATE['keys'])
            run_step()
            return len(_TAIL_STATE['keys']) - before
        super().__init__(work, cuda_index, after, meanwhile=meanwhile or _import_tail_compiler)


def _import_tail_compiler() -> None:
    """Import the modules that compiling the block tails needs first (Inductor's, unless a test traces with
    another backend). Only time is at stake: whatever fails here is imported (or reported) by the step itself."""
    if TAIL_BACKEND != 'inductor':
        return
    try:
        import torch._inductor.compile_fx  # noqa: F401
    except Exception:  # noqa: BLE001
        pass


def step_graph_copy(model: nn.Module) -> nn.Module:
    """A small training copy of ``model`` (a :class:`SLaK`) whose step meets every training graph of the blocks'
    compiled tails: each stage's downsampling layer and first block, copied, with drop path off (the tail's
    per-sample factors are then ones: the same graph, no random draw). One block is enough: a stage's first block
    up-casts its half-precision shortcut to the float32 that its later blocks receive
    (``Block._promoted_shortcut``), so all blocks of a stage share one graph (4 for SLaK-T)."""
    layers = [copy.deepcopy(model.downsample_layers[0])]
    for i, stage in enumerate(model.stages):
        if i:
            layers.append(copy.deepcopy(model.downsample_layers[i]))
        block = copy.deepcopy(stage[0])
        block.drop_path = nn.Identity()
        layers.append(block)
    return nn.Sequential(*layers).train(model.training)


def warm_step_graphs(model: nn.Module, batch: int, input_size: int, amp_dtype: Optional[torch.dtype],
                     device: Union[str, torch.device] = 'cuda', channels_last: bool = False,
                     after: Optional[KernelPrecompile] = None, force: bool = False,
                     autocast_cache: bool = True) -> Optional[GraphWarmUp]:
    """Start, in a background thread (after ``after``, the kernel precompile, has finished), one forward and backward
    of :func:`step_graph_copy` at ``batch`` x ``input_size`` under autocast to ``amp_dtype`` (None: no autocast), so
    that the blocks' compiled tail graphs, forward and backward, are traced and compiled before the first step.
    ``autocast_cache`` must be the training step's autocast ``cache_enabled`` (False where ``main.py`` captures the
    step as CUDA graphs): Dynamo guards on it, and a graph traced under the other setting would be traced again.
    Returns None where it does not apply: switched off (``SLAK_WARM_GRAPHS=0``), not CUDA, the tails not compiled
    there, a model not a :class:`SLaK` or checkpointing its stages, or SyncBatchNorm (its collectives must not run in
    a second thread). ``force`` runs it on any device (tests)."""
    device = torch.device(device)
    if not force and (device.type != 'cuda' or WARM_GRAPHS is False):
        return None
    if not isinstance(model, SLaK) or model.grad_checkpointing or not Block.COMPILE_TAIL or \
            any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()):
        return None
    held = {'copy': step_graph_copy(model)}  # (let go by the step: nothing of it outlives the thread's work)

    def run_step():
        small = held.pop('copy')
        x = torch.zeros(batch, 3, input_size, input_size, device=device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None,
                            cache_enabled=autocast_cache):
            out = small(x)
        out.float().mean().backward()

    cuda_index = None
    if device.type == 'cuda':
        cuda_index = device.index if device.index is not None else torch.cuda.current_device()
    return GraphWarmUp(run_step, after, cuda_index)


TWIN_WARM_SIDES = range(320, 1345, 32)  # padded input sides of detection's multi-scale configs (480-800 x <= 1333)


def warm_size_agnostic_kernels(model: nn.Module, batch: int, dtype: torch.dtype,
                               device: Union[str, torch.device] = 'cuda', sides: Sequence[int] = TWIN_WARM_SIDES,
                               processes: Optional[int] = None, force: bool = False,
                               dry_run: bool = False) -> Optional[CacheWarmer]:
    """Compile, in background processes, every version of our size-agnostic Triton kernels (the twins) that
    ``model``'s depthwise layers can ask for at batch ``batch`` in ``dtype`` on inputs whose padded sides are in
    ``sides``, into Triton's on-disk cache; or return None where that does not apply (not CUDA, ``SLAK_WARM_CACHES=0``,
    the kernels not in twin mode (see :func:`prefer_size_agnostic_kernels`), no Triton layers, or a distributed rank
    other than a machine's first: ``LOCAL_RANK`` > 0, whose on-disk cache the first rank fills). The twins' versions
    depend on launch plans, not on sizes, so they can be compiled before the sizes come: the training process then
    loads what it needs instead of compiling it between iterations. Nobody waits for these processes; whatever they
    have not compiled yet, the training process compiles itself. ``force`` starts them on any device and
    ``dry_run`` has them plan and share out the maps without launching anything (tests)."""
    device = torch.device(device)
    kernels = getattr(sys.modules.get(_DWCONV_MODULE_NAME), '_kernels', None)
    if os.environ.get('LOCAL_RANK', '0') != '0':  # one process per machine warms the cache its ranks share
        return None
    if not force and (device.type != 'cuda' or WARM_CACHES is False or kernels is None
                      or kernels.SPECIALISED_SIZES != 0):
        return None
    layers = fast_dwconv_layers(model, dtype, device.type)
    if not layers:
        return None
    workers = processes or _background_workers()
    jobs = [dict(layers=layers, batch=batch, dtype=str(dtype).replace('torch.', ''), sides=list(sides),
                 device=str(device), worker=worker, workers=workers, dry_run=dry_run) for worker in range(workers)]
    return _start_warmers('_warm_twins', jobs, env={'SLAK_DWCONV_SPECIALISED_SIZES': '0'})


def _warm_twins(job: Dict[str, object]) -> None:
    """One process of :func:`warm_size_agnostic_kernels`: plans every layer's maps (``twin_warm_plan``, the same in
    every process), runs its share of them (forward, input and weight gradient) and prints a JSON line."""
    start = time.time()
    _load_fast_dwconv()
    kernels = sys.modules[_DWCONV_MODULE_NAME]._kernels
    dtype = getattr(torch, job['dtype'])
    device = torch.device(job['device'])
    todo = []
    for c, kh, kw, stride in job['layers']:
        lengths = sorted({side // stride for side in job['sides'] if side >= stride})
        todo += [(c, h, w, kh, kw) for h, w in kernels.twin_warm_plan(job['batch'], c, kh, kw, lengths, dtype)]
    mine = todo[job['worker']::job['workers']]
    for c, h, w, kh, kw in mine:
        if job.get('dry_run'):  # tests: plan and share out, launch nothing
            continue
        x = torch.randn(job['batch'], c, h, w, device=device, dtype=dtype)
        wt = torch.randn(c, 1, kh, kw, device=device, dtype=dtype)
        kernels.launch_forward(x, wt)
        kernels.launch_forward(x, wt.flip(2, 3).contiguous())
        kernels.launch_weight_grad(x, x, wt)
    if device.type == 'cuda':
        torch.cuda.synchronize()
    print(json.dumps({'worker': job['worker'], 'maps': len(mine), 'planned': len(todo), 'graphs': 0,
                      'seconds': round(time.time() - start, 1)}))


def stage_input(model: 'SLaK', stage: int, images: torch.Tensor) -> torch.Tensor:
    """What ``model.stages[stage]`` receives in a forward pass of ``images``, without running the earlier stages (a
    block keeps its input's shape, dtype and layout): the stem and the downsampling layers up to ``stage``."""
    x = images
    for i in range(stage + 1):
        x = model.downsample_layers[i](x)
    return x


def _warm_stage(job: Dict[str, object]) -> None:
    """One process of :func:`warm_compile_caches`: the training step of one stage (forward under autocast, backward)
    and, with ``eval_batch``, its folded evaluation forward; prints a JSON line (stage, tail graphs, seconds)."""
    import timm
    start = time.time()
    global TAIL_BACKEND
    TAIL_BACKEND = job['backend']
    Block.COMPILE_TAIL = job['compile_tail']
    device = torch.device(job['device'])
    amp = getattr(torch, job['amp_dtype']) if job['amp_dtype'] else None
    torch.manual_seed(0)
    model = timm.create_model(job['name'], **job['kwargs']).to(device).train()
    stage = int(job['stage'])
    memory_format = torch.channels_last if job['channels_last'] else torch.contiguous_format
    if job['channels_last']:
        model = model.to(memory_format=memory_format)
    autocast = dict(device_type=device.type, dtype=amp or torch.float32, enabled=amp is not None)

    def images(batch: int) -> torch.Tensor:
        size = job['input_size']
        return torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=memory_format)
    with torch.autocast(**autocast):
        y = model.stages[stage](stage_input(model, stage, images(job['batch'])))
    y.float().sum().backward()
    if job.get('eval_batch'):
        folded = model.eval().reparameterize(decomposed=True).requires_grad_(False)
        with torch.no_grad(), torch.autocast(**autocast):
            folded.stages[stage](stage_input(folded, stage, images(job['eval_batch'])))
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    print(json.dumps({'stage': stage, 'graphs': len(_TAIL_STATE['keys']), 'seconds': time.time() - start}),
          flush=True)


# ---- checkpoints ----------------------------------------------------------------------------------------------------
# Every checkpoint the project reads (--resume, auto-resume, --finetune, main_KD.py's teacher, erf/ --weights, the
# segmentation/detection backbones) goes through load_checkpoint_file.
CHECKPOINT_CONVERTER = 'tools/convert_checkpoint.py'
_URL_SCHEMES = ('http', 'https', 'file')


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, unreadable, not a checkpoint, or refused because unpickling it needs
    more than tensors and plain values. A ``ValueError``, so the scripts print it as one ``error:`` line."""


def _cause(error: BaseException) -> str:
    """One short line of ``error``: the line of torch's multi-line messages that says what went wrong."""
    lines = [line.strip() for line in str(error).splitlines()
             if line.strip() and not line.strip().startswith('Check the documentation')]
    if not lines:
        return type(error).__name__
    if isinstance(error, pickle.UnpicklingError):  # weights_only refusals end with the offending opcode or global
        return lines[-1][:200]
    return f'{type(error).__name__}: {lines[0].split(". ")[0][:200]}'


def _download(url: str) -> str:
    """Fetch ``url`` once into torch.hub's checkpoint folder, as ``torch.hub.load_state_dict_from_url`` does; a
    ``name-<sha256 prefix>.pth`` file name is checked against its hash (prefixes of 8+ hex digits, as torch.hub's
    own files, so ``checkpoint-0.pth`` is not taken for a hash). Returns the local path."""
    name = os.path.basename(urllib.parse.urlparse(url).path)
    if not name:
        raise CheckpointError(f'{url} names no file')
    folder = os.path.join(torch.hub.get_dir(), 'checkpoints')
    local = os.path.join(folder, name)
    if not os.path.isfile(local):
        match = torch.hub.HASH_REGEX.search(name)
        hash_prefix = match.group(1) if match and len(match.group(1)) >= 8 else None
        try:
            os.makedirs(folder, exist_ok=True)
            torch.hub.download_url_to_file(url, local, hash_prefix, progress=True)
        except (OSError, RuntimeError) as e:  # URL/HTTP errors are OSErrors, a hash mismatch is a RuntimeError
            raise CheckpointError(f'cannot download {url}: {_cause(e)}') from None
    return local


def _load_failure(path: str, error: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` failed on ``path``, in one line: refused objects (and how to convert the
    file if it is trusted), text instead of a checkpoint, or a truncated / corrupted file."""
    if isinstance(error, OSError):  # the file itself cannot be read (permissions, I/O error)
        return f'cannot read {path} ({error.strerror or error})'
    root, ext = os.path.splitext(path)
    convert = f'python {CHECKPOINT_CONVERTER} {path} {root}-converted{ext or ".pth"}'
    with open(path, 'rb') as f:
        head = f.read(256)
    try:
        text = head.decode('utf-8')
    except UnicodeDecodeError:
        text = ''
    if text.strip() and all(c.isprintable() or c.isspace() for c in text):
        return (f'{path} is a text file, not a checkpoint (it begins {text.strip()[:40]!r}); was a web page saved '
                f'instead of the file?')
    refused = isinstance(error, pickle.UnpicklingError)
    if refused and zipfile.is_zipfile(path):  # torch.save's format: name what the pickle inside asks for
        try:
            needs = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001 - a corrupted pickle cannot be scanned either
            needs = []
        if needs:
            return (f'{path} was refused: it pickles {", ".join(needs)}, and unpickling more than tensors and plain '
                    f'values could run code. If you trust the file, convert it once: {convert}')
    elif refused:
        return (f'{path} is not a checkpoint that loads safely ({_cause(error)}); if it is a trusted checkpoint of an '
                f'old PyTorch (before 1.6), convert it once: {convert}')
    return f'{path} is not a readable PyTorch checkpoint (truncated, corrupted or another format; {_cause(error)})'


def load_checkpoint_file(path: str) -> dict:
    """The dict in a checkpoint file (or an http(s):// or file:// URL), read on CPU with ``weights_only=True``.

    Nothing in the file can run code: only tensors and plain Python values are unpickled. (The original unpickled
    everything, so a crafted .pth ran code when loaded.) A checkpoint that needs more, such as the original's, which
    pickled an ``argparse.Namespace`` under ``args``, is refused with the command that converts a trusted one
    (``tools/convert_checkpoint.py``). Raises :class:`CheckpointError` naming the file for every problem.
    """
    scheme = path.split('://', 1)[0].lower() if '://' in path else ''
    if scheme and scheme not in _URL_SCHEMES:
        raise CheckpointError(f'{path}: only local files and http(s):// or file:// URLs are read; download it and '
                              f'pass the local file')
    local = _download(path) if scheme else path
    if not os.path.isfile(local):
        raise CheckpointError(f'checkpoint not found: {local}')
    try:
        with warnings.catch_warnings():  # a plain pickle would add torch's multi-line protocol warning to our error
            warnings.filterwarnings('ignore', message='Detected pickle protocol')
            checkpoint = torch.load(local, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001 - what torch fails on (refusal, truncation, bit flips, text) is the file's
        raise CheckpointError(_load_failure(local, e)) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f'{local} holds a {type(checkpoint).__name__}, not a checkpoint (a dict holding a state '
                              f'dict)')
    return checkpoint


def _strip_prefix(state_dict: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def extract_state_dict(checkpoint, keys: Sequence[str] = ('model', 'module', 'state_dict', 'model_ema'),
                       source: str = 'checkpoint', strip_prefixes: bool = True) -> dict:
    """The model state dict inside a checkpoint: the first of ``keys`` present, else the dict itself.

    Leading ``module.`` (DDP) and ``backbone.`` prefixes are stripped (unless ``strip_prefixes`` is False). Anything
    but a non-empty dict of tensors raises :class:`CheckpointError` naming ``source``.
    """
    sd = checkpoint
    if isinstance(checkpoint, dict):
        for key in keys:
            if key in checkpoint and isinstance(checkpoint[key], dict):
                sd = checkpoint[key]
                break
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        held = sorted(map(str, checkpoint))[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(f'{source} holds no state dict (a dict of tensors; looked for the keys {list(keys)}, '
                              f'found {held})')
    if not strip_prefixes:
        return sd
    sd = _strip_prefix(sd, 'module.')
    return _strip_prefix(sd, 'backbone.')


def load_checkpoint(model: nn.Module, checkpoint, strict: bool = True,
                    keys: Sequence[str] = ('model', 'module', 'state_dict', 'model_ema'),
                    ignore: Sequence[str] = (), source: Optional[str] = None) -> Tuple[List[str], List[str]]:
    """Load a checkpoint (path, URL or dict) into ``model`` and report, by name, what does not match.

    A path is read by :func:`load_checkpoint_file` (``weights_only=True``). With ``strict`` a missing key, unexpected
    key or shape mismatch raises ``ValueError`` listing them (the usual cause: a checkpoint of another architecture,
    kernel list, width or ``Decom`` setting). Keys starting with an entry of ``ignore`` (e.g. ``'head.'`` when
    fine-tuning on other classes) are dropped first. ``source`` names a dict's file in messages. Returns
    (missing, unexpected).
    """
    if isinstance(checkpoint, str):
        source, checkpoint = checkpoint, load_checkpoint_file(checkpoint)
    source = source or 'checkpoint'
    sd = extract_state_dict(checkpoint, keys, source=source)
    sd = {k: v for k, v in sd.items() if not any(k.startswith(p) for p in ignore)}
    own = model.state_dict()
    mismatched = [f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}'
                  for k, v in sd.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in sd and not any(k.startswith(p) for p in ignore)]
    unexpected = [k for k in sd if k not in own]
    if strict and (missing or unexpected or mismatched):
        def show(xs):
            return ', '.join(xs[:8]) + (f' ... (+{len(xs) - 8} more)' if len(xs) > 8 else '')
        parts = []
        if missing:
            parts.append(f'missing keys ({len(missing)}): {show(missing)}')
        if unexpected:
            parts.append(f'unexpected keys ({len(unexpected)}): {show(unexpected)}')
        if mismatched:
            parts.append(f'shape mismatches ({len(mismatched)}): {show(mismatched)}')
        raise ValueError(f'{source} does not match the model ({type(model).__name__}); '
                         f'check --model, --kernel_size, --width_factor, --Decom and --bn. ' + '; '.join(parts))
    sd = {k: v for k, v in sd.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    model.load_state_dict(sd, strict=False)
    return missing, unexpected


# ---- timm registry ------------------------------------------------------------------------------------------------
# The KD scripts of the original pass args / flag / gru to students, and its convnext entry points in_22k; none of
# them configures the network, so they are dropped here.
_IGNORED_KWARGS = ('in_22k', 'args', 'flag', 'gru')


def _cfg(**kwargs) -> dict:
    """The original's evaluation setup (224 px, resize 256 + centre crop, bicubic, ImageNet mean/std). No weights are
    shipped (the original's were on Google Drive / SURFdrive)."""
    return dict(url='', num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
                interpolation='bicubic', mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                first_conv='downsample_layers.0.0', classifier='head', license='mit', paper_ids='arXiv:2207.03620',
                origin_url='https://github.com/VITA-Group/SLaK', **kwargs)


default_cfgs = generate_default_cfgs({name: _cfg() for name in ('SLaK_tiny', 'SLaK_small', 'SLaK_base', 'SLaK_large')})


def _checkpoint_filter_fn(state_dict: dict, model: SLaK) -> dict:
    """``pretrained_cfg_overlay=dict(state_dict=...)``: a whole checkpoint dict works too (its ``model`` entry)."""
    return extract_state_dict(state_dict)


def _create(variant: str, pretrained: bool, depths: List[int], dims: List[int], /, **kwargs) -> SLaK:
    if pretrained:
        overlay = dict(kwargs.get('pretrained_cfg_overlay') or {})
        cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
                                     pretrained_cfg_overlay=overlay)
        if overlay.get('file'):  # through SLaK.load_pretrained: timm's own file loader would prefer 'model_ema'
            kwargs['pretrained_cfg_overlay'] = dict(overlay, custom_load=overlay.get('custom_load', True))
        if not (cfg.has_weights or cfg.state_dict):
            raise ValueError(f'{variant} has no downloadable weights; give a local checkpoint (the original\'s or one '
                             f'of main.py\'s) with timm.create_model({variant!r}, pretrained=True, '
                             f'pretrained_cfg_overlay=dict(file=\'checkpoint.pth\'), ...) and the kernel_size, '
                             f'width_factor and Decom it was trained with')
    for key in _IGNORED_KWARGS:
        kwargs.pop(key, None)
    kwargs.setdefault('depths', depths)  # overridable (tests, small research variants)
    kwargs.setdefault('dims', dims)
    # SLaK's children are no single sequence (downsample_layers[i] and stages[i] take turns), so features_only wraps
    # forward_intermediates (timm's 'getter') rather than rewriting the module tree.
    return build_model_with_cfg(SLaK, variant, pretrained, pretrained_filter_fn=_checkpoint_filter_fn,
                                feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls='getter'), **kwargs)


@register_model
def SLaK_tiny(pretrained: bool = False, **kwargs) -> SLaK:
    return _create('SLaK_tiny', pretrained, [3, 3, 9, 3], [96, 192, 384, 768], **kwargs)


@register_model
def SLaK_small(pretrained: bool = False, **kwargs) -> SLaK:
    return _create('SLaK_small', pretrained, [3, 3, 27, 3], [96, 192, 384, 768], **kwargs)


@register_model
def SLaK_base(pretrained: bool = False, **kwargs) -> SLaK:
    return _create('SLaK_base', pretrained, [3, 3, 27, 3], [128, 256, 512, 1024], **kwargs)


@register_model
def SLaK_large(pretrained: bool = False, **kwargs) -> SLaK:
    return _create('SLaK_large', pretrained, [3, 3, 27, 3], [192, 384, 768, 1536], **kwargs)
