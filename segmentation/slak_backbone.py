"""The SLaK backbone for MMSegmentation 1.x and MMDetection 3.x: one implementation, registered by both frameworks.

This module needs only mmengine (not mmseg, not mmdet): ``segmentation/slak.py`` registers the class into
``mmseg.registry.MODELS`` and ``detection/slak.py`` into ``mmdet.registry.MODELS``.

The backbone *is* the classification model of ``SLaK.py`` (subclass, same parameter names
``downsample_layers.*`` / ``stages.*``), minus the classifier (``global_pool``, ``norm``, ``head``), plus one
channels_first LayerNorm ``norm{i}`` per returned stage, as the original downstream code. Feature maps come from
:meth:`SLaK.SLaK.forward_intermediates`, the project's one feature API.

Fixes relative to the original downstream ``slak.py``:

* ``LoRA`` is accepted as an alias of ``Decom`` (the original segmentation copy rejected the ``LoRA=True`` of its
  own 160k configs).
* ``sparse=True`` without a checkpoint warns and trains dense instead of crashing in ``forward``.
* A missing ``kernel_size`` warns (the original silently fell back to ``[31, 29, 27, 13, 3]``, which does not match
  the published 51x51 checkpoints).
* No debug printing of every bias.
* Checkpoints (paths and http(s)/file URLs) are read by ``SLaK.load_checkpoint_file`` with ``weights_only=True``: a
  file cannot run code when loaded (the original unpickled everything).
* How a sparse checkpoint keeps its sparsity (see :meth:`SLaK.keep_sparsity`): pruned weights get zero gradients
  instead of being re-masked before every forward.
"""
from __future__ import annotations

import os
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from mmengine.logging import print_log
from mmengine.model import BaseModule

import SLaK as slak_model

__all__ = ['SLaK', 'ORIGINAL_BACKBONE_KERNEL_SIZE']

# The original downstream backbone's default; it matches no published checkpoint (those use [51, 49, 47, 13, 5]).
ORIGINAL_BACKBONE_KERNEL_SIZE = (31, 29, 27, 13, 3)
_CLASSIFIER_PREFIXES = ('norm.', 'head.')


class SLaK(slak_model.SLaK, BaseModule):
    """SLaK backbone returning ``norm{i}(stage_i)`` for ``i`` in ``out_indices`` (NCHW, strides 4, 8, 16, 32).

    Args (the original downstream backbone's):
        in_chans, depths, dims, drop_path_rate, layer_scale_init_value, width_factor: as ``SLaK.SLaK``.
        num_classes, head_init_scale: accepted for config compatibility; unused (there is no classifier).
        kernel_size: 4 stage kernels + the small kernel. Defaults to the original backbone's
            ``[31, 29, 27, 13, 3]`` with a warning: set it to the kernel list of the checkpoint you load.
        Decom: decomposed (K x k + k x K) large kernels. ``LoRA`` is the same flag under the name the original
            detection code and configs use; give either (both only if equal).
        out_indices: which stages to return (each in 0..3).
        pretrained: deprecated path of a classification checkpoint, same as
            ``init_cfg=dict(type='Pretrained', checkpoint=pretrained)``.
        init_cfg: ``dict(type='Pretrained', checkpoint=path, checkpoint_key='model')`` loads a checkpoint written by
            ``main.py`` (``checkpoint_key='model_ema'`` takes the EMA weights), an mmengine ``state_dict``
            checkpoint or a raw state dict; ``module.``/``backbone.`` prefixes are stripped.
        sparse: the checkpoint is sparse; keep its zeros fixed while fine-tuning (see :meth:`keep_sparsity`).
    Extras: ``bn`` (BatchNorm after each depthwise branch, as ``SLaK.SLaK``), ``frozen_stages`` (freeze
    ``downsample_layers[0..k]`` and ``stages[0..k]``, kept in eval mode; -1 = none), ``conv_impl`` (see
    ``SLaK.get_conv2d``).

    BatchNorm layers are plain ``nn.BatchNorm2d``; the configs set ``sync_bn = 'torch'`` so MMEngine's runner converts
    them to SyncBatchNorm in distributed runs (the original hard-wired SyncBatchNorm).
    """

    def __init__(self, in_chans: int = 3, num_classes: int = 1000, depths: Sequence[int] = (3, 3, 9, 3),
                 dims: Sequence[int] = (96, 192, 384, 768), drop_path_rate: float = 0.,
                 layer_scale_init_value: float = 1e-6, head_init_scale: float = 1.,
                 kernel_size: Optional[Sequence[int]] = None, width_factor: float = 1.0, Decom: Optional[bool] = None,
                 LoRA: Optional[bool] = None, out_indices: Sequence[int] = (0, 1, 2, 3),
                 pretrained: Optional[str] = None, init_cfg: Optional[dict] = None, sparse: Optional[bool] = None,
                 bn: bool = True, frozen_stages: int = -1, conv_impl: Optional[str] = None):
        if Decom is not None and LoRA is not None and bool(Decom) != bool(LoRA):
            raise ValueError(f'backbone Decom={Decom!r} and LoRA={LoRA!r} disagree; LoRA is an alias of Decom, '
                             f'set only one of them')
        decom = Decom if Decom is not None else LoRA
        if kernel_size is None:
            kernel_size = ORIGINAL_BACKBONE_KERNEL_SIZE
            warnings.warn(f'SLaK backbone: kernel_size not given, using the original backbone default '
                          f'{list(ORIGINAL_BACKBONE_KERNEL_SIZE)}; the published SLaK checkpoints use '
                          f'[51, 49, 47, 13, 5]: set model.backbone.kernel_size to match your checkpoint')
        out_indices = list(out_indices)
        if not out_indices or any(i not in (0, 1, 2, 3) for i in out_indices) or len(set(out_indices)) != len(
                out_indices):
            raise ValueError(f'backbone out_indices must be distinct stage indices in 0..3; got {out_indices}')
        if not -1 <= frozen_stages <= 3:
            raise ValueError(f'backbone frozen_stages must be in -1..3; got {frozen_stages}')
        if pretrained is not None:
            if init_cfg is not None:
                raise ValueError('backbone pretrained and init_cfg are both set; use only '
                                 'init_cfg=dict(type="Pretrained", checkpoint=...)')
            warnings.warn('backbone pretrained=... is deprecated; use init_cfg=dict(type="Pretrained", checkpoint=...)')
            init_cfg = dict(type='Pretrained', checkpoint=pretrained)
        if init_cfg is not None and (init_cfg.get('type') != 'Pretrained' or not init_cfg.get('checkpoint')):
            raise ValueError(f'backbone init_cfg must be dict(type="Pretrained", checkpoint=path[, '
                             f'checkpoint_key="model"|"model_ema"]); got {init_cfg!r}')
        super().__init__(in_chans=in_chans, num_classes=num_classes, depths=depths, dims=dims,
                         drop_path_rate=drop_path_rate, layer_scale_init_value=layer_scale_init_value,
                         head_init_scale=head_init_scale, kernel_size=kernel_size, width_factor=width_factor,
                         Decom=decom, bn=bn, conv_impl=conv_impl)
        self.init_cfg = dict(init_cfg) if init_cfg is not None else None
        del self.global_pool, self.norm, self.head
        self.out_indices = sorted(out_indices)
        for i in self.out_indices:
            self.add_module(f'norm{i}', slak_model.LayerNorm(self.dims[i], eps=1e-6, data_format='channels_first'))
        self.frozen_stages = frozen_stages
        self.sparse = bool(sparse)
        self._masks: Dict[str, torch.Tensor] = {}
        self._mask_hooks: List[torch.utils.hooks.RemovableHandle] = []
        if self.sparse and self.init_cfg is None:
            warnings.warn('SLaK backbone: sparse=True but no checkpoint in init_cfg; there is no sparsity pattern to '
                          'keep, so the backbone trains dense')
        self._freeze_stages()

    def init_weights(self) -> None:
        """Load ``init_cfg``'s checkpoint (weights are already initialised at construction, as the original)."""
        if self.init_cfg is not None:
            self.load_classification_checkpoint(self.init_cfg['checkpoint'],
                                                self.init_cfg.get('checkpoint_key', 'model'))
        self._is_init = True

    def load_classification_checkpoint(self, checkpoint, checkpoint_key: str = 'model') -> Tuple[List[str], List[str]]:
        """Load a classification checkpoint (path, http(s)/file URL or dict) into the backbone; returns (missing,
        unexpected). Paths and URLs are read by ``SLaK.load_checkpoint_file`` (``weights_only=True``: a file that needs
        more is refused with the command that converts a trusted one).

        The classifier's ``norm.*``/``head.*`` are dropped and ``norm0..3`` stay at their init (ones/zeros), as in
        the original; any other missing or unexpected key, or any shape mismatch, raises ``ValueError`` naming it
        (the usual cause: a different ``kernel_size``, ``width_factor``, ``depths`` or ``Decom``). With
        ``sparse=True`` the checkpoint's zeros are kept fixed afterwards.
        """
        if checkpoint_key not in ('model', 'model_ema'):
            raise ValueError(f'backbone init_cfg checkpoint_key must be "model" or "model_ema"; got {checkpoint_key!r}')
        source = checkpoint if isinstance(checkpoint, str) else 'checkpoint'
        if isinstance(checkpoint, str):
            if '://' not in checkpoint and not os.path.isfile(checkpoint):
                raise ValueError(f'backbone init_cfg checkpoint file not found: {checkpoint!r}; set it with '
                                 f'--cfg-options model.backbone.init_cfg.checkpoint=/path/to/checkpoint.pth')
            checkpoint = slak_model.load_checkpoint_file(checkpoint)
        if isinstance(checkpoint, dict) and checkpoint_key == 'model_ema' and 'model_ema' not in checkpoint:
            raise ValueError(f'{source} has no "model_ema" entry (keys: {sorted(checkpoint)}); '
                             f'use checkpoint_key="model"')
        sd = slak_model.extract_state_dict(checkpoint, (checkpoint_key, 'state_dict', 'module'), source=source)
        if any(k.startswith('backbone.') for k in sd):  # a whole segmentor/detector: take its backbone
            sd = {k[len('backbone.'):]: v for k, v in sd.items() if k.startswith('backbone.')}
        own = self.state_dict()
        mismatched = [f'{k}: checkpoint {tuple(v.shape)} vs backbone {tuple(own[k].shape)}'
                      for k, v in sd.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
        missing = [k for k in own if k not in sd]
        unexpected = [k for k in sd if k not in own]
        bad_missing = [k for k in missing if not k.startswith(tuple(f'norm{i}.' for i in range(4)))]
        bad_unexpected = [k for k in unexpected if not k.startswith(_CLASSIFIER_PREFIXES)]
        if mismatched or bad_missing or bad_unexpected:
            parts = [f'{name} ({len(keys)}): {", ".join(keys[:6])}' + (' ...' if len(keys) > 6 else '')
                     for name, keys in (('shape mismatches', mismatched), ('missing keys', bad_missing),
                                        ('unexpected keys', bad_unexpected)) if keys]
            raise ValueError(f'{source} does not match the SLaK backbone; check model.backbone kernel_size, '
                             f'width_factor, depths, dims and Decom/LoRA against the checkpoint. ' + '; '.join(parts))
        self.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
        print_log(f'SLaK backbone: loaded {len(own) - len(missing)} tensors from {source}; newly initialised: '
                  f'{missing}; ignored classifier keys: {unexpected}', logger='current')
        if self.sparse:
            self.keep_sparsity()
        return missing, unexpected

    def keep_sparsity(self) -> None:
        """Keep the current zeros of every 2-D/4-D weight at exactly zero for the rest of training.

        The original re-multiplied the weights by their masks before every forward. Here each masked weight gets a
        gradient hook that zeroes the gradient at pruned positions, which keeps them at exactly zero under the
        optimizers the configs use, with no per-forward cost: the gradient there is 0, so Adam/AdamW moments stay 0
        and the Adam step is 0; AdamW's decoupled weight decay multiplies the weight (0) by (1 - lr * wd); SGD's
        momentum and coupled L2 term (wd * 0) are 0 too. Gradient clipping and loss scaling preserve zeros, and DDP
        all-reduces zeros to zeros. Fully dense tensors and frozen ones (``frozen_stages``: no gradient, never
        updated) get no hook. Calling it again (another checkpoint) replaces the previous hooks.
        """
        for handle in self._mask_hooks:
            handle.remove()
        self._mask_hooks, self._masks = [], {}
        total, nonzero = 0, 0
        for name, param in self.named_parameters():
            if param.dim() not in (2, 4):
                continue
            mask = param.detach() != 0
            total += mask.numel()
            nonzero += int(mask.sum())
            if bool(mask.all()) or not param.requires_grad:
                continue
            self._masks[name] = mask
            self._mask_hooks.append(param.register_hook(self._make_grad_mask_hook(name)))
        print_log(f'SLaK backbone: sparse=True, keeping the zeros of {len(self._masks)} weight tensors fixed; '
                  f'density of 2-D/4-D weights {nonzero / max(total, 1):.4f}', logger='current')

    def _make_grad_mask_hook(self, name: str):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            mask = self._masks[name]
            if mask.device != grad.device:
                mask = self._masks[name] = mask.to(grad.device)
            return grad * mask
        return hook

    def _freeze_stages(self) -> None:
        for i in range(self.frozen_stages + 1):
            for module in (self.downsample_layers[i], self.stages[i]):
                module.eval()
                for param in module.parameters():
                    param.requires_grad = False

    def train(self, mode: bool = True) -> 'SLaK':
        """Switch mode; frozen stages stay in eval mode (their BatchNorm statistics are frozen too)."""
        super().train(mode)
        self._freeze_stages()
        return self

    def _warm_twins_once(self, x: torch.Tensor) -> None:
        """At the first CUDA batch (training, or ``tools/test.py``'s evaluation), start compiling the size-agnostic
        versions of our Triton kernels in the background (``SLaK.warm_size_agnostic_kernels``: only where the
        kernels run in that mode, i.e. detection)."""
        if getattr(self, '_twins_warming', False) or not x.is_cuda:
            return
        self._twins_warming = True
        dtype = torch.get_autocast_dtype('cuda') if torch.is_autocast_enabled('cuda') else x.dtype
        self._twin_warmer = slak_model.warm_size_agnostic_kernels(self, x.shape[0], dtype, x.device)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        self._warm_twins_once(x)
        features = self.forward_intermediates(x, indices=self.out_indices, intermediates_only=True)
        return tuple(getattr(self, f'norm{i}')(f) for i, f in zip(self.out_indices, features))

    def forward_features(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """The original downstream name for :meth:`forward`."""
        return self.forward(x)
