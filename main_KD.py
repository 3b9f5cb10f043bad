"""Large-to-small kernel distillation: train a small-kernel student (``--model_s``) from a large-kernel teacher.

The ICML 2023 add-on of SLaK ("Are Large Kernels Better Teachers than Transformers for ConvNets?"). Everything that
is not distillation (data, augmentation, optimizer, schedules, AMP, EMA, sparse masks, checkpoints, logging,
distributed) is ``main.py``'s, reused as is; this file adds the teacher, the losses and the student wiring.

Distillation types (``--distill_type``): ``None`` (student alone), or ``KD`` / ``NKD`` (at most one logit
loss) combined with ``FD`` (feature distillation) and/or ``MGD`` (masked generative distillation), joined with ``+``
(``KD+FD``, ``NKD+MGD``) or concatenated as in the original (``KDFD``).

What differs from the original, on purpose:

* The SLaK student is built without the ``args``/``flag``/``gru`` keywords the released model rejected;
  ``--flag`` is accepted for command compatibility and has no effect.
* ``--distill_resume`` resumes only the student from the newest ``checkpoint-N.pth`` in ``--output_dir``; the teacher
  checkpoint (``--resume``) is never loaded into the student.
* NKD takes ``--nkd_temp`` / ``--nkd_alpha`` (defaults: the original's fixed 1.0 / 1.0); ``--T`` and ``--alpha`` stay
  KD-only as in the original, where the README's ``--T 3.0`` had no effect on NKD.
* FD and MGD work, in fp32 and AMP, for SLaK and timm CNN/Swin teachers/students: stage features come from one
  forward pass, a learned 1x1 projector maps student to teacher channels, and the projector / MGD generator are
  optimised and checkpointed. ``--target_Lnorm`` layer-normalises the teacher's FD targets (the original
  built these norms and never used them).
* The teacher is frozen, in eval mode, runs under ``torch.no_grad`` and is not wrapped in DDP.
* ``n_parameters`` is the student's; layer decay checks the student name; ``--sparse`` masks the student; ``--eval``
  evaluates student and teacher and exits; warnings are not silenced.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import re
import sys
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import SLaK
import main as main_train
import utils
from engine import evaluate
from optim_factory import SLAK_MODELS, get_parameter_groups

DISTILL_TOKENS = ('NKD', 'KD', 'FD', 'MGD')


# ---- losses ----------------------------------------------------------------------------------------------------------
def soft_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy against class indices (N,) or probability rows (N, C) such as mixup/cutmix targets."""
    if labels.ndim == 2:
        return torch.sum(-labels.float() * F.log_softmax(logits.float(), dim=1), dim=1).mean()
    return F.cross_entropy(logits.float(), labels)


def kd_loss_terms(preds: torch.Tensor, labels: torch.Tensor, teacher_preds: torch.Tensor, T: float,
                  hard: bool = False, alpha: float = 0.1) -> Dict[str, torch.Tensor]:
    """The two weighted parts of :func:`loss_kd` (``ce`` and ``kd``), for logging each one."""
    teacher_preds = teacher_preds.detach().float()
    preds = preds.float()
    if hard:
        return {'ce': 0.5 * soft_cross_entropy(preds, labels),
                'kd': 0.5 * F.cross_entropy(preds, teacher_preds.argmax(dim=1))}
    # log_target keeps the KL finite where the teacher's probability underflows to 0
    kl = F.kl_div(F.log_softmax(preds / T, dim=1), F.log_softmax(teacher_preds / T, dim=1), reduction='batchmean',
                  log_target=True)
    return {'ce': (1. - alpha) * soft_cross_entropy(preds, labels), 'kd': alpha * T * T * kl}


def loss_kd(preds: torch.Tensor, labels: torch.Tensor, teacher_preds: torch.Tensor, T: float, hard: bool = False,
            alpha: float = 0.1) -> torch.Tensor:
    """Hinton KD: ``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, labels)``.

    KL uses 'batchmean' (sum over classes, mean over samples); ``labels`` may be class indices or mixup
    probability rows. ``hard``: ``0.5 * CE(s, labels) + 0.5 * CE(s, argmax t)``. The teacher is detached.
    """
    return sum(kd_loss_terms(preds, labels, teacher_preds, T, hard=hard, alpha=alpha).values())


class NKDLoss(nn.Module):
    """NKD, "Rethinking Knowledge Distillation via Cross-Entropy" (Yang et al.), exactly as SLaK's ``engine_kd``.

    Per sample with label y (soft labels: y = argmax of the row), p = softmax(z),
    q = softmax((z - 1000 onehot(y)) / temp) and r = q / (1 - q[y]) (the non-target distribution):

    * target term ``-mean(p_T[y] * log p_S[y])``;
    * non-target term ``-alpha * temp^2 * mean(sum_c r_T[c] * log r_S[c])``, where at every class c with
      ``q_T[c] == q_T[y]`` (always y itself, plus exact ties) ``r_T[c] = 0`` and ``r_S[c] = 1``.

    ``log r_S`` is computed as a log-softmax over the non-target logits, which equals ``log(q_S / (1 - q_S[y]))``
    wherever that is finite but stays finite when a student probability underflows (the original then produced
    ``inf``/``nan``). The tie set is evaluated on ``q_T`` exactly as the original does. Teacher quantities are
    detached.
    """

    def __init__(self, temp: float = 1.0, alpha: float = 1.0):
        super().__init__()
        self.temp = temp
        self.alpha = alpha

    def terms(self, logit_s: torch.Tensor, logit_t: torch.Tensor, gt_label: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The target and non-target parts (``nkd_target``, ``nkd_non_target``), for logging each one."""
        logit_s = logit_s.float()
        logit_t = logit_t.detach().float()
        label = gt_label.argmax(dim=1, keepdim=True) if gt_label.ndim > 1 else gt_label.view(-1, 1)
        weight_t = F.softmax(logit_t, dim=1).gather(1, label)
        log_p_s = F.log_softmax(logit_s, dim=1).gather(1, label)
        target_term = -(weight_t * log_p_s).mean()

        is_target = torch.zeros_like(logit_s, dtype=torch.bool).scatter_(1, label, True)
        masked_t = (logit_t - 1000 * is_target) / self.temp
        masked_s = (logit_s - 1000 * is_target) / self.temp
        q_t = F.softmax(masked_t, dim=1)
        tie = q_t == q_t.gather(1, label)
        non_target_lse_t = torch.logsumexp(masked_t.masked_fill(is_target, float('-inf')), dim=1, keepdim=True)
        non_target_lse_s = torch.logsumexp(masked_s.masked_fill(is_target, float('-inf')), dim=1, keepdim=True)
        r_t = torch.where(tie, 0., torch.exp(masked_t - non_target_lse_t))
        log_r_s = torch.where(tie, 0., masked_s - non_target_lse_s)
        non_target_term = -self.alpha * self.temp ** 2 * (r_t * log_r_s).sum(dim=1).mean()
        return {'nkd_target': target_term, 'nkd_non_target': non_target_term}

    def forward(self, logit_s: torch.Tensor, logit_t: torch.Tensor, gt_label: torch.Tensor) -> torch.Tensor:
        return sum(self.terms(logit_s, logit_t, gt_label).values())


class MGDLoss(nn.Module):
    """Masked Generative Distillation (Yang et al., ECCV 2022), classification form, as the original.

    The student map is resized (bilinear) to the teacher's H x W if they differ, aligned by a 1x1 conv when the channel
    counts differ, multiplied by a random mask that zeroes each (sample, channel) with probability ``lambda_mgd``,
    then a generator (conv3x3 - ReLU - conv3x3) must reproduce the teacher map:
    ``loss = alpha_mgd * sum((generated - teacher)^2) / N``.
    """

    def __init__(self, student_channels: int, teacher_channels: int, alpha_mgd: float = 7e-5,
                 lambda_mgd: float = 0.5):
        super().__init__()
        self.alpha_mgd = alpha_mgd
        self.lambda_mgd = lambda_mgd
        self.align = (nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
                      if student_channels != teacher_channels else None)
        self.generation = nn.Sequential(
            nn.Conv2d(teacher_channels, teacher_channels, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(teacher_channels, teacher_channels, kernel_size=3, padding=1))

    def forward(self, preds_s: torch.Tensor, preds_t: torch.Tensor) -> torch.Tensor:
        preds_t = preds_t.detach()
        if preds_s.shape[-2:] != preds_t.shape[-2:]:
            preds_s = F.interpolate(preds_s, size=preds_t.shape[-2:], mode='bilinear', align_corners=False)
        if self.align is not None:
            preds_s = self.align(preds_s)
        n, c = preds_t.shape[:2]
        keep = (torch.rand(n, c, 1, 1, device=preds_s.device) >= self.lambda_mgd).to(preds_s.dtype)
        generated = self.generation(preds_s * keep)
        return self.alpha_mgd * (generated.float() - preds_t.float()).pow(2).sum() / n


class FeatureLoss(nn.Module):
    """Feature distillation over the last ``len(student_channels)`` stages (the original's "FD", made to work).

    Each student map is resized (bilinear) to the teacher's H x W if they differ and mapped to the teacher's channel
    count by a learned 1x1 conv (identity when the counts already match); the distance to the detached teacher map is
    SmoothL1 (beta 2.0) or MSE, mean-reduced, averaged over stages. ``target_layer_norm`` normalises each teacher
    map over (C, H, W) without affine parameters first (``--target_Lnorm``).
    """

    def __init__(self, student_channels: Sequence[int], teacher_channels: Sequence[int], loss_type: str = 'smoothL1',
                 target_layer_norm: bool = False):
        super().__init__()
        if loss_type not in ('smoothL1', 'MSE'):
            raise ValueError(f'--FDLoss_type must be smoothL1 or MSE; got {loss_type!r}')
        self.distance = nn.SmoothL1Loss(beta=2.0) if loss_type == 'smoothL1' else nn.MSELoss()
        self.target_layer_norm = target_layer_norm
        self.projector = nn.ModuleList(
            nn.Conv2d(cs, ct, kernel_size=1) if cs != ct else nn.Identity()
            for cs, ct in zip(student_channels, teacher_channels))

    def forward(self, feats_s: Sequence[torch.Tensor], feats_t: Sequence[torch.Tensor]) -> torch.Tensor:
        losses = []
        for proj, fs, ft in zip(self.projector, feats_s, feats_t):
            ft = ft.detach().float()
            if fs.shape[-2:] != ft.shape[-2:]:
                fs = F.interpolate(fs, size=ft.shape[-2:], mode='bilinear', align_corners=False)
            if self.target_layer_norm:
                ft = F.layer_norm(ft, ft.shape[1:])
            losses.append(self.distance(proj(fs).float(), ft))
        return torch.stack(losses).mean()


class DistillPlan(NamedTuple):
    """What ``--distill_type`` asks for: a logit loss (``'KD'``, ``'NKD'`` or None), FD and/or MGD."""
    logit: Optional[str]
    feature: bool
    mgd: bool

    @property
    def uses_teacher(self) -> bool:
        return self.logit is not None or self.feature or self.mgd


def parse_distill_type(distill_type: str) -> DistillPlan:
    """Parse ``--distill_type``: ``None`` or tokens from KD|NKD, FD, MGD joined by ``+``/``_`` or concatenated.

    The original tested substrings ("NKD" in type, else "KD" in type; "FD" in type), so ``KDFD`` and ``NKD_FD``
    keep working; unknown text, repeated tokens and KD together with NKD are refused instead of being half-read.
    """
    error = ValueError(f"--distill_type must be 'None' or a combination of one of KD/NKD with FD and/or MGD "
                       f"(joined by '+', e.g. KD, NKD, FD, MGD, KD+FD, NKD+MGD, KD+FD+MGD); got {distill_type!r}")
    if distill_type == 'None':
        return DistillPlan(None, False, False)
    if not re.fullmatch(r'(?:(?:NKD|KD|FD|MGD)[+_]?)+', distill_type or '') or distill_type[-1] in '+_':
        raise error
    tokens = re.findall(r'NKD|KD|FD|MGD', distill_type)
    logits = [t for t in tokens if t in ('KD', 'NKD')]
    if len(set(tokens)) != len(tokens) or len(logits) > 1:
        raise error
    return DistillPlan(logits[0] if logits else None, 'FD' in tokens, 'MGD' in tokens)


class DistillHeads(nn.Module):
    """The trainable parts of FD and MGD, kept apart from the student so its checkpoints stay a plain student.

    Returns weighted loss terms: ``feature`` (``lr_fd * FD``) and/or ``mgd``. Optimised with the student (own param
    groups, no layer decay) and saved under the checkpoint key ``distill_heads``.
    """

    def __init__(self, plan: DistillPlan, student_channels: Sequence[int], teacher_channels: Sequence[int],
                 args) -> None:
        super().__init__()
        self.lr_fd = args.lr_fd
        self.fd = (FeatureLoss(student_channels, teacher_channels, args.FDLoss_type, args.target_Lnorm)
                   if plan.feature else None)
        self.mgd = (MGDLoss(student_channels[-1], teacher_channels[-1], args.alpha_mgd, args.lambda_mgd)
                    if plan.mgd else None)

    def forward(self, feats_s: Sequence[torch.Tensor], feats_t: Sequence[torch.Tensor]) -> Dict[str, torch.Tensor]:
        terms = {}
        if self.fd is not None:
            terms['feature'] = self.lr_fd * self.fd(feats_s, feats_t)
        if self.mgd is not None:
            terms['mgd'] = self.mgd(feats_s[-1], feats_t[-1])
        return terms


class StageOutputs:
    """Records the outputs of a model's last ``n`` stages while it runs its ordinary forward (inside ``recording``).

    Why hooks rather than ``forward_intermediates``: the student must be called through its DDP wrapper (DDP only
    synchronises gradients of work done inside its forward), and one pass then yields logits and features for SLaK
    and timm models alike. Stages come from ``model.feature_info``; for an ``nn.Sequential`` stage the hook sits on
    its last child, because gradient checkpointing may run the children without calling the stage itself.
    """

    def __init__(self, model: nn.Module, n: int, flag: str):
        self.flag = f'{flag} {type(model).__name__}'
        self.channels_last_output = getattr(model, 'output_fmt', 'NCHW') == 'NHWC'  # timm Swin-style stages
        info = list(getattr(model, 'feature_info', None) or [])
        if not info:
            raise ValueError(f'{flag} {type(model).__name__} exposes no feature_info, so its stage features cannot be '
                             f'distilled; use a SLaK or timm CNN, or a --distill_type without FD/MGD')
        if not 1 <= n <= min(4, len(info)):
            raise ValueError(f'--feature_n must be between 1 and {min(4, len(info))}; got {n}')
        modules = dict(model.named_modules())
        self.channels = [int(entry['num_chs']) for entry in info[-n:]]
        self.outputs: List[Optional[torch.Tensor]] = [None] * n
        self.active = False
        for i, entry in enumerate(info[-n:]):
            module = modules[entry['module']]
            if isinstance(module, nn.Sequential) and len(module) > 0:
                module = module[-1]
            module.register_forward_hook(self._recorder(i))

    def _recorder(self, i: int):
        def hook(module, inputs, output):
            if self.active:
                self.outputs[i] = output
        return hook

    def recording(self) -> 'StageOutputs':
        self.outputs = [None] * len(self.outputs)
        return self

    def __enter__(self) -> 'StageOutputs':
        self.active = True
        return self

    def __exit__(self, *exc) -> None:
        self.active = False

    def take(self) -> List[torch.Tensor]:
        """The recorded maps as (N, C, H, W) (and forget them, so no activation outlives its step).

        NHWC stage outputs (timm Swin) are permuted; anything else that is not a C-channel map (e.g. ViT tokens)
        is refused, because the projector and the distances below would otherwise broadcast it into garbage.
        """
        outputs, self.outputs = self.outputs, [None] * len(self.outputs)
        if any(o is None for o in outputs):
            raise RuntimeError('a stage hook did not fire during the forward pass')
        maps = []
        for out, channels in zip(outputs, self.channels):
            if self.channels_last_output and out.ndim == 4:
                out = out.permute(0, 3, 1, 2)
            if out.ndim != 4 or out.shape[1] != channels:
                raise ValueError(f'{self.flag}: stage output of shape {tuple(out.shape)} is not a {channels}-channel '
                                 f'(N, C, H, W) map, so FD/MGD cannot use it; use a CNN or Swin model, or a '
                                 f'--distill_type without FD/MGD')
            maps.append(out)
        return maps


# ---- arguments -------------------------------------------------------------------------------------------------------
CONVNEXT_EMULATION_KERNELS = [7, 7, 7, 7, 100]


def get_args_parser() -> argparse.ArgumentParser:
    """``main.py``'s flags (same defaults; ``--model``, ``--kernel_size``, ``--width_factor``, ``--Decom``, ``--bn``
    and ``--resume`` describe the teacher) plus the original's distillation flags and a few new ones."""
    parser = argparse.ArgumentParser('SLaK large-to-small kernel distillation', parents=[main_train.get_args_parser()],
                                     add_help=False)
    parser.add_argument('--model_s', default='SLaK_small', type=str,
                        help='student: SLaK_* (built as a 7x7 ConvNeXt: kernels 7 7 7 7 100, no Decom) or any timm '
                             'model name (e.g. convnext_tiny, resnet50)')
    parser.add_argument('--width_factor_s', default=1.0, type=float,
                        help='width factor of a SLaK_* student (new; the original fixed 1.0)')
    parser.add_argument('--T', type=float, default=1.0, help='KD temperature (KD only)')
    parser.add_argument('--distill_type', default='KD', type=str,
                        help="None, KD or NKD, optionally with +FD and/or +MGD (e.g. KD+FD, NKD+MGD)")
    parser.add_argument('--FDLoss_type', default='smoothL1', choices=['smoothL1', 'MSE'], type=str,
                        help='feature distillation distance')
    parser.add_argument('--lr_fd', type=float, default=1.0, help='weight of the feature distillation loss')
    parser.add_argument('--alpha_mgd', type=float, default=7e-5, help='MGD loss weight')
    parser.add_argument('--alpha', type=float, default=0.1, help='KD soft-loss weight (KD only)')
    parser.add_argument('--lambda_mgd', type=float, default=0.5, help='MGD: probability of masking a channel')
    parser.add_argument('--nkd_temp', type=float, default=None, help='NKD temperature (default 1.0, the original)')
    parser.add_argument('--nkd_alpha', type=float, default=None, help='NKD non-target weight (default 1.0)')
    parser.add_argument('--hard', action='store_true', help='hard-label KD: 0.5 CE(labels) + 0.5 CE(teacher argmax)')
    parser.add_argument('--distill_resume', action='store_true',
                        help='resume the student from the newest checkpoint-N.pth in --output_dir')
    parser.add_argument('--feature_n', type=int, default=1, help='FD: number of last stages distilled')
    parser.add_argument('--target_Lnorm', action='store_true', help='FD: layer-normalise the teacher feature maps')
    parser.add_argument('--flag', action='store_true', help='accepted for command compatibility; no effect')
    return parser


# The distillation weights, temperatures and probabilities (main.FLAG_RANGES holds the others).
KD_FLAG_RANGES = {
    '--T': (main_train.POSITIVE, 'KD temperature'),
    '--nkd_temp': (main_train.POSITIVE, 'NKD temperature'),
    '--alpha': (main_train.PROBABILITY, 'KD soft-loss weight; the hard loss gets 1 - alpha'),
    '--nkd_alpha': (main_train.NON_NEGATIVE, 'NKD non-target weight'),
    '--lr_fd': (main_train.NON_NEGATIVE, 'feature-distillation loss weight'),
    '--alpha_mgd': (main_train.NON_NEGATIVE, 'MGD loss weight'),
    '--lambda_mgd': (main_train.PROBABILITY, 'MGD probability of masking a channel'),
}


def check_kd_args(args: argparse.Namespace) -> DistillPlan:
    """Validate the distillation flags (on top of ``main.check_args``); returns the parsed ``--distill_type``."""
    if args.eval and not (args.finetune or (args.distill_resume and args.output_dir
                                            and utils.latest_checkpoint(args.output_dir))):
        raise ValueError('--eval true has no student weights to evaluate (it would score a randomly initialised '
                         'student): pass --finetune STUDENT_CHECKPOINT, or --distill_resume with the --output_dir of '
                         'the run; to score the teacher alone run main.py --eval true --resume TEACHER_CHECKPOINT')
    main_train.check_args(args)
    if args.cuda_graph is True and not args.eval:
        raise ValueError('--cuda_graph true: main_KD.py takes eager steps (the student and the teacher run inside '
                         'the distillation loss, which is not captured); drop it')
    main_train.check_ranges(args, KD_FLAG_RANGES)
    plan = parse_distill_type(args.distill_type)
    if not timm.is_model(args.model_s):
        raise ValueError(f'--model_s {args.model_s!r} is not a registered model; use SLaK_tiny/SLaK_small/... or a '
                         f'timm model name such as convnext_tiny or resnet50')
    if args.layer_decay != 1.0 and args.model_s not in SLAK_MODELS:
        raise ValueError(f'--layer_decay is defined for SLaK students {list(SLAK_MODELS)}; got --model_s '
                         f'{args.model_s!r} (use --layer_decay 1.0)')
    if plan.uses_teacher and not args.resume:
        raise ValueError(f'--resume must give the teacher checkpoint for --distill_type {args.distill_type} '
                         f'(only --distill_type None trains without a teacher)')
    if args.finetune and not os.path.isfile(args.finetune):
        raise ValueError(f'--finetune must be a local checkpoint file for the student (distillation never downloads '
                         f'weights); not found: {args.finetune}')
    return plan


# ---- models ----------------------------------------------------------------------------------------------------------
def build_student(args: argparse.Namespace) -> nn.Module:
    """The student: a SLaK_* name gives the original's ConvNeXt emulation (kernels 7 7 7 7 100, no Decom, ``--bn``,
    width ``--width_factor_s``); other names are timm models. ``--finetune`` initialises it from a local file."""
    student_args = copy.copy(args)
    student_args.kernel_size = list(CONVNEXT_EMULATION_KERNELS)
    student_args.width_factor = args.width_factor_s
    student_args.Decom = False
    student = main_train.build_model(student_args, args.model_s)
    if args.finetune:
        main_train.load_finetune(args, student)
    return student


def classifier_weight_name(model: nn.Module) -> Optional[str]:
    """State-dict name of the classifier weight (``head.weight``, ``fc.weight``, ``head.fc.weight``...), if any."""
    classifier = model.get_classifier() if hasattr(model, 'get_classifier') else None
    for name, module in model.named_modules():
        if module is classifier and isinstance(getattr(module, 'weight', None), torch.Tensor):
            return f'{name}.weight'
    return None


def load_teacher(teacher: nn.Module, path: str, nb_classes: int) -> None:
    """Strictly load the teacher checkpoint (``model``, else ``module``/``state_dict``/``model_ema`` key), read with
    ``weights_only=True`` like every checkpoint (``SLaK.load_checkpoint_file``).

    A head for another number of classes is reported as such (teacher and student must predict the same classes).
    """
    if not os.path.isfile(path):
        raise ValueError(f'--resume: teacher checkpoint not found: {path}')
    state = SLaK.extract_state_dict(SLaK.load_checkpoint_file(path), source=f'--resume {path}')
    head = classifier_weight_name(teacher)
    if head is not None and head in state and state[head].shape[0] != nb_classes:
        raise ValueError(f'--resume {path}: the teacher head predicts {state[head].shape[0]} classes but the data set '
                         f'has {nb_classes}; distil on the classes the teacher was trained on')
    SLaK.load_checkpoint(teacher, state, strict=True, keys=(), source=f'--resume {path}')
    print(f'Loaded teacher {type(teacher).__name__} from {path}')


def build_teacher(args: argparse.Namespace, device: torch.device) -> nn.Module:
    """``--model`` with the SLaK flags, loaded from ``--resume``, frozen and in eval mode (never in DDP); a SLaK
    teacher runs folded (``--eval_folded``, the default: ``main.inference_model``), the same function in fewer
    passes (it is never trained or saved)."""
    teacher = main_train.build_model(args, args.model)
    load_teacher(teacher, args.resume, args.nb_classes)
    teacher.eval()
    teacher.requires_grad_(False)
    teacher.to(device)
    if args.channels_last:
        teacher.to(memory_format=torch.channels_last)
    return main_train.inference_model(args, teacher)


def make_compute_loss(plan: DistillPlan, args: argparse.Namespace, student: nn.Module, teacher: Optional[nn.Module],
                      criterion: nn.Module, heads: Optional[nn.Module], student_stages: Optional[StageOutputs],
                      teacher_stages: Optional[StageOutputs]) -> Callable:
    """``compute_loss(samples, targets) -> (loss, student_logits, terms)`` for ``engine.train_one_epoch``.

    Without KD/NKD the logit term is ``main.py``'s criterion (``ce``); KD gives ``ce`` + ``kd``, NKD ``nkd_target`` +
    ``nkd_non_target``; FD and MGD add ``feature`` / ``mgd``. The loss is the sum of the terms.
    """
    nkd = NKDLoss(temp=1.0 if args.nkd_temp is None else args.nkd_temp,
                  alpha=1.0 if args.nkd_alpha is None else args.nkd_alpha)
    features = plan.feature or plan.mgd

    def compute_loss(samples: torch.Tensor, targets: torch.Tensor):
        logits_t = None
        if plan.uses_teacher:
            with torch.no_grad(), (teacher_stages.recording() if features else contextlib.nullcontext()):
                logits_t = teacher(samples)
        with student_stages.recording() if features else contextlib.nullcontext():
            output = student(samples)
        if plan.logit == 'KD':
            terms = kd_loss_terms(output, targets, logits_t, args.T, hard=args.hard, alpha=args.alpha)
        elif plan.logit == 'NKD':
            terms = nkd.terms(output, logits_t, targets)
        else:
            terms = {'ce': criterion(output, targets)}
        if features:
            terms.update(heads(student_stages.take(), teacher_stages.take()))
        loss = sum(terms.values())
        return loss, output, {k: v.detach() for k, v in terms.items()}

    return compute_loss


def resume_student(args: argparse.Namespace, student, student_without_ddp, optimizer, loss_scaler, model_ema,
                   heads: Optional[nn.Module], saved_args: Optional[main_train.SavedArgs] = None) -> Optional[dict]:
    """``--distill_resume``: the newest ``checkpoint-N.pth`` of ``--output_dir``, never the teacher's ``--resume``.

    Returns the saved mask state (or None) and fills ``saved_args`` (if given) with the checkpoint's flags. Sets
    ``args.start_epoch`` and the best accuracies so far.
    """
    args.max_accuracy, args.max_accuracy_ema = 0.0, 0.0
    if not args.distill_resume:
        if args.output_dir and utils.latest_checkpoint(args.output_dir):
            print(f'warning: {args.output_dir} holds student checkpoints but --distill_resume is not set; the student '
                  f'starts from scratch and they will be overwritten')
        return None
    student_args = copy.copy(args)
    student_args.resume, student_args.auto_resume = '', True
    extra = {'args': saved_args} if saved_args is not None else {}
    if heads is not None:
        extra['distill_heads'] = heads
    try:
        mask_state = utils.auto_load_model(args=student_args, model=student, model_without_ddp=student_without_ddp,
                                           optimizer=optimizer, loss_scaler=loss_scaler, model_ema=model_ema,
                                           extra=extra)
    except ValueError as e:  # e.g. FD/MGD heads added or dropped: the optimizer's parameter groups no longer match
        raise ValueError(f'--distill_resume {e} (resume with the --model_s, --width_factor_s, --distill_type and '
                         f'--feature_n that wrote it)') from e
    if not student_args.resume:
        print(f'--distill_resume: no checkpoint-N.pth in {args.output_dir!r} yet; the student starts from scratch')
    args.student_resume = student_args.resume
    args.start_epoch = student_args.start_epoch
    args.max_accuracy, args.max_accuracy_ema = student_args.max_accuracy, student_args.max_accuracy_ema
    return mask_state


# ---- main ------------------------------------------------------------------------------------------------------------
def main(args: argparse.Namespace) -> Optional[dict]:
    """Distil (or ``--eval``); returns the last epoch's log dict (or the student's eval stats)."""
    plan = check_kd_args(args)
    device, amp_dtype = main_train.init_run(args)
    data = main_train.build_data(args)
    log_writer, wandb_logger = main_train.build_loggers(args)

    teacher = build_teacher(args, device) if plan.uses_teacher else None
    student = main_train.prepare_model(args, build_student(args), device)
    model_ema = main_train.build_ema(args, student)  # of the student, before the feature hooks: the copy has none

    heads = student_stages = teacher_stages = None
    if plan.feature or plan.mgd:
        n_stages = args.feature_n if plan.feature else 1
        student_stages = StageOutputs(student, n_stages, '--model_s')
        teacher_stages = StageOutputs(teacher, n_stages, '--model')
        heads = DistillHeads(plan, student_stages.channels, teacher_stages.channels, args).to(device)

    student_without_ddp = student
    n_parameters = sum(p.numel() for p in student.parameters() if p.requires_grad)
    main_train.save_run_text(args, 'model.txt', 'Student', str(student_without_ddp))
    if teacher is not None:
        print(f'number of params (teacher, frozen): {sum(p.numel() for p in teacher.parameters())}')
    if heads is not None:
        print(f'number of params (FD/MGD heads): {sum(p.numel() for p in heads.parameters())}')
    num_steps = main_train.steps_per_epoch(args, data)

    student = main_train.wrap_ddp(args, student, device)
    student_without_ddp = getattr(student, 'module', student)
    heads_ddp = heads
    if heads is not None and any(p.requires_grad for p in heads.parameters()):
        heads_ddp = main_train.wrap_ddp(args, heads, device)

    student_args = copy.copy(args)
    student_args.model = args.model_s  # layer decay follows the student (the original checked the teacher)
    optimizer, loss_scaler, lr_schedule_values, wd_schedule_values = main_train.build_training_objects(
        student_args, student_without_ddp, max(num_steps, 1))
    if heads is not None:
        for group in get_parameter_groups(heads, args.weight_decay):
            optimizer.add_param_group(group)
    criterion = main_train.build_criterion(args, data.mixup_fn)
    print(f'criterion = {criterion}, distillation = {plan}')

    saved_args = main_train.SavedArgs()
    mask_state = resume_student(args, student, student_without_ddp, optimizer, loss_scaler, model_ema, heads,
                                saved_args)
    main_train.check_resume(args, getattr(args, 'student_resume', ''), saved_args, mask_state)
    resumed_rng = utils.get_rng_state() if getattr(args, 'student_resume', '') else None

    eval_kwargs = dict(use_amp=args.use_amp, amp_dtype=amp_dtype, channels_last=args.channels_last)
    if data.data_loader_val is not None:
        if teacher is not None:
            teacher_stats = evaluate(data.data_loader_val, teacher, device, **eval_kwargs)
            print(f'Teacher accuracy on {len(data.dataset_val)} test images: {teacher_stats["acc1"]:.2f}%')
            if log_writer is not None:
                log_writer.update(teacher_acc1=teacher_stats['acc1'], head='perf', step=args.start_epoch)
        student_stats = evaluate(data.data_loader_val, main_train.inference_model(args, student), device,
                                 **eval_kwargs)
        print(f'Student accuracy on {len(data.dataset_val)} test images: {student_stats["acc1"]:.2f}%')
        if args.eval:  # main.check_args refused --eval with --disable_eval, so a validation set exists here
            return student_stats

    mask = main_train.build_mask(args, student, optimizer, data, num_steps, log_writer, mask_state, model_ema,
                                 getattr(args, 'student_resume', ''))
    main_train.print_model_size(student_without_ddp, n_parameters, args.input_size, sparse=mask is not None,
                                name='student')
    if resumed_rng is not None:  # mask set-up may draw random numbers; a resumed run continues the saved streams
        utils.set_rng_state(resumed_rng)
    if args.compile:
        student.compile()
        if teacher is not None:
            teacher.compile()

    compute_loss = make_compute_loss(plan, args, student, teacher, criterion, heads_ddp, student_stages,
                                     teacher_stages)
    return main_train.train_and_evaluate(
        args, student, student_without_ddp, data, criterion, optimizer, loss_scaler, lr_schedule_values,
        wd_schedule_values, num_steps, device, amp_dtype, model_ema, mask, log_writer, wandb_logger, n_parameters,
        compute_loss=compute_loss, extra={'distill_heads': heads} if heads is not None else None, name='student',
        clip_parameters=list(student.parameters()) + (list(heads.parameters()) if heads is not None else []),
        sync_modules=(heads_ddp,) if heads_ddp is not None else ())


def run(argv=None) -> int:
    """Command-line entry (``main.run``'s error handling: one ``error: ...`` line and exit code 2)."""
    parser = argparse.ArgumentParser('SLaK large-to-small kernel distillation', parents=[get_args_parser()])
    return main_train.run(argv, parser=parser, main_fn=main)


if __name__ == '__main__':
    sys.exit(run())
