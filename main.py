"""Train or evaluate SLaK (and ConvNeXt-style baselines) on ImageNet-style data, with optional dynamic sparsity.

Reads top to bottom in the order things happen: args -> distributed init -> data -> model -> EMA -> DDP ->
optimizer -> schedules -> resume -> (eval) -> sparse masks -> epoch loop. Every command of the original README runs
unchanged, with ``torchrun --nproc_per_node=N main.py ...``, ``python -m torch.distributed.launch ...``, Slurm, or a
single process on one GPU or the CPU (``--device cpu``).

Differences from the original ``main.py``, on purpose (each is noted where it happens):

* Masks, mask step, prune-rate schedule and RNG states are checkpointed, so ``--auto_resume`` continues a sparse run
  exactly (bit-identical on CPU); no ``--sparse_init resume`` needed (it still works).
* An explicit ``--resume`` wins over ``--auto_resume``; ``--auto_resume`` looks only in a non-empty ``--output_dir``.
* Single-process runs reshuffle every epoch (the original called ``set_epoch`` only when distributed).
* ``--dist_eval`` counts every validation image once (no padded duplicates).
* Periodic checkpoints are written after the epoch's evaluation, so they also carry the best accuracy so far. As in
  the original they are written every ``--save_ckpt_freq`` epochs and after the last one (no extra "last" file):
  pass ``--save_ckpt_freq 1`` to lose at most one epoch to a crash.
* New flags: ``--amp_dtype``, ``--channels_last``, ``--compile`` (``--compile_mode``), ``--cuda_graph``,
  ``--grad_checkpointing``, ``--sync_bn``, ``--conv_impl``, ``--dist_timeout``, ``--hflip``, ``--print_freq``,
  ``--eval_folded``, ``--gpu_pipeline`` (decode and augment on the device, ``datasets.GpuAugment``);
  ``--sparse_init`` also accepts ``snip_topk``.
* ``--eval true`` evaluates the raw weights of ``--resume``; to evaluate EMA weights pass the checkpoint as
  ``--finetune ckpt --model_key model_ema`` (the original's route; ``checkpoint-best-ema.pth`` keeps the raw model
  under ``model`` and the EMA under ``model_ema``).
* User errors (paths, model names, checkpoints of another architecture, NaN loss, out of memory, even kernels) end
  with one ``error: ...`` line and exit code 2 instead of a traceback. Checked before any work: a writable
  ``--output_dir``/``--log_dir``, ``--input_size`` of at least the model's stride, ``--eval`` with weights to
  evaluate, validation classes equal to the training classes; a ``--finetune`` checkpoint that gives the model no
  weight is refused (the original trained from scratch), and a full disk during a save names the file. Every rate,
  fraction and probability flag is checked against its range (``FLAG_RANGES``) before anything starts.
* Checkpoints are read with ``torch.load(weights_only=True)`` only (``SLaK.load_checkpoint_file``): no file can run
  code when loaded; ``tools/convert_checkpoint.py`` converts a trusted checkpoint of the original code.
* Resuming with another world size, ``--update_freq``, ``--epochs`` or ``--prune_rate`` rebuilds the prune-rate
  schedule for this run's steps, as the original did at every start, so it ends at its floor on the last step; a
  changed effective batch is said in one line; another ``--sparsity`` than the checkpoint's is refused.
* The console is for a person: the model and its parameter groups go to ``--output_dir`` (``model.txt``,
  ``param_groups.json``; ``--verbose`` prints them), the per-layer mask densities to ``sparsity.txt`` with one
  console line per prune/grow; sizes are printed in the paper's units (non-zero parameters, multiply-accumulates).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import inspect
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple, Union

import numpy as np
import torch
import torch.backends.cudnn as cudnn
import timm
from timm.data.mixup import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch.utils.flop_counter import FlopCounterMode

import SLaK  # noqa: F401  (registers SLaK_* in timm)
import utils
from datasets import (DATA_SETS, DeviceBatches, DeviceLoader, GpuAugment, build_dataset, check_same_classes,
                      collate_encoded, mean_std)
from engine import NonFiniteLossError, evaluate, train_one_epoch
from optim_factory import build_layer_decay_assigner, create_optimizer
from sparse_core import SNIP_INITS, SPARSE_INITS, CosineDecay, Masking, ModelEma, count_nonzero_params
from utils import NativeScalerWithGradNormCount as NativeScaler
from utils import str2bool

DEFAULT_DATA_PATH = '/datasets01/imagenet_full_size/061417/'
COMPILE_MODES = ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')  # torch.compile's


def get_args_parser() -> argparse.ArgumentParser:
    """Every flag of the original ``main.py`` (same spelling, type and default) plus the new ones listed above."""
    parser = argparse.ArgumentParser('SLaK training and evaluation script for image classification', add_help=False)
    parser.add_argument('--batch_size', default=64, type=int, help='Per GPU batch size')
    parser.add_argument('--epochs', default=300, type=int)
    parser.add_argument('--update_freq', default=1, type=int, help='gradient accumulation steps')

    # Model parameters
    parser.add_argument('--model', default='SLaK_tiny', type=str, metavar='MODEL', help='Name of model to train')
    parser.add_argument('--drop_path', type=float, default=0, metavar='PCT', help='Drop path rate (default: 0.0)')
    parser.add_argument('--input_size', default=224, type=int, help='image input size')
    parser.add_argument('--layer_scale_init_value', default=1e-6, type=float, help='Layer scale initial values')
    parser.add_argument('--channels_last', type=str2bool, default=False, help='channels_last memory format')
    parser.add_argument('--compile', type=str2bool, default=False, help='torch.compile the model (in place)')
    parser.add_argument('--compile_mode', type=str, default='default', choices=COMPILE_MODES,
                        help="torch.compile's mode with --compile: 'reduce-overhead' also replays the compiled "
                             'graphs as CUDA graphs (no per-kernel launch cost; not yet measured with SLaK)')
    parser.add_argument('--cuda_graph', type=auto_or_bool, default='auto',
                        help='replay the training forward and backward as CUDA graphs '
                             '(torch.cuda.make_graphed_callables): no per-kernel launch cost. auto (default): for SLaK '
                             'models trained by one CUDA process without --compile or --grad_checkpointing, falling '
                             'back to eager steps if the capture fails; true: also other models, and an error where '
                             'it cannot run; false: eager steps')
    parser.add_argument('--grad_checkpointing', type=str2bool, default=False,
                        help='recompute each block in backward (less memory, more time)')
    parser.add_argument('--sync_bn', type=str2bool, default=True,
                        help='convert BatchNorm to SyncBatchNorm in distributed CUDA runs')
    parser.add_argument('--conv_impl', type=str, default=None, choices=list(SLaK.CONV_IMPLS),
                        help='depthwise conv implementation (default: LARGE_KERNEL_CONV_IMPL env or auto)')

    # EMA related parameters
    parser.add_argument('--model_ema', type=str2bool, default=False)
    parser.add_argument('--model_ema_decay', type=float, default=0.9999, help='')
    parser.add_argument('--model_ema_force_cpu', type=str2bool, default=False, help='')
    parser.add_argument('--model_ema_eval', type=str2bool, default=False, help='Using ema to eval during training.')

    # Optimization parameters
    parser.add_argument('--opt', default='adamw', type=str, metavar='OPTIMIZER', help='Optimizer (default: "adamw"')
    parser.add_argument('--opt_eps', default=1e-8, type=float, metavar='EPSILON', help='Optimizer Epsilon')
    parser.add_argument('--opt_betas', default=None, type=float, nargs='+', metavar='BETA', help='Optimizer Betas')
    parser.add_argument('--clip_grad', type=float, default=None, metavar='NORM',
                        help='Clip gradient norm (default: None, no clipping)')
    parser.add_argument('--momentum', type=float, default=0.9, metavar='M', help='SGD momentum (default: 0.9)')
    parser.add_argument('--weight_decay', type=float, default=0.05, help='weight decay (default: 0.05)')
    parser.add_argument('--weight_decay_end', type=float, default=None,
                        help='Final value of the weight decay (cosine schedule; default: --weight_decay)')
    parser.add_argument('--lr', type=float, default=4e-3, metavar='LR', help='learning rate (default: 4e-3)')
    parser.add_argument('--layer_decay', type=float, default=1.0)
    parser.add_argument('--min_lr', type=float, default=1e-6, metavar='LR', help='lower lr bound (default: 1e-6)')
    parser.add_argument('--warmup_epochs', type=int, default=20, metavar='N', help='epochs to warmup LR')
    parser.add_argument('--warmup_steps', type=int, default=-1, metavar='N',
                        help='num of steps to warmup LR, will overload warmup_epochs if set > 0')

    # Augmentation parameters
    parser.add_argument('--color_jitter', type=float, default=0.4, metavar='PCT', help='Color jitter factor')
    parser.add_argument('--aa', type=str, default='rand-m9-mstd0.5-inc1', metavar='NAME',
                        help='AutoAugment policy, e.g. "rand-m9-mstd0.5-inc1"; "none" disables it')
    parser.add_argument('--hflip', type=float, default=0.5, help='horizontal flip probability (0 for digits/text)')
    parser.add_argument('--smoothing', type=float, default=0.1, help='Label smoothing (default: 0.1)')
    parser.add_argument('--train_interpolation', type=str, default='bicubic',
                        help='Training interpolation (random, bilinear, bicubic default: "bicubic")')

    # Evaluation parameters
    parser.add_argument('--crop_pct', type=float, default=None)

    # Random Erase params
    parser.add_argument('--reprob', type=float, default=0.25, metavar='PCT', help='Random erase prob (default: 0.25)')
    parser.add_argument('--remode', type=str, default='pixel', help='Random erase mode (default: "pixel")')
    parser.add_argument('--recount', type=int, default=1, help='Random erase count (default: 1)')
    parser.add_argument('--resplit', type=str2bool, default=False, help='Do not random erase first augmentation split')

    # Mixup params
    parser.add_argument('--mixup', type=float, default=0.8, help='mixup alpha, mixup enabled if > 0.')
    parser.add_argument('--cutmix', type=float, default=1.0, help='cutmix alpha, cutmix enabled if > 0.')
    parser.add_argument('--cutmix_minmax', type=float, nargs='+', default=None,
                        help='cutmix min/max ratio, overrides alpha and enables cutmix if set (default: None)')
    parser.add_argument('--mixup_prob', type=float, default=1.0,
                        help='Probability of performing mixup or cutmix when either/both is enabled')
    parser.add_argument('--mixup_switch_prob', type=float, default=0.5,
                        help='Probability of switching to cutmix when both mixup and cutmix enabled')
    parser.add_argument('--mixup_mode', type=str, default='batch',
                        help='How to apply mixup/cutmix params. Per "batch", "pair", or "elem"')

    # Finetuning params
    parser.add_argument('--finetune', default='', help='finetune from checkpoint')
    parser.add_argument('--head_init_scale', default=1.0, type=float, help='classifier head initial scale')
    parser.add_argument('--model_key', default='model|module', type=str,
                        help='which key to load from the --finetune checkpoint (model_ema for EMA weights)')
    parser.add_argument('--model_prefix', default='', type=str)

    # Dataset parameters
    parser.add_argument('--data_path', default=DEFAULT_DATA_PATH, type=str, help='dataset path')
    parser.add_argument('--eval_data_path', default=None, type=str, help='dataset path for evaluation')
    parser.add_argument('--nb_classes', default=1000, type=int, help='number of the classification types')
    parser.add_argument('--imagenet_default_mean_and_std', type=str2bool, default=True)
    parser.add_argument('--data_set', default='IMNET', choices=list(DATA_SETS), type=str,
                        help='IMNET (train/ and val/ under --data_path), image_folder, CIFAR, or synthetic (random '
                             'images for throughput and multi-GPU checks)')
    parser.add_argument('--synthetic_size', default=12800, type=int,
                        help='--data_set synthetic: training images (validation: a tenth)')
    parser.add_argument('--output_dir', default='', help='path where to save, empty for no saving')
    parser.add_argument('--log_dir', default=None, help='path where to tensorboard log')
    parser.add_argument('--device', default='cuda', help='device to use for training / testing')
    parser.add_argument('--gpu_pipeline', type=str2bool, default=False,
                        help='IMNET only: loader workers read file bytes; batches are decoded (nvJPEG) and augmented '
                             '(crop, flip, RandAugment, erasing) on --device, also a CPU one; for loader-bound runs. '
                             'Same distributions as timm, pixels within a few levels (datasets.GpuAugment lists the '
                             'differences); rand-* --aa policies only')
    parser.add_argument('--gpu_pipeline_cpu_share', type=float, default=0.0,
                        help='with --gpu_pipeline true: the share of images that the loader workers decode and '
                             'transform on the CPU (PIL and timm\'s transforms, as without --gpu_pipeline) while the '
                             'GPU decodes and augments the rest: both decoders at once, for runs bound by either '
                             '(default 0: all on the GPU)')
    parser.add_argument('--seed', default=0, type=int)

    parser.add_argument('--resume', default='', help='resume from checkpoint')
    parser.add_argument('--auto_resume', type=str2bool, default=True)
    parser.add_argument('--save_ckpt', type=str2bool, default=True)
    parser.add_argument('--save_ckpt_freq', default=10, type=int)
    parser.add_argument('--save_ckpt_num', default=3, type=int)

    parser.add_argument('--start_epoch', default=0, type=int, metavar='N', help='start epoch')
    parser.add_argument('--eval', type=str2bool, default=False, help='Perform evaluation only')
    parser.add_argument('--eval_folded', type=str2bool, default=True,
                        help='evaluate SLaK models folded (branches and BatchNorms merged into one or two kernels per '
                             'block, on a copy): same predictions, faster; false evaluates the training form')
    parser.add_argument('--dist_eval', type=str2bool, default=True, help='Enabling distributed evaluation')
    parser.add_argument('--disable_eval', type=str2bool, default=False,
                        help='Disabling evaluation during training')
    parser.add_argument('--num_workers', default=10, type=int)
    parser.add_argument('--print_freq', default=200, type=int,
                        help='micro-batches between progress lines (img/s, memory) during training')
    parser.add_argument('--pin_mem', type=str2bool, default=True,
                        help='Pin CPU memory in DataLoader for more efficient (sometimes) transfer to GPU.')

    # distributed training parameters
    parser.add_argument('--world_size', default=1, type=int, help='number of distributed processes')
    parser.add_argument('--local_rank', '--local-rank', dest='local_rank', default=-1, type=int)
    parser.add_argument('--dist_on_itp', type=str2bool, default=False)
    parser.add_argument('--dist_url', default='env://', help='url used to set up distributed training')
    parser.add_argument('--dist_timeout', default=float(os.environ.get('SLAK_DIST_TIMEOUT', 30)), type=float,
                        help='minutes a collective may wait before failing (env SLAK_DIST_TIMEOUT)')

    parser.add_argument('--tf32', type=str2bool, default=True,
                        help='CUDA: float32 matrix products and convolutions on TF32 tensor cores (what the original '
                             'ran with: PyTorch 1.10 allowed TF32 for both by default, 1.12+ turned it off for matrix '
                             'products, which makes fp32 runs several times slower on Ampere and Hopper); false: exact '
                             'fp32 everywhere, our depthwise kernels included')
    parser.add_argument('--use_amp', type=str2bool, default=False, help="Use PyTorch's AMP (automatic mixed precision)")
    parser.add_argument('--amp_dtype', default='float16', choices=['float16', 'bfloat16'],
                        help='autocast dtype with --use_amp true (bfloat16 needs no loss scaling)')

    # Weights and Biases arguments
    parser.add_argument('--enable_wandb', type=str2bool, default=False, help='enable logging to Weights and Biases')
    parser.add_argument('--project', default='SLaK', type=str, help='The name of the W&B project')
    parser.add_argument('--wandb_ckpt', type=str2bool, default=False,
                        help='Save model checkpoints as W&B Artifacts.')

    # SLaK architecture and sparse training
    parser.add_argument('--Decom', type=str2bool, default=False, help='Enabling kernel decomposition')
    parser.add_argument('--width_factor', type=float, default=1.0, help='set the width factor of the model')
    parser.add_argument('--sparse', action='store_true', help='Enable sparse model. Default: False.')
    parser.add_argument('--kernel_size', type=int, nargs='*', default=[51, 49, 47, 13, 5],
                        help='kernel size of conv layers (4 stages + the small kernel)')
    parser.add_argument('--growth', type=str, default='random',
                        help='Growth mode: random, gradient, momentum, momentum_neuron.')
    parser.add_argument('--prune', type=str, default='magnitude',
                        help='Pruning mode: magnitude or SET.')
    parser.add_argument('--redistribution', type=str, default='none',
                        help='Redistribution mode: none, momentum, magnitude, nonzero (accepted, not applied, '
                             'as in the original).')
    parser.add_argument('--prune_rate', type=float, default=0.3, help='The pruning rate / death rate.')
    parser.add_argument('--sparsity', type=float, default=0.4, help='The sparsity of the overall sparse network.')
    parser.add_argument('--verbose', type=str2bool, nargs='?', const=True, default=False,
                        help='also print the model, its parameter groups and the per-layer mask densities (they '
                             'always go to files in --output_dir); "--verbose" alone means true')
    parser.add_argument('--fix', action='store_true', help='static masks: no prune/grow (masks still applied)')
    parser.add_argument('--sparse_init', type=str, default='snip', help=f'sparse initialization: {SPARSE_INITS}')
    parser.add_argument('-u', '--update-frequency', type=int, default=100, metavar='N', dest='update_frequency',
                        help='how many optimizer steps between prune/grow (adaptation) rounds')
    parser.add_argument('--only-L', action='store_true', dest='only_L',
                        help='only sparsify the decomposed large kernels (LoRA1/LoRA2)')
    parser.add_argument('--bn', type=str2bool, default=True, help='add BN layer after each conv branch')
    return parser


@dataclass(frozen=True)
class Interval:
    """The meaningful values of a numeric flag; ``str()`` writes it in interval notation, e.g. ``(0, 1]``."""
    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = self.low < value if self.low_open else self.low <= value
        below = value < self.high if self.high_open else value <= self.high
        return above and below  # NaN is in no interval

    def __str__(self) -> str:
        return f'{"(" if self.low_open else "["}{self.low:g}, {self.high:g}{")" if self.high_open else "]"}'


PROBABILITY = Interval(0, 1)
FRACTION_BELOW_ONE = Interval(0, 1, high_open=True)
NON_NEGATIVE = Interval(0, high_open=True)
POSITIVE = Interval(0, low_open=True, high_open=True)
# Every rate, fraction and probability flag of main.py (main_KD.py adds its own): flag -> (range, what it is).
# Out of range they would fail deep inside torch/timm or, worse, train something else without a word
# (--prune_rate 2 zeroes every sparse weight, a negative one trains static masks).
FLAG_RANGES: Dict[str, Tuple[Interval, str]] = {
    '--epochs': (Interval(1, high_open=True), 'number of training epochs'),
    '--lr': (POSITIVE, 'learning rate'),
    '--min_lr': (NON_NEGATIVE, 'final learning rate'),
    '--weight_decay': (NON_NEGATIVE, 'weight decay'),
    '--weight_decay_end': (NON_NEGATIVE, 'final weight decay'),
    '--layer_decay': (Interval(0, 1, low_open=True), 'per-layer lr decay; 1.0 turns it off'),
    '--momentum': (FRACTION_BELOW_ONE, 'SGD momentum'),
    '--opt_betas': (FRACTION_BELOW_ONE, 'Adam betas'),
    '--clip_grad': (NON_NEGATIVE, 'gradient-norm clipping; 0 or unset turns it off'),
    '--model_ema_decay': (PROBABILITY, 'EMA decay per optimizer step'),
    '--drop_path': (FRACTION_BELOW_ONE, 'stochastic-depth rate of the last block; 1 would always drop it'),
    '--smoothing': (FRACTION_BELOW_ONE, 'label smoothing'),
    '--color_jitter': (NON_NEGATIVE, 'color jitter strength'),
    '--hflip': (PROBABILITY, 'horizontal-flip probability'),
    '--reprob': (PROBABILITY, 'random-erasing probability'),
    '--mixup': (NON_NEGATIVE, 'mixup Beta(alpha, alpha); 0 turns mixup off'),
    '--cutmix': (NON_NEGATIVE, 'cutmix Beta(alpha, alpha); 0 turns cutmix off'),
    '--cutmix_minmax': (Interval(0, 1, low_open=True), 'cutmix box-size ratio bounds'),
    '--mixup_prob': (PROBABILITY, 'probability of mixing a batch'),
    '--mixup_switch_prob': (PROBABILITY, 'probability of cutmix instead of mixup'),
    '--crop_pct': (Interval(0, 1, low_open=True), 'evaluation center-crop fraction'),
    '--sparsity': (FRACTION_BELOW_ONE, 'fraction of the 2-D/4-D weights that are zero'),
    '--gpu_pipeline_cpu_share': (FRACTION_BELOW_ONE, 'share of images decoded by the loader workers'),
    '--prune_rate': (Interval(0, 1, low_open=True, high_open=True), 'fraction of the active weights pruned and '
                   'regrown at each prune/grow update; --fix keeps the masks static'),
    '--update-frequency': (Interval(1, high_open=True), 'optimizer steps between prune/grow updates'),
}


def check_ranges(args: argparse.Namespace, ranges: Dict[str, Tuple[Interval, str]]) -> None:
    """Every flag of ``ranges`` (keyed by its spelling) that is set must lie in its interval (each list entry too)."""
    for flag, (interval, what) in ranges.items():
        value = getattr(args, flag.lstrip('-').replace('-', '_'), None)
        for item in value if isinstance(value, list) else [value]:
            if item is not None and item not in interval:
                raise ValueError(f'{flag} must be in {interval} ({what}); got {item:g}')


def check_args(args: argparse.Namespace) -> None:
    """Reject flag values and combinations that would otherwise fail deep inside torch, or silently train something
    else, before any work starts."""
    check_ranges(args, FLAG_RANGES)
    if args.cutmix_minmax is not None and (len(args.cutmix_minmax) != 2 or
                                           args.cutmix_minmax[0] >= args.cutmix_minmax[1]):
        raise ValueError(f'--cutmix_minmax takes two ratios, min < max; got {args.cutmix_minmax}')
    if args.sparse_init not in SPARSE_INITS:
        raise ValueError(f'--sparse_init must be one of {SPARSE_INITS}; got {args.sparse_init!r}')
    if args.update_freq < 1:
        raise ValueError(f'--update_freq must be >= 1; got {args.update_freq}')
    if args.batch_size < 1:
        raise ValueError(f'--batch_size must be >= 1; got {args.batch_size}')
    if args.gpu_pipeline_cpu_share and not args.gpu_pipeline:
        raise ValueError(f'--gpu_pipeline_cpu_share {args.gpu_pipeline_cpu_share:g} splits --gpu_pipeline\'s '
                         f'decoding between the GPU and the loader workers: add --gpu_pipeline true or drop it')
    if args.print_freq < 1:
        raise ValueError(f'--print_freq must be >= 1; got {args.print_freq}')
    if args.save_ckpt_freq < 1 or args.save_ckpt_num < 1:  # 0 would divide by zero / delete the file just written
        raise ValueError(f'--save_ckpt_freq and --save_ckpt_num must be >= 1 (got {args.save_ckpt_freq}, '
                         f'{args.save_ckpt_num}); use --save_ckpt false to save nothing')
    if args.eval and args.disable_eval:
        raise ValueError('--eval true needs the validation set; drop --disable_eval true')
    if args.eval and not (args.resume or args.finetune or (args.auto_resume and args.output_dir
                                                           and utils.latest_checkpoint(args.output_dir))):
        raise ValueError('--eval true has no weights to evaluate (it would score a randomly initialised model): pass '
                         '--resume CHECKPOINT, or --finetune CHECKPOINT --model_key model_ema for EMA weights')
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        raise ValueError('--device cuda but no CUDA device is available; use --device cpu')
    if args.cuda_graph is True and not args.eval:
        if not args.device.startswith('cuda'):
            raise ValueError(f'--cuda_graph true needs a CUDA device (--device is {args.device!r}); drop it on the CPU')
        if args.compile:
            raise ValueError('--cuda_graph true and --compile true: torch.compile replays its own CUDA graphs with '
                             '--compile_mode reduce-overhead; pass one or the other')
        if args.grad_checkpointing:
            raise ValueError('--cuda_graph true cannot capture --grad_checkpointing (it recomputes blocks in '
                             'backward); drop one of them')


# ---- data ----------------------------------------------------------------------------------------------------------
@dataclass
class Data:
    """What ``build_data`` returns: datasets, samplers, loaders and the optional Mixup/CutMix function."""
    dataset_train: torch.utils.data.Dataset
    dataset_val: Optional[torch.utils.data.Dataset]
    sampler_train: torch.utils.data.DistributedSampler
    data_loader_train: Union[DeviceLoader, DeviceBatches]  # DeviceBatches with --gpu_pipeline
    data_loader_val: Optional[Union[DeviceLoader, DeviceBatches]]
    mixup_fn: Optional[Mixup]


def build_data(args: argparse.Namespace) -> Data:
    """Datasets, samplers and loaders; sets ``args.nb_classes`` from the training set."""
    dataset_train, args.nb_classes = build_dataset(is_train=True, args=args)
    # evaluation images travel as uint8 and are normalised where the model runs (DeviceLoader): same numbers
    normalize_on_device = not args.gpu_pipeline and args.data_set != 'synthetic'
    if args.disable_eval:
        args.dist_eval = False
        dataset_val = None
    else:
        dataset_val, _ = build_dataset(is_train=False, args=args, normalize=not normalize_on_device)
        check_same_classes(dataset_train, dataset_val)

    num_tasks, global_rank = utils.get_world_size(), utils.get_rank()
    pin_memory = args.pin_mem and torch.device(args.device).type == 'cuda'  # pinning needs an accelerator
    # --gpu_pipeline: the workers only read files (nothing to pin); GpuAugment decodes and augments on the device
    encoded = dict(collate_fn=collate_encoded, pin_memory=False) if args.gpu_pipeline else dict(pin_memory=pin_memory)
    sampler_train = torch.utils.data.DistributedSampler(dataset_train, num_replicas=num_tasks, rank=global_rank,
                                                        shuffle=True, seed=args.seed)
    # FirstBatchShared: SNIP's scoring batch is epoch 0's first batch, read once by one set of workers;
    # SplitFirstBatch: each pass's first batch is prepared by all the workers side by side (slices joined again)
    batches_train = utils.SplitFirstBatch(torch.utils.data.BatchSampler(sampler_train, args.batch_size,
                                                                        drop_last=True), args.num_workers)
    data_loader_train = utils.FirstBatchShared(torch.utils.data.DataLoader(
        dataset_train, batch_sampler=batches_train, num_workers=args.num_workers, persistent_workers=False,
        **encoded))
    if len(data_loader_train) == 0:
        raise ValueError(f'the training set ({len(dataset_train)} images over {num_tasks} processes) is smaller than '
                         f'one batch; lower --batch_size')
    if not args.gpu_pipeline:  # each batch copied on a side stream while the last step's kernels run
        data_loader_train = DeviceLoader(data_loader_train, torch.device(args.device))

    data_loader_val = None
    if dataset_val is not None:
        if args.dist_eval:
            sampler_val = utils.DistributedEvalSampler(dataset_val, num_replicas=num_tasks, rank=global_rank)
        else:
            sampler_val = torch.utils.data.SequentialSampler(dataset_val)
        batches_val = utils.SplitFirstBatch(torch.utils.data.BatchSampler(sampler_val, int(1.5 * args.batch_size),
                                                                          drop_last=False), args.num_workers)
        data_loader_val = utils.FirstBatchShared(torch.utils.data.DataLoader(
            dataset_val, batch_sampler=batches_val, num_workers=args.num_workers, **encoded))
        if not args.gpu_pipeline:  # copied on a side stream (and normalised there) while the last batch computes
            data_loader_val = DeviceLoader(data_loader_val, torch.device(args.device),
                                           mean_std=mean_std(args) if normalize_on_device else None)
    if args.gpu_pipeline:
        data_loader_train = DeviceBatches(data_loader_train, GpuAugment(True, args, torch.device(args.device)))
        print(f'Transform = {data_loader_train.augment}')
        if data_loader_val is not None:
            data_loader_val = DeviceBatches(data_loader_val, GpuAugment(False, args, torch.device(args.device)))
            print(f'Transform = {data_loader_val.augment}')

    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None:
        if args.batch_size % 2:  # timm's Mixup pairs each image with its mirror in the batch (it would assert)
            raise ValueError(f'--batch_size {args.batch_size} is odd; Mixup/CutMix needs an even batch (or pass '
                             f'--mixup 0 --cutmix 0)')
        print('Mixup is activated!')
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=args.nb_classes)
    return Data(dataset_train, dataset_val, sampler_train, data_loader_train, data_loader_val, mixup_fn)


# ---- model ---------------------------------------------------------------------------------------------------------
def model_kwargs(args: argparse.Namespace, name: str) -> dict:
    """``timm.create_model`` keyword arguments for ``name``: classes and drop path, plus the SLaK arguments (kernel
    sizes, width, Decom, bn) for SLaK models."""
    kwargs = dict(num_classes=args.nb_classes, drop_path_rate=args.drop_path)
    if name.startswith('SLaK'):
        kwargs.update(layer_scale_init_value=args.layer_scale_init_value, head_init_scale=args.head_init_scale,
                      kernel_size=list(args.kernel_size), width_factor=args.width_factor, Decom=args.Decom, bn=args.bn)
        if args.conv_impl is not None:
            kwargs['conv_impl'] = args.conv_impl
    return kwargs


def compile_model(args: argparse.Namespace, model: torch.nn.Module) -> None:
    """``--compile``: ``model.compile`` in place (a DDP wrapper compiles what it wraps), in ``--compile_mode``.
    Eager SLaK-T launches ~1,600 kernels per training step and its host time exceeds its GPU time (H100, batch 64:
    118 vs 54 ms eager, 85 vs 46 ms compiled as a whole; benchmarks/RESULTS.md): 'reduce-overhead' is the mode that
    removes that launch cost, by CUDA-graph replays of the compiled graphs."""
    model.compile(**({} if args.compile_mode == 'default' else {'mode': args.compile_mode}))


def auto_or_bool(value: str):
    """argparse type of ``--cuda_graph``: 'auto', or a boolean as ``str2bool`` reads it."""
    return 'auto' if str(value).lower() == 'auto' else str2bool(value)


def cuda_graph_wanted(args: argparse.Namespace, model: torch.nn.Module, device: torch.device) -> bool:
    """Whether training replays CUDA graphs: ``--cuda_graph true``, or 'auto' for a SLaK model trained by one CUDA
    process without ``--compile`` (its own graphs: ``--compile_mode reduce-overhead``) or ``--grad_checkpointing``.
    Measured (H100, issue 18, session 13): the README's SLaK-T command through ``main.py`` at 1,468 img/s with the
    graphs against 981 eagerly, 0.94x the bare step's graph replays; other models keep eager steps unless asked."""
    if args.eval or args.cuda_graph is False:
        return False
    if args.cuda_graph is True:
        return True
    return (device.type == 'cuda' and not args.distributed and not args.compile and not args.grad_checkpointing
            and isinstance(model, SLaK.SLaK))


def graph_training_forward(args: argparse.Namespace, model: torch.nn.Module, device: torch.device,
                           amp_dtype: torch.dtype, make_graphed=None) -> Optional[Callable]:
    """``--cuda_graph`` (see :func:`cuda_graph_wanted`): the model's training forward (and its backward) captured as
    CUDA graphs, or None.

    An eager SLaK-T step launches ~1,600 kernels, and on an H100 the host's launch time exceeds the GPU time at
    batch 128 (benchmarks/RESULTS.md, issue 18): replayed from a graph, the host launches two graphs instead. The
    capture (``torch.cuda.make_graphed_callables``: a few warm-up passes on a side stream, then one captured forward
    and backward on a random batch of the training shape, under the training autocast without its weight cache)
    happens once, after the masks are set. What stays eager: the loss, the optimizer step, the mask and EMA updates,
    the schedules. The returned function replaces ``model(samples)`` in training only (``engine.train_one_epoch``'s
    ``train_forward``): the module itself is left an ordinary module (its ``forward`` attribute is removed again), so
    evaluation, the folded copies, ``state_dict`` and checkpoints never meet the graphs. The warm-up passes'
    changes to the BatchNorm running statistics are undone: the run computes what the eager one does (same kernels),
    except for the random draws (drop path) that the warm-up consumed. Every batch must have the training shape
    (training drops its last partial batch); a DDP run is refused (its gradient hooks are not captured).
    """
    if not cuda_graph_wanted(args, model, device):
        return None
    if args.distributed:
        raise ValueError('--cuda_graph true runs one process only (DDP reduces gradients in hooks a graph does not '
                         'capture); drop it with torchrun')
    make_graphed = make_graphed or torch.cuda.make_graphed_callables
    sample = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device)
    if args.channels_last:
        sample = sample.contiguous(memory_format=torch.channels_last)
    buffers = [(b, b.detach().clone()) for b in model.buffers()]  # BatchNorm statistics before the warm-up
    model.train(True)
    started = time.time()
    # The warm-up passes run on a side stream, whose allocations cannot reuse blocks cached on the default stream
    # (SNIP's scoring pass), and leave blocks that the eager work on the default stream cannot reuse either: both
    # go back to the driver, before and after the capture (reserved memory; not yet measured on a GPU).
    if device.type == 'cuda':
        torch.cuda.empty_cache()
    try:
        with torch.amp.autocast(device_type=device.type, dtype=amp_dtype, enabled=args.use_amp, cache_enabled=False):
            make_graphed(model, (sample,), allow_unused_input=True)
        failure = None
    except Exception as e:  # 'auto' falls back to eager steps (out of memory, a model that syncs with the host)
        if args.cuda_graph is True:
            raise
        failure = e
    forward = model.__dict__.pop('forward', None)  # the graphed forward; the module is an ordinary module again
    with torch.no_grad():
        for buffer, before in buffers:
            buffer.copy_(before)
    if device.type == 'cuda':
        torch.cuda.empty_cache()
    if failure is not None or forward is None:
        lines = str(failure).strip().splitlines()
        reason = f'{type(failure).__name__}: {lines[-1] if lines else ""}' if failure else 'no graphed forward'
        print(f'warning: the CUDA-graph capture failed ({reason}); training runs eagerly (--cuda_graph false skips '
              f'the attempt)')
        return None
    print(f'CUDA graphs: training forward and backward captured at batch {args.batch_size} in '
          f'{time.time() - started:.1f} s')
    return forward


def start_kernel_precompile(args: argparse.Namespace, model: torch.nn.Module, device: torch.device,
                            amp_dtype: torch.dtype) -> Optional['SLaK.KernelPrecompile']:
    """A CUDA training run of a SLaK model compiles the Triton kernel versions its training step launches in a
    background thread (parallel compiles) while it loads data and computes the masks (``SLaK.precompile_step_kernels``;
    ``SLAK_PRECOMPILE=0`` turns it off)."""
    if args.eval:
        return None
    return SLaK.precompile_step_kernels(model, args.batch_size, args.input_size,
                                        amp_dtype if args.use_amp else torch.float32, device)


def prefetch_snip_batch(args: argparse.Namespace, data: 'Data') -> bool:
    """A run that will score SNIP masks on its first training batch starts that batch's loader pass now, once the
    model is built (``utils.FirstBatchShared.prefetch``): the workers decode it while the run sets up its optimizer,
    EMA and compile jobs. Nothing in between draws random numbers, so the run is the same. Not for runs that resume
    (their masks come from the checkpoint) or only evaluate; returns whether it started."""
    if args.eval or not args.sparse or args.sparse_init not in SNIP_INITS or args.resume:
        return False
    prefetch = getattr(data.data_loader_train, 'prefetch', None)  # (not DeviceBatches: --gpu_pipeline)
    if prefetch is None:
        return False
    prefetch()
    return True


def start_graph_warm_up(args: argparse.Namespace, model: torch.nn.Module, device: torch.device, amp_dtype: torch.dtype,
                        after: Optional['SLaK.KernelPrecompile']) -> Optional['SLaK.GraphWarmUp']:
    """A CUDA training run of a SLaK model traces and compiles its blocks' training tail graphs in a background
    thread (one step of a small copy, after the kernel precompile ``after``) while it prepares the masks
    (``SLaK.warm_step_graphs``; ``SLAK_WARM_GRAPHS=0`` turns it off). Under autocast's weight cache setting of the
    step that will use them: off where the step is captured as CUDA graphs (:func:`cuda_graph_wanted`)."""
    if args.eval or args.compile:
        return None
    return SLaK.warm_step_graphs(model, args.batch_size, args.input_size, amp_dtype if args.use_amp else None, device,
                                 channels_last=args.channels_last, after=after,
                                 autocast_cache=not cuda_graph_wanted(args, model, device))


def start_cache_warming(args: argparse.Namespace, model: torch.nn.Module, device: torch.device,
                        amp_dtype: torch.dtype) -> Optional['SLaK.CacheWarmer']:
    """With ``SLAK_WARM_CACHES=1``, a single-process CUDA training run of a SLaK model compiles its stages' kernels
    and block tails side by side in helper processes while it sets up (``SLaK.warm_compile_caches``; off by default:
    measured slower than compiling in the training process, cold and warm)."""
    if args.eval or args.compile or args.distributed:
        return None
    eval_batch = None if args.disable_eval else int(1.5 * args.batch_size)
    return SLaK.warm_compile_caches(model, {'name': args.model, 'kwargs': model_kwargs(args, args.model)},
                                    args.batch_size, args.input_size, amp_dtype if args.use_amp else None, device,
                                    channels_last=args.channels_last, eval_batch=eval_batch)


def build_model(args: argparse.Namespace, name: str) -> torch.nn.Module:
    """``timm.create_model(name, ...)`` with the SLaK arguments (kernel sizes, width, Decom, bn) for SLaK models.

    ``--input_size`` must be at least the model's total stride (``feature_info``; 32 for SLaK).
    """
    if not timm.is_model(name):
        slak = [m for m in timm.list_models('SLaK*')]
        raise ValueError(f'--model {name!r} is not registered; SLaK models: {", ".join(slak)} '
                         f'(any timm model name also works, e.g. convnext_tiny)')
    model = timm.create_model(name, pretrained=False, **model_kwargs(args, name))
    reduction = max((int(info['reduction']) for info in getattr(model, 'feature_info', None) or []), default=1)
    if args.input_size < reduction:  # the last stage would get an empty feature map (a conv error deep in torch)
        raise ValueError(f'--input_size {args.input_size} is too small for {name}: it downsamples by {reduction}, so '
                         f'the minimum is {reduction}')
    return model


def load_finetune(args: argparse.Namespace, model: torch.nn.Module) -> None:
    """``--finetune``: non-strict load of the first ``--model_key`` entry; a head of another class count is dropped.

    ``--model_prefix P`` reads the model's weights from the checkpoint keys ``P<name>`` (as the original). A checkpoint
    that gives the model none of its weights is refused (the original trained from scratch without a word).
    """
    checkpoint = SLaK.load_checkpoint_file(args.finetune)
    print(f'Load ckpt from {args.finetune}')
    checkpoint_model = None
    for model_key in args.model_key.split('|'):
        if model_key in checkpoint:
            checkpoint_model = checkpoint[model_key]
            print(f'Load state_dict by model_key = {model_key}')
            break
    if checkpoint_model is None:
        checkpoint_model = checkpoint
    # an explicit --model_prefix names the prefix; otherwise module./backbone. are stripped
    checkpoint_model = dict(SLaK.extract_state_dict(checkpoint_model, keys=(), source=args.finetune,
                                                    strip_prefixes=not args.model_prefix))
    state_dict = model.state_dict()
    for k in ('head.weight', 'head.bias'):
        key = args.model_prefix + k
        if key in checkpoint_model and k in state_dict and checkpoint_model[key].shape != state_dict[k].shape:
            print(f'Removing key {key} from pretrained checkpoint')
            del checkpoint_model[key]
    utils.load_state_dict(model, checkpoint_model, prefix=args.model_prefix, source=f'--finetune {args.finetune}')


def count_macs(model: torch.nn.Module, input_size: int) -> Tuple[int, int]:
    """(dense, sparse) multiply-accumulates of one forward pass of one image at ``input_size``.

    MACs are what the paper's "FLOPs" column counts (SLaK-T 5.0G, ConvNeXt-T 4.5G): ``FlopCounterMode``'s FLOPs are 2
    per multiply-accumulate of every conv and matmul. Forward only: FlopCounterMode over-counts the backward of
    depthwise convs by ~C (it ignores ``groups``). The sparse count scales each conv/linear layer by the density
    (non-zero fraction) of its weight. The pass runs on a copy on the meta device (``SLaK.for_single_pass``: plain
    convolutions), so on a GPU it compiles no kernel for an input size and dtype training never uses.
    """
    shadow = SLaK.for_single_pass(copy.deepcopy(model)).to('meta').eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        shadow(torch.zeros(1, 3, input_size, input_size, device='meta'))
    per_module = counter.get_flop_counts()
    root = type(model).__name__
    dense = counter.get_total_flops()
    saved = 0.0
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            flops = sum(per_module.get(f'{root}.{name}', {}).values())
            density = (module.weight != 0).float().mean().item()
            saved += flops * (1.0 - density)
    return int(dense) // 2, round((dense - saved) / 2)


def print_model_size(model: torch.nn.Module, n_parameters: int, input_size: int, sparse: bool,
                     name: str = 'model') -> None:
    """Parameters and multiply-accumulates in the units of the paper's table, said in words.

    Its "#params" of a sparse model counts the non-zero weights (SLaK-T: 30M of 50.7M), its "FLOPs" are MACs.
    """
    dense_macs, sparse_macs = count_macs(model, input_size)
    if sparse:
        print(f'{name}: {si(count_nonzero_params(model))} non-zero parameters of {si(n_parameters)}; '
              f'{si(sparse_macs)} multiply-accumulates (MACs) per {input_size}x{input_size} image with the sparse '
              f'masks, {si(dense_macs)} dense (the paper\'s "#params" and "FLOPs" columns count the non-zeros and '
              f'MACs)')
    else:
        print(f'{name}: {si(n_parameters)} parameters; {si(dense_macs)} multiply-accumulates (MACs, the paper\'s '
              f'"FLOPs") per {input_size}x{input_size} image')


def si(count: float) -> str:
    """``count`` with an SI prefix and two decimals, the way the paper's tables write sizes: '30.43 M', '5.06 G'."""
    for factor, prefix in ((1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
        if count >= factor:
            return f'{count / factor:.2f} {prefix}'
    return str(count)


def save_run_text(args: argparse.Namespace, filename: str, title: str, text: str) -> None:
    """A long start-up dump (model structure, parameter groups) goes to ``--output_dir/filename`` with one line on
    the console; ``--verbose`` prints it in full (the original always printed it)."""
    path = os.path.join(args.output_dir, filename) if args.output_dir else ''
    if path and utils.is_main_process():
        with open(path, 'w', encoding='utf-8') as f:
            f.write(text + '\n')
    if args.verbose:
        print(f'{title} = {text}')
    elif path:
        print(f'{title}: {path}')


def build_criterion(args: argparse.Namespace, mixup_fn: Optional[Mixup]) -> torch.nn.Module:
    if mixup_fn is not None:
        return SoftTargetCrossEntropy()  # smoothing is handled inside Mixup
    if args.smoothing > 0.:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return torch.nn.CrossEntropyLoss()


def build_training_objects(args: argparse.Namespace, model_without_ddp: torch.nn.Module,
                           num_training_steps_per_epoch: int):
    """(optimizer, loss_scaler, lr_schedule_values, wd_schedule_values) as in the original."""
    assigner = build_layer_decay_assigner(args.model, args.layer_decay)
    if assigner is not None:
        print(f'Assigned values = {assigner.values}')
    group_names: Dict[str, dict] = {}
    optimizer = create_optimizer(args, model_without_ddp, skip_list=None,
                                 get_num_layer=assigner.get_layer_id if assigner is not None else None,
                                 get_layer_scale=assigner.get_scale if assigner is not None else None,
                                 group_names=group_names)
    save_run_text(args, 'param_groups.json', 'Param groups', json.dumps(group_names, indent=2))
    device_type = torch.device(args.device).type
    loss_scaler = NativeScaler(device_type, enabled=args.use_amp and args.amp_dtype == 'float16')

    print('Use Cosine LR scheduler')
    lr_schedule_values = utils.cosine_scheduler(args.lr, args.min_lr, args.epochs, num_training_steps_per_epoch,
                                                warmup_epochs=args.warmup_epochs, warmup_steps=args.warmup_steps)
    if args.weight_decay_end is None:
        args.weight_decay_end = args.weight_decay
    wd_schedule_values = utils.cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs,
                                                num_training_steps_per_epoch)
    print(f'Max WD = {max(wd_schedule_values):.7f}, Min WD = {min(wd_schedule_values):.7f}')
    return optimizer, loss_scaler, lr_schedule_values, wd_schedule_values


# ---- shared run steps (main_KD.py uses them too) -------------------------------------------------------------------
def init_run(args: argparse.Namespace) -> Tuple[torch.device, torch.dtype]:
    """Output folders (checked writable before any work), distributed init, per-rank seeds, cuDNN autotuning;
    returns (device, autocast dtype)."""
    if args.output_dir:
        utils.make_writable_dir(args.output_dir, '--output_dir')
    utils.init_distributed_mode(args)
    if args.log_dir is not None and utils.is_main_process():  # only the main process writes TensorBoard logs
        utils.make_writable_dir(args.log_dir, '--log_dir')
    print(args)
    seed = args.seed + utils.get_rank()
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    cudnn.benchmark = True
    device = torch.device(args.device)
    set_tf32(device, getattr(args, 'tf32', True))
    return device, torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16


def set_tf32(device: torch.device, enabled: bool) -> None:
    """``--tf32``: on CUDA, allow (or forbid) TF32 tensor cores for float32 matrix products and convolutions (our
    depthwise kernels follow ``cudnn.allow_tf32``). CPU runs keep their exact float32 maths either way."""
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = enabled
        cudnn.allow_tf32 = enabled


def build_loggers(args: argparse.Namespace):
    """(TensorBoard logger, W&B logger) on the main process; None elsewhere or when not asked for."""
    log_writer = wandb_logger = None
    if utils.get_rank() == 0 and args.log_dir is not None:
        os.makedirs(args.log_dir, exist_ok=True)
        log_writer = utils.TensorboardLogger(log_dir=args.log_dir)
    if utils.get_rank() == 0 and args.enable_wandb:
        wandb_logger = utils.create_wandb_logger(args)
    return log_writer, wandb_logger


def prepare_model(args: argparse.Namespace, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Gradient checkpointing, device, memory format and (distributed CUDA runs) SyncBatchNorm."""
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.distributed and args.sync_bn and device.type == 'cuda':
        model = utils.convert_sync_batchnorm(model)  # SyncBatchNorm without a host sync per BN (utils.py)
    if (device.type == 'cuda' and SLaK.Block.COMPILE_TAIL and not args.compile
            and any(isinstance(m, SLaK.Block) for m in model.modules())):
        print('SLaK blocks: their tails run through torch.compile, compiled on first use and cached on disk (on a '
              'fresh machine the first steps wait for it, a second run reuses it); SLAK_COMPILE_TAIL=0 turns it off')
    return model


def build_ema(args: argparse.Namespace, model: torch.nn.Module) -> Optional[ModelEma]:
    """Sparse-aware EMA of ``model`` (before DDP wrapping, as the original).

    Every rank was seeded with ``--seed + rank``, so the replicas differ until DDP broadcasts rank 0's weights; the
    model is synchronised from rank 0 first, so that every rank's EMA starts from the same weights (the original's EMA
    copies started different on each rank).
    """
    if not args.model_ema:
        return None
    if getattr(args, 'distributed', False):
        with torch.no_grad():
            for tensor in model.state_dict().values():
                torch.distributed.broadcast(tensor, src=0)
    print(f'Using EMA with decay = {args.model_ema_decay:.8f}')
    return ModelEma(model, decay=args.model_ema_decay, device='cpu' if args.model_ema_force_cpu else '', resume='')


def steps_per_epoch(args: argparse.Namespace, data: Data) -> int:
    """Optimizer steps per epoch (micro-batches of the last incomplete step are dropped, as in the original)."""
    total_batch_size = args.batch_size * args.update_freq * utils.get_world_size()
    steps = len(data.dataset_train) // total_batch_size
    if steps == 0 and not args.eval:
        raise ValueError(f'effective batch {total_batch_size} (batch_size x update_freq x world_size) exceeds the '
                         f'{len(data.dataset_train)} training images; lower --batch_size or --update_freq')
    print(f'{len(data.dataset_train)} training images, effective batch {total_batch_size} (--batch_size '
          f'{args.batch_size} x --update_freq {args.update_freq} x {utils.get_world_size()} processes): {steps} '
          f'optimizer steps per epoch at --lr {args.lr:g}')
    return steps


def ddp_options(model: torch.nn.Module) -> Dict[str, bool]:
    """DDP keyword arguments: gradients as views of DDP's all-reduce buckets (no copy in and out of them each step).
    Under SyncBatchNorm every rank computes the same running statistics from the same all-gathered batch statistics,
    so rank 0's buffers are not re-broadcast before every forward (one collective and sync point less per
    micro-batch); without it they are, as in the original."""
    synced_bn = any(isinstance(m, utils.SyncBatchNormWithoutHostSync) for m in model.modules())
    # torch >= 2.13 calls the per-forward sync 'forward_sync_buffers'; there, 'broadcast_buffers=False' would also
    # skip the buffers' sync at construction, which we keep
    per_forward = ('forward_sync_buffers' if 'forward_sync_buffers' in
                   inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
                   else 'broadcast_buffers')
    return {'gradient_as_bucket_view': True, per_forward: not synced_bn}


def wrap_ddp(args: argparse.Namespace, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    if not args.distributed:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[args.gpu] if device.type == 'cuda' else None, find_unused_parameters=False,
        **ddp_options(model))


class SavedArgs(dict):
    """The flags a resumed checkpoint was written with (its ``args`` entry, read through the ``extra`` hook of
    ``utils.auto_load_model``); empty when nothing was resumed."""

    def load_state_dict(self, state: dict) -> None:
        self.update(state)


def check_resume(args: argparse.Namespace, path: str, saved_args: SavedArgs, mask_state: Optional[dict]) -> None:
    """After resuming from ``path``: refuse a ``--sparsity`` other than the checkpoint's (its masks are restored), and
    say in one line when the effective batch changed (the world size, ``--batch_size`` or ``--update_freq``).

    The original rescaled nothing: ``--lr`` stays as given, and the lr, wd and prune-rate schedules are rebuilt for
    this run's steps per epoch (see :func:`build_mask`).
    """
    if args.sparse and mask_state is not None:
        saved_sparsity = 1 - mask_state['density']
        if not math.isclose(saved_sparsity, args.sparsity, abs_tol=1e-9):
            raise ValueError(f'--sparsity {args.sparsity:g}, but {path} was trained at sparsity '
                             f'{saved_sparsity:g} and resuming restores its masks; pass --sparsity {saved_sparsity:g}, '
                             f'or sparsify its weights anew in a new run (--finetune {path}, another '
                             f'--output_dir)')
    if not saved_args:
        return
    saved_world = saved_args.get('world_size', 1) if saved_args.get('distributed') else 1
    before = (saved_world, saved_args.get('batch_size'), saved_args.get('update_freq'))
    now = (utils.get_world_size(), args.batch_size, args.update_freq)
    if before != now:
        print(f'effective batch changed: {before[0]} processes x --batch_size {before[1]} x --update_freq '
              f'{before[2]} = {math.prod(before)} images per optimizer step when {path} was written, now '
              f'{now[0]} x {now[1]} x {now[2]} = {math.prod(now)}, at the same --lr {args.lr:g} (not rescaled); the '
              f'schedules follow this run\'s steps')


def resumed_schedule(mask_state: dict, decay: CosineDecay) -> dict:
    """``mask_state`` with this run's prune-rate schedule ``decay`` instead of the checkpoint's, when they differ.

    The checkpoint's schedule spans the steps of the run that wrote it; after a change of world size,
    ``--update_freq``, ``--epochs`` or ``--prune_rate`` it would run past its end (the cosine rises again) or stop
    short. The original rebuilt the schedule from the flags at every start, as ``decay`` is; an unchanged resume keeps
    the saved one (the same values, bit for bit).
    """
    saved = mask_state.get('prune_rate_decay')
    if saved is None or saved == decay.state_dict():
        return mask_state
    print(f'prune-rate schedule: the checkpoint\'s went from {saved["prune_rate"]:g} to {saved["eta_min"]:g} '
          f'over {saved["T_max"]} optimizer steps (now at {saved["last_epoch"]}); this run\'s goes from '
          f'{decay.prune_rate:g} over {decay.T_max} steps and is at {decay.last_epoch}: the prune rate continues at '
          f'{decay.get_dr():.4f} and reaches {decay.eta_min:g} at the last step')
    return {**mask_state, 'prune_rate_decay': decay.state_dict(), 'prune_rate': decay.get_dr()}


def build_mask(args: argparse.Namespace, model: torch.nn.Module, optimizer, data: Data, num_steps: int, log_writer,
               mask_state: Optional[dict], model_ema: Optional[ModelEma], mask_source: str = '') -> Optional[Masking]:
    """``--sparse``: the prune-rate schedule over this run's steps and the masks (restored from ``mask_state`` when
    resuming; masks that do not fit the model raise ``ValueError`` naming ``mask_source``, the checkpoint they came
    from). The per-layer densities go to ``--output_dir/sparsity.txt`` (and the console with ``--verbose``)."""
    if not args.sparse:
        return None
    decay = CosineDecay(args.prune_rate, T_max=int(num_steps * args.epochs), init_step=num_steps * args.start_epoch)
    if mask_state is not None:
        mask_state = resumed_schedule(mask_state, decay)
    report_path = os.path.join(args.output_dir, 'sparsity.txt') if args.output_dir and utils.is_main_process() else None
    mask = Masking(optimizer, train_loader=data.data_loader_train, prune_rate_decay=decay, prune_mode=args.prune,
                   growth_mode=args.growth, redistribution_mode=args.redistribution, verbose=args.verbose, args=args,
                   log_writer=log_writer, report_path=report_path, prepare_copy=SLaK.for_single_pass)
    try:
        mask.add_module(model, mask_state=mask_state)
    except ValueError as e:
        if mask_state is None:
            raise
        raise ValueError(f'{mask_source}: {e}') from None
    if model_ema is not None:
        model_ema.track_masks(mask)  # a resumed run knows which positions are "newly grown" at its first update
    return mask


def inference_model(args: argparse.Namespace, model: torch.nn.Module) -> torch.nn.Module:
    """What to evaluate: for SLaK models (``--eval_folded``, the default) a folded copy, every block's branches and
    BatchNorms merged (``reparameterize(decomposed=True)``: the two rectangular kernels of a Decom block, one K x K
    kernel otherwise), which computes the same function in fewer passes; else ``model`` itself. The copy leaves the
    weights being trained, their optimizer state and every checkpoint untouched."""
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    if not args.eval_folded or args.compile or not isinstance(inner, SLaK.SLaK):  # (--compile: evaluated as compiled)
        return model
    devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):  # the folded convs' initialisation must not move training's RNG
        return copy.deepcopy(inner).eval().reparameterize(decomposed=True).requires_grad_(False)


def train_and_evaluate(args: argparse.Namespace, model: torch.nn.Module, model_without_ddp: torch.nn.Module,
                       data: Data, criterion: torch.nn.Module, optimizer, loss_scaler, lr_schedule_values,
                       wd_schedule_values, num_steps: int, device: torch.device, amp_dtype: torch.dtype,
                       model_ema: Optional[ModelEma], mask: Optional[Masking], log_writer, wandb_logger,
                       n_parameters: int, compute_loss=None, extra: Optional[dict] = None,
                       name: str = 'model', clip_parameters=None, sync_modules=(),
                       train_forward: Optional[Callable] = None) -> Optional[dict]:
    """The original's epoch loop: train, evaluate (raw and EMA), keep best checkpoints, log; returns the last log.

    Periodic checkpoints are written after the epoch's evaluation, so they carry the best accuracy so far and the
    RNG state the next epoch starts from (``--auto_resume`` is then bit-identical to an uninterrupted run).
    """
    max_accuracy, max_accuracy_ema = args.max_accuracy, args.max_accuracy_ema
    eval_kwargs = dict(use_amp=args.use_amp, amp_dtype=amp_dtype, channels_last=args.channels_last)
    print(f'Start training for {args.epochs} epochs')
    start_time = time.time()
    log_stats = None
    for epoch in range(args.start_epoch, args.epochs):
        data.sampler_train.set_epoch(epoch)  # also single-process: the original never reshuffled there
        if log_writer is not None:
            log_writer.set_step(epoch * num_steps * args.update_freq)
        if wandb_logger is not None:
            wandb_logger.set_steps()
        train_stats = train_one_epoch(
            model, criterion, data.data_loader_train, optimizer, device, epoch, loss_scaler, args.clip_grad,
            model_ema, data.mixup_fn, log_writer=log_writer, wandb_logger=wandb_logger,
            start_steps=epoch * num_steps, lr_schedule_values=lr_schedule_values,
            wd_schedule_values=wd_schedule_values, num_training_steps_per_epoch=num_steps,
            update_freq=args.update_freq, use_amp=args.use_amp, mask=mask, amp_dtype=amp_dtype,
            compute_loss=compute_loss, channels_last=args.channels_last, clip_parameters=clip_parameters,
            sync_modules=sync_modules, print_freq=args.print_freq, train_forward=train_forward)

        def save(tag):
            utils.save_model(args=args, epoch=tag, model=model, model_without_ddp=model_without_ddp,
                             optimizer=optimizer, loss_scaler=loss_scaler, model_ema=model_ema, mask=mask,
                             extra=extra, max_accuracy=max_accuracy, max_accuracy_ema=max_accuracy_ema)

        log_stats = {f'train_{k}': v for k, v in train_stats.items()}
        if data.data_loader_val is not None:
            test_stats = evaluate(data.data_loader_val, inference_model(args, model), device, **eval_kwargs)
            print(f'Accuracy of the {name} on the {len(data.dataset_val)} test images: {test_stats["acc1"]:.1f}%')
            if max_accuracy < test_stats['acc1']:
                max_accuracy = test_stats['acc1']
                if args.output_dir and args.save_ckpt:
                    save('best')
            print(f'Max accuracy: {max_accuracy:.2f}%')
            if log_writer is not None:
                log_writer.update(test_acc1=test_stats['acc1'], head='perf', step=epoch)
                log_writer.update(test_acc5=test_stats['acc5'], head='perf', step=epoch)
                log_writer.update(test_loss=test_stats['loss'], head='perf', step=epoch)
            log_stats.update({f'test_{k}': v for k, v in test_stats.items()})
            if model_ema is not None and args.model_ema_eval:
                test_stats_ema = evaluate(data.data_loader_val, inference_model(args, model_ema.ema), device,
                                          **eval_kwargs)
                print(f'Accuracy of the {name} EMA on {len(data.dataset_val)} test images: '
                      f'{test_stats_ema["acc1"]:.1f}%')
                if max_accuracy_ema < test_stats_ema['acc1']:
                    max_accuracy_ema = test_stats_ema['acc1']
                    if args.output_dir and args.save_ckpt:
                        save('best-ema')
                print(f'Max EMA accuracy: {max_accuracy_ema:.2f}%')
                if log_writer is not None:
                    log_writer.update(test_acc1_ema=test_stats_ema['acc1'], head='perf', step=epoch)
                log_stats.update({f'test_{k}_ema': v for k, v in test_stats_ema.items()})
        log_stats = {**{k: v for k, v in log_stats.items() if not k.endswith('_ema')}, 'epoch': epoch,
                     'n_parameters': n_parameters, **{k: v for k, v in log_stats.items() if k.endswith('_ema')}}

        if args.output_dir and args.save_ckpt and ((epoch + 1) % args.save_ckpt_freq == 0 or epoch + 1 == args.epochs):
            save(epoch)
        utils.append_log(args.output_dir, log_stats)
        if log_writer is not None:
            log_writer.flush()
        if wandb_logger is not None:
            wandb_logger.log_epoch_metrics(log_stats)

    if wandb_logger is not None and args.wandb_ckpt and args.save_ckpt and args.output_dir:
        wandb_logger.log_checkpoints(args.output_dir)
    print(f'Training time {datetime.timedelta(seconds=int(time.time() - start_time))}')
    if args.distributed:
        print_state_checksums(model_without_ddp, mask)
    return log_stats


def print_state_checksums(model: torch.nn.Module, mask: Optional[Masking]) -> None:
    """Every rank prints position-sensitive checksums of its weights and masks: equal lines = identical replicas."""
    weights, masks = utils.state_checksums(model, mask.masks if mask is not None else {})
    print(f'[rank {utils.get_rank()}] checksum weights {weights:.10e} masks {masks:.10e}', force=True)


# ---- main ----------------------------------------------------------------------------------------------------------
def main(args: argparse.Namespace) -> Optional[dict]:
    """Run training (or ``--eval``); returns the last epoch's log dict (or the eval stats)."""
    check_args(args)
    device, amp_dtype = init_run(args)
    data = build_data(args)
    log_writer, wandb_logger = build_loggers(args)

    model = build_model(args, args.model)
    if args.finetune:
        load_finetune(args, model)
    model = prepare_model(args, model, device)
    prefetch_snip_batch(args, data)
    warmer = start_cache_warming(args, model, device, amp_dtype)
    precompiler = start_kernel_precompile(args, model, device, amp_dtype)
    graph_warm_up = start_graph_warm_up(args, model, device, amp_dtype, precompiler)
    model_ema = build_ema(args, model)
    model_without_ddp = model
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    save_run_text(args, 'model.txt', 'Model', str(model_without_ddp))
    num_steps = steps_per_epoch(args, data)
    model = wrap_ddp(args, model, device)

    optimizer, loss_scaler, lr_schedule_values, wd_schedule_values = build_training_objects(
        args, model_without_ddp, max(num_steps, 1))
    criterion = build_criterion(args, data.mixup_fn)
    print(f'criterion = {criterion}')

    args.max_accuracy, args.max_accuracy_ema = 0.0, 0.0
    saved_args = SavedArgs()
    mask_state = utils.auto_load_model(args=args, model=model, model_without_ddp=model_without_ddp,
                                       optimizer=optimizer, loss_scaler=loss_scaler, model_ema=model_ema,
                                       extra={'args': saved_args})
    resumed_rng = utils.get_rng_state() if args.resume else None

    if args.eval:  # the checkpoint's size in the paper's units (the original printed every tensor's density)
        print_model_size(model_without_ddp, n_parameters, args.input_size, sparse=True)
        if args.verbose:
            for name, param in model_without_ddp.named_parameters():
                print(f'{name} density is {(param != 0).float().mean().item()}')
        test_stats = evaluate(data.data_loader_val, inference_model(args, model), device, use_amp=args.use_amp,
                              amp_dtype=amp_dtype, channels_last=args.channels_last)
        print(f'Accuracy of the network on {len(data.dataset_val)} test images: {test_stats["acc1"]:.5f}%')
        return test_stats

    check_resume(args, args.resume, saved_args, mask_state)
    if mask_state is not None and not args.sparse:
        print('warning: the checkpoint holds sparse masks but --sparse is not set; training continues dense')
    mask = build_mask(args, model, optimizer, data, num_steps, log_writer, mask_state, model_ema, args.resume)
    if resumed_rng is not None:  # mask set-up may draw random numbers; a resumed run continues the saved streams
        utils.set_rng_state(resumed_rng)
    print_model_size(model_without_ddp, n_parameters, args.input_size, sparse=mask is not None)
    if args.compile:
        compile_model(args, model)
    for pending in (warmer, precompiler, graph_warm_up):
        if pending is not None:
            pending.wait()
    if device.type == 'cuda':  # progress lines then show the training peak ('max mem'), this line the set-up's
        print(f'Peak GPU memory before training: {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB')
        torch.cuda.reset_peak_memory_stats(device)
    train_forward = graph_training_forward(args, model, device, amp_dtype)  # (its memory counts in the training peak)
    log_stats = train_and_evaluate(args, model, model_without_ddp, data, criterion, optimizer, loss_scaler,
                                   lr_schedule_values, wd_schedule_values, num_steps, device, amp_dtype, model_ema,
                                   mask, log_writer, wandb_logger, n_parameters, train_forward=train_forward)
    if device.type == 'cuda':  # the footprint: what the allocator holds (CUDA graphs keep a memory pool of their own)
        print(f'Peak GPU memory reserved: {torch.cuda.max_memory_reserved(device) / 2 ** 30:.2f} GiB')
    return log_stats


def run(argv=None, parser: Optional[argparse.ArgumentParser] = None, main_fn=None) -> int:
    """Command-line entry: user errors become one ``error: ...`` line on stderr and exit code 2.

    Shared by ``main_KD.py`` (its own ``parser`` and ``main_fn``). Set ``SLAK_TRACEBACK=1`` to see the traceback.
    """
    parser = parser or argparse.ArgumentParser('SLaK training and evaluation script', parents=[get_args_parser()])
    args = parser.parse_args(argv)
    try:
        (main_fn or main)(args)
    except (ValueError, NonFiniteLossError, torch.OutOfMemoryError) as e:
        if os.environ.get('SLAK_TRACEBACK'):
            raise
        if isinstance(e, torch.OutOfMemoryError):
            message = (f'out of memory at --batch_size {args.batch_size}: lower --batch_size and raise --update_freq '
                       f'to keep the effective batch (or try --use_amp true / --grad_checkpointing true)')
        else:
            lines = [line for line in str(e).strip().splitlines() if line.strip()]
            message = lines[-1] if lines else type(e).__name__
            message = message.split('ValueError: ', 1)[-1]  # errors re-raised by DataLoader workers
        sys.stderr.write(f'error: {message}\n')  # not print(): it is silenced on non-master ranks
        return 2
    # Tear the process group down on success: a gloo group left to the interpreter's exit could abort the process
    # ("terminate called without an active exception", exit -6) after its work was done.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gc.collect()  # a DDP wrapper kept alive by reference cycles would keep the group's work objects alive
        torch.distributed.destroy_process_group()
    return 0


if __name__ == '__main__':
    sys.exit(run())
