"""Datasets and transforms: ImageNet-style folders, any image folder, CIFAR-100.

Differences from the original ``datasets.py``, on purpose:

* ``IMNET`` takes the number of classes from the class folders found under ``train/`` (the original returned 1000
  whatever the folder held). A different ``--nb_classes`` prints a note and is replaced, so ImageNet subsets and the
  bundled ``data/mnist5k`` (10 classes) train through the same path as ImageNet.
* Missing folders, class-count mismatches, val class folders other than the train ones, a missing CIFAR copy (no
  download at run time) and unreadable image files raise ``ValueError`` with a message naming the path and the flag
  to fix.
* Images are decoded by :func:`rgb_loader` (grayscale/RGBA/palette -> RGB; a corrupt file names itself).
* For ``--input_size <= 32`` evaluation ends with ``CenterCrop(input_size)`` (which pads smaller images), so 28x28
  digits are evaluated at the same 32x32 size the ``RandomCrop(32, padding=4)`` training branch produces; the
  original fed them at their native size.
* ``--aa none`` (or an empty string) disables RandAugment and ``--hflip 0`` disables the horizontal flip; the
  defaults are the original's.
* ``--gpu_pipeline true`` (``IMNET`` only): the loader workers read file bytes (:class:`EncodedImageFolder`) and
  :class:`GpuAugment` decodes and augments whole batches on the training device (:class:`DeviceBatches`). Its
  differences from timm's PIL pipeline are listed in :class:`GpuAugment`. ``--gpu_pipeline_cpu_share`` leaves a
  share of the images to the workers' PIL path (:meth:`EncodedImageFolder.decode_on_cpu`).
* Evaluation images leave the workers as uint8 and :class:`DeviceLoader` normalises them on the device (same bits).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import queue
import random
import threading
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from timm.data import create_transform
from timm.data import auto_augment as timm_auto_augment
from timm.data.auto_augment import _LEVEL_DENOM, rand_augment_transform
from timm.data.constants import (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN,
                                 IMAGENET_INCEPTION_STD)
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation, str_to_pil_interp
from torchvision import datasets, transforms
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

DATA_SETS = ('CIFAR', 'IMNET', 'image_folder', 'synthetic')


def _posterize(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize, with 0 bits kept meaning a black image (what Pillow's posterize gave before it began to refuse
    0 bits). Fixed here: timm 1.0.31's ``PosterizeIncreasing`` asks for 0 bits at magnitude 10, which the README's
    ``rand-m9-mstd0.5-inc1`` reaches (m 9 +- 0.5, clipped at 10) for ~0.15 % of training images; with Pillow 13 that
    raised ``ValueError: bits must be between or equal to 1 and 8`` in a loader worker and ended the run."""
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return _TIMM_POSTERIZE(img, bits_to_keep, **kwargs)


_TIMM_POSTERIZE = timm_auto_augment.posterize
for _name in ('Posterize', 'PosterizeIncreasing', 'PosterizeOriginal'):  # the ops timm's AutoAugment/RandAugment build
    if timm_auto_augment.NAME_TO_OP.get(_name) is _TIMM_POSTERIZE:
        timm_auto_augment.NAME_TO_OP[_name] = _posterize


def rgb_loader(path: str) -> Image.Image:
    """Open an image as RGB; an unreadable file raises ``ValueError`` naming it (not a bare PIL traceback)."""
    try:
        with open(path, 'rb') as f:
            img = Image.open(f)
            return img.convert('RGB')
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        cause = 'not an image file PIL can decode' if isinstance(e, UnidentifiedImageError) else e
        raise ValueError(f'cannot read image file {path}: {cause}; remove or replace it') from None


def _image_folder(root: str, transform, flag: str, encoded: bool = False) -> datasets.ImageFolder:
    """An ImageFolder of decoded images (``transform`` applied), or of file bytes (``encoded``, --gpu_pipeline)."""
    if not os.path.isdir(root):
        raise ValueError(f'{flag}: folder not found: {root}')
    try:
        if encoded:
            return EncodedImageFolder(root)
        return datasets.ImageFolder(root, transform=transform, loader=rgb_loader)
    except FileNotFoundError as e:  # no class folders, or class folders without images
        raise ValueError(f'{flag}: {root} holds no images in class sub-folders ({e})') from None


class SyntheticImages(torch.utils.data.Dataset):
    """``--data_set synthetic``: already-normalised random images for throughput and multi-GPU runs (no disk, no
    decoding). Item i is image ``i % bank`` of a fixed bank drawn from ``seed``, labelled ``i % nb_classes``; the
    same on every rank and every run."""

    def __init__(self, size: int, nb_classes: int, input_size: int, seed: int = 0, bank: int = 64):
        if size < 1 or nb_classes < 1:
            raise ValueError(f'--synthetic_size and --nb_classes must be >= 1; got {size}, {nb_classes}')
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.randn(min(bank, size), 3, input_size, input_size, generator=generator)
        self.size, self.nb_classes = size, nb_classes
        self.classes = [str(c) for c in range(nb_classes)]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        return self.images[index % len(self.images)], index % self.nb_classes


def build_dataset(is_train: bool, args: argparse.Namespace,
                  normalize: bool = True) -> Tuple[datasets.VisionDataset, int]:
    """Build the train (``is_train``) or validation dataset named by ``args.data_set``; returns (dataset, classes).
    ``normalize=False``: validation images stay uint8 (:func:`build_transform`) for a :class:`DeviceLoader` to
    normalise (synthetic images come normalised either way)."""
    gpu_pipeline = getattr(args, 'gpu_pipeline', False)
    if gpu_pipeline and args.data_set != 'IMNET':
        raise ValueError(f'--gpu_pipeline true reads ImageNet-style folders only (--data_set IMNET); got --data_set '
                         f'{args.data_set}: drop --gpu_pipeline')
    if args.data_set == 'synthetic':
        size = args.synthetic_size if is_train else max(args.synthetic_size // 10, 1)
        return SyntheticImages(size, args.nb_classes, args.input_size, seed=1 + int(is_train)), args.nb_classes
    transform = None
    if not gpu_pipeline:  # GpuAugment (built with the loaders) replaces the PIL transforms
        transform = build_transform(is_train, args, normalize=normalize)
        print('Transform = ')
        for t in (transform.transforms if hasattr(transform, 'transforms') else [transform]):
            print(t)
        print('---------------------------')

    if args.data_set == 'CIFAR':
        try:
            dataset = datasets.CIFAR100(args.data_path, train=is_train, transform=transform, download=False)
        except RuntimeError as e:
            raise ValueError(f'--data_path {args.data_path}: no CIFAR-100 copy found ({e}); place the extracted '
                             f'"cifar-100-python" folder there (nothing is downloaded at run time)') from None
        nb_classes = 100
    elif args.data_set == 'IMNET':
        if not os.path.isdir(args.data_path):
            raise ValueError(f'--data_path {args.data_path} does not exist; point it at a folder with train/ and val/ '
                             f'class folders (e.g. data/mnist5k from tools/prepare_default_data.py)')
        root = os.path.join(args.data_path, 'train' if is_train else 'val')
        dataset = _image_folder(root, transform, '--data_path', encoded=gpu_pipeline)
        share = getattr(args, 'gpu_pipeline_cpu_share', 0.0)
        if gpu_pipeline and share:  # that share of the images decoded and transformed by the workers, as without it
            dataset.decode_on_cpu(build_transform(is_train, args, normalize=is_train), share)
        nb_classes = len(dataset.classes)
        if nb_classes != args.nb_classes:
            print(f'note: {root} has {nb_classes} class folders; using nb_classes={nb_classes} '
                  f'instead of --nb_classes {args.nb_classes}')
    elif args.data_set == 'image_folder':
        root = args.data_path if is_train else args.eval_data_path
        flag = '--data_path' if is_train else '--eval_data_path'
        if root is None:
            raise ValueError(f'{flag} is required with --data_set image_folder')
        dataset = _image_folder(root, transform, flag)
        nb_classes = args.nb_classes
        if len(dataset.classes) != nb_classes:
            raise ValueError(f'{flag} {root} has {len(dataset.classes)} class folders but --nb_classes is '
                             f'{nb_classes}; set --nb_classes {len(dataset.classes)}')
    else:
        raise ValueError(f'--data_set must be one of {DATA_SETS}; got {args.data_set!r}')
    if len(dataset) == 0:
        raise ValueError(f'--data_path {args.data_path}: the {"train" if is_train else "val"} set is empty')
    print(f'Number of the class = {nb_classes}')
    return dataset, nb_classes


def check_same_classes(dataset_train: torch.utils.data.Dataset, dataset_val: torch.utils.data.Dataset) -> None:
    """Refuse a validation set whose classes (names, in label order) differ from the training set's.

    Labels are class indices, so val folders with other names, or another number of them, would score the model
    against permuted labels (the original accepted them and reported ~1 % accuracy). The error names the classes.
    """
    train, val = getattr(dataset_train, 'classes', None), getattr(dataset_val, 'classes', None)
    if train is None or val is None or list(train) == list(val):
        return
    train_root, val_root = getattr(dataset_train, 'root', 'the train set'), getattr(dataset_val, 'root', 'the val set')
    only_train, only_val = [c for c in train if c not in set(val)], [c for c in val if c not in set(train)]
    if not only_train and not only_val:
        raise ValueError(f'the val classes ({val_root}) are the train classes ({train_root}) in another order; labels '
                         f'would be permuted: give both sets the same class order')
    raise ValueError(f'the val classes differ from the train classes ({len(val)} in {val_root}, {len(train)} in '
                     f'{train_root}): only in train {only_train[:5]}, only in val {only_val[:5]}; labels would not '
                     f'match. Give val/ the class folders of train/ (check --data_path / --eval_data_path)')


def _auto_augment(aa):
    return None if aa is None or str(aa).strip().lower() in ('', 'none') else aa


def mean_std(args: argparse.Namespace) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """The normalisation of ``--imagenet_default_mean_and_std``."""
    if args.imagenet_default_mean_and_std:
        return IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    return IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD


def eval_resize(args: argparse.Namespace) -> Optional[List[int]]:
    """The evaluation resize: ``[s, s]`` (a warp) for ``--input_size`` >= 384, ``[int(input_size / crop_pct)]`` (the
    shorter side; ``crop_pct`` defaults to 224/256 and is written back into ``args``) above 32, None (no resize) for
    small images. A centre crop to ``input_size`` follows below 384."""
    if args.input_size <= 32:
        return None
    if args.input_size >= 384:
        return [args.input_size, args.input_size]
    if args.crop_pct is None:
        args.crop_pct = 224 / 256
    return [int(args.input_size / args.crop_pct)]


def build_transform(is_train: bool, args: argparse.Namespace, normalize: bool = True) -> transforms.Compose:
    """timm training transform / resize-crop evaluation transform of the original.

    ``normalize=False`` (evaluation only): the transform stops at uint8 (C, H, W) images (``PILToTensor``) and
    :class:`DeviceLoader` applies ``ToTensor`` + ``Normalize`` on the device, with the same bits."""
    if is_train and not normalize:
        raise ValueError('build_transform: normalize=False is for the evaluation transform only (the training '
                         'transform erases patches of the normalised images)')
    resize_im = args.input_size > 32
    mean, std = mean_std(args)

    if is_train:
        transform = create_transform(
            input_size=args.input_size,
            is_training=True,
            color_jitter=args.color_jitter,
            auto_augment=_auto_augment(args.aa),
            interpolation=args.train_interpolation,
            re_prob=args.reprob,
            re_mode=args.remode,
            re_count=args.recount,
            hflip=getattr(args, 'hflip', 0.5),
            mean=mean,
            std=std,
        )
        if not resize_im:
            # small images (CIFAR, digits): replace RandomResizedCrop by a padded random crop
            transform.transforms[0] = transforms.RandomCrop(args.input_size, padding=4)
        return transform

    t = []
    size = eval_resize(args)
    if size is not None and len(size) == 2:
        t.append(transforms.Resize(tuple(size), interpolation=transforms.InterpolationMode.BICUBIC))
        print(f'Warping {args.input_size} size input images...')
    elif size is not None:
        t.append(transforms.Resize(size[0], interpolation=transforms.InterpolationMode.BICUBIC))
    if args.input_size < 384:
        t.append(transforms.CenterCrop(args.input_size))
    if not normalize:
        t.append(transforms.PILToTensor())
        return transforms.Compose(t)
    t.append(transforms.ToTensor())
    t.append(transforms.Normalize(mean, std))
    return transforms.Compose(t)


# ---- --gpu_pipeline: decode and augment whole batches on the training device ---------------------------------------
class EncodedImageFolder(datasets.ImageFolder):
    """An ImageFolder whose items are ``(file bytes as a uint8 tensor, label, path)``: the loader workers only read
    files; :class:`GpuAugment` decodes and augments in the main process (the path names a file that fails).

    After :meth:`decode_on_cpu` (``--gpu_pipeline_cpu_share``) a share of the items, spread evenly over the indices,
    come decoded and transformed by the worker instead: ``(image (3, S, S), label, path)``, uint8 for evaluation,
    normalised float32 (timm's training transform, erasing included) for training."""

    def __init__(self, root: str):
        super().__init__(root, loader=read_bytes)
        self.cpu_transform, self.cpu_share = None, 0.0

    def decode_on_cpu(self, transform, share: float) -> None:
        """Items whose index falls in ``share`` (0 <= share < 1) are decoded by ``rgb_loader`` and ``transform``
        (:func:`build_transform`; evaluation with ``normalize=False``) in the worker."""
        if not 0.0 <= share < 1.0:
            raise ValueError(f'--gpu_pipeline_cpu_share must be in [0, 1); got {share:g}')
        self.cpu_transform, self.cpu_share = transform, share

    def on_cpu(self, index: int) -> bool:
        """Whether item ``index`` is decoded by the worker: ``floor((index + 1) * share) > floor(index * share)``,
        i.e. ``share`` of any run of consecutive indices, evenly spread."""
        return self.cpu_transform is not None and math.floor((index + 1) * self.cpu_share) > math.floor(
            index * self.cpu_share)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int, str]:
        path, target = self.samples[index]
        if self.on_cpu(index):
            return self.cpu_transform(rgb_loader(path)), target, path
        return read_bytes(path), target, path


def read_bytes(path: str) -> torch.Tensor:
    """A file's bytes as a 1-D uint8 tensor in ordinary memory. (``torchvision.io.read_file``'s tensor is mapped from
    the file and cannot be sent from a loader worker: "Bad file descriptor" when pickled.)"""
    return torch.from_numpy(np.fromfile(path, dtype=np.uint8))


def collate_encoded(batch) -> tuple:
    """One flat byte tensor and the files' lengths (one shared-memory block per batch to send from a worker, not one
    per file), the labels, the paths; :class:`DeviceBatches` splits the bytes again. Then the items that came
    decoded (:meth:`EncodedImageFolder.decode_on_cpu`) as one flat tensor of their values (empty if none) and a
    per-item mask of them: the same fields for any batch, so that slices of a batch (``utils.SplitFirstBatch``)
    join into the batch they are slices of."""
    data, targets, paths = zip(*batch)
    encoded = [d for d in data if d.dim() == 1]
    decoded = [d.reshape(-1) for d in data if d.dim() != 1]
    empty = torch.empty(0, dtype=torch.uint8)
    return (torch.cat(encoded) if encoded else empty, torch.tensor([len(d) for d in encoded], dtype=torch.int64),
            torch.tensor(targets), list(paths), torch.cat(decoded) if decoded else empty,
            torch.tensor([d.dim() != 1 for d in data]))


_JPEG_MAGIC = [0xFF, 0xD8, 0xFF]
_INTERPOLATIONS = {'bicubic': F.InterpolationMode.BICUBIC, 'bilinear': F.InterpolationMode.BILINEAR}
# timm's RandomResizedCropAndInterpolation defaults, as create_transform uses them
_RRC_SCALE, _RRC_RATIO = (0.08, 1.0), (3. / 4., 4. / 3.)
# PIL's RGB -> L weights (16-bit fixed point, rounded), for Color's and Contrast's grey image
_PIL_GREY = (19595, 38470, 7471)


def _rank_device(device: Union[str, torch.device]) -> torch.device:
    """``device`` with its index: 'cuda' alone is this rank's GPU (set by ``utils.init_distributed_mode``), which a
    helper thread or stream must name explicitly (a new thread starts on cuda:0)."""
    device = torch.device(device)
    if device.type == 'cuda' and device.index is None:
        device = torch.device('cuda', torch.cuda.current_device())
    return device


def _host_values(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A few numbers drawn on the host, as a tensor on ``device``, without waiting for the device: on CUDA through
    pinned memory (a copy from ordinary memory may wait for the kernels queued before it)."""
    tensor = torch.tensor(values, dtype=dtype)
    if torch.device(device).type != 'cuda':
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def _positions(index: Sequence[int], device: torch.device) -> torch.Tensor:
    """Batch positions as an int64 tensor on ``device``, for indexing a batch there: indexing a CUDA tensor with a
    Python list (or a CPU tensor) copies the positions with a blocking copy, a wait for every kernel queued on the
    stream (the previous step's)."""
    return _host_values(index, torch.int64, device)


def _per_image(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return _host_values(values, torch.float32, like.device).view(-1, 1, 1, 1)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """PIL's ``convert('L')`` of uint8 RGB images (N, 3, H, W) -> float (N, 1, H, W) of integers."""
    r, g, b = x.to(torch.int32).unbind(1)
    return ((r * _PIL_GREY[0] + g * _PIL_GREY[1] + b * _PIL_GREY[2] + 0x8000) >> 16).unsqueeze(1).float()


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ``Image.blend(degenerate, image, factor)`` (what ``ImageEnhance`` does): truncated, clipped to uint8."""
    return (degenerate + factor * (x.float() - degenerate)).clamp_(0, 255).to(torch.uint8)


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """PIL's ``ImageFilter.SMOOTH`` (3x3, centre 5, sum 13, rounded); the one-pixel border keeps its values."""
    kernel = torch.ones(3, 1, 3, 3, device=x.device)
    kernel[:, :, 1, 1] = 5
    inner = torch.nn.functional.conv2d(x.float(), kernel / 13, groups=3).round_().clamp_(0, 255).to(torch.uint8)
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = inner
    return out


def _pil_affine(x: torch.Tensor, matrices: Sequence[Sequence[float]], fill: torch.Tensor, mode: str) -> torch.Tensor:
    """PIL's ``Image.transform(size, AFFINE, (a, b, c, d, e, f), resample, fillcolor)`` for a batch, one matrix each.

    The output pixel centre (x + .5, y + .5) reads the input at (a x + b y + c, d x + e y + f); a point outside the
    image takes ``fill``, one inside is interpolated with the edge pixels repeated (PIL's rules). PIL's bicubic
    kernel has a = -0.5, ``grid_sample``'s a = -0.75: the only difference.
    """
    n, _, h, w = x.shape
    theta = _host_values(matrices, torch.float32, x.device).view(n, 2, 3)
    ys, xs = torch.meshgrid(torch.arange(h, device=x.device) + 0.5, torch.arange(w, device=x.device) + 0.5,
                            indexing='ij')
    centres = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1)  # (h, w, 3)
    source = torch.einsum('hwk,njk->nhwj', centres, theta)  # (n, h, w, 2) input x, y
    sx, sy = source.unbind(-1)
    inside = ((sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)).unsqueeze(1)
    grid = torch.stack([sx * (2 / w) - 1, sy * (2 / h) - 1], dim=-1)  # align_corners=False: -1/1 are the outer edges
    out = torch.nn.functional.grid_sample(x.float(), grid, mode=mode, padding_mode='border', align_corners=False)
    return torch.where(inside, out, fill).round_().clamp_(0, 255).to(torch.uint8)


def _rotate_matrix(degrees: float, w: int, h: int) -> Tuple[float, ...]:
    """PIL's ``Image.rotate(degrees)`` (counter-clockwise about the image centre, same size) as an affine matrix."""
    angle = -math.radians(degrees)
    a, b, d, e = round(math.cos(angle), 15), round(math.sin(angle), 15), round(-math.sin(angle), 15), \
        round(math.cos(angle), 15)
    cx, cy = w / 2.0, h / 2.0
    return a, b, a * -cx + b * -cy + cx, d, e, d * -cx + e * -cy + cy


def _affine_matrix(name: str, arg: float, w: int, h: int) -> Tuple[float, ...]:
    """timm's geometric RandAugment ops (``shear_x``, ``translate_x_rel``, ...) as PIL affine matrices."""
    if name == 'Rotate':
        return _rotate_matrix(arg, w, h)
    return {'ShearX': (1, arg, 0, 0, 1, 0), 'ShearY': (1, 0, 0, arg, 1, 0),
            'TranslateXRel': (1, 0, arg * w, 0, 1, 0), 'TranslateYRel': (1, 0, 0, 0, 1, arg * h)}[name]


def _enhance_degenerate(name: str, x: torch.Tensor) -> torch.Tensor:
    """The image ``ImageEnhance.<name>`` blends with: black, grey, the grey mean (rounded), or the smoothed image."""
    if name == 'Brightness':
        return torch.zeros((), device=x.device)
    if name == 'Color':
        return _grey(x)
    if name == 'Contrast':
        return (_grey(x).mean(dim=(1, 2, 3), keepdim=True) + 0.5).floor_()
    return _smooth(x).float()  # Sharpness


# timm's RandAugment op names (_RAND_TRANSFORMS, _RAND_INCREASING_TRANSFORMS) -> the op implemented here
_RAND_OPS = {name: name for name in ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'SolarizeAdd', 'ShearX', 'ShearY',
                                     'TranslateXRel', 'TranslateYRel')}
_RAND_OPS.update({'Posterize': 'Posterize', 'PosterizeIncreasing': 'Posterize', 'PosterizeOriginal': 'Posterize',
                  'Solarize': 'Solarize', 'SolarizeIncreasing': 'Solarize'})
_RAND_OPS.update({f'{name}{variant}': name for name in ('Color', 'Contrast', 'Brightness', 'Sharpness')
                  for variant in ('', 'Increasing')})


def apply_rand_op(name: str, x: torch.Tensor, args: Sequence[tuple], fill: torch.Tensor,
                  mode: str = 'bicubic') -> torch.Tensor:
    """One timm RandAugment op on uint8 images (N, 3, H, W), image i with timm's level arguments ``args[i]``.

    ``name`` is timm's op name (``_RAND_TRANSFORMS`` or the ``Increasing`` variants); ``fill`` (1, 3, 1, 1) is the
    colour geometric ops bring in; ``mode`` their interpolation. Same maths as timm's PIL ops (see :class:`GpuAugment`
    for the measured differences).
    """
    op = _RAND_OPS[name]
    if op == 'AutoContrast':
        return F.autocontrast(x)
    if op == 'Equalize':
        return F.equalize(x)
    if op == 'Invert':
        return F.invert(x)
    first = [a[0] for a in args]
    if op == 'Posterize':  # keep the top `bits` bits; 8 or more: unchanged
        masks = [(0xFF << (8 - bits)) & 0xFF if bits < 8 else 0xFF for bits in first]
        return x & _host_values(masks, torch.uint8, x.device).view(-1, 1, 1, 1)
    if op == 'Solarize':  # invert pixels >= threshold
        return torch.where(x >= _per_image(first, x), 255 - x, x)
    if op == 'SolarizeAdd':  # add to pixels below 128, clipped
        return torch.where(x < 128, (x.float() + _per_image(first, x)).clamp_(max=255).to(torch.uint8), x)
    if op in ('Color', 'Contrast', 'Brightness', 'Sharpness'):
        return _blend(_enhance_degenerate(op, x), x, _per_image(first, x))
    h, w = x.shape[-2:]
    return _pil_affine(x, [_affine_matrix(op, arg, w, h) for arg in first], fill, mode)


def _sample_level_args(op) -> tuple:
    """timm's ``AugmentOp.__call__`` after its probability draw: magnitude noise and clamp, then the op's arguments."""
    magnitude = op.magnitude
    if op.magnitude_std == float('inf'):
        magnitude = random.uniform(0, magnitude)
    elif op.magnitude_std > 0:
        magnitude = random.gauss(magnitude, op.magnitude_std)
    magnitude = max(0., min(magnitude, op.magnitude_max or _LEVEL_DENOM))
    return op.level_fn(magnitude, op.hparams) if op.level_fn is not None else ()


class GpuAugment:
    """``--gpu_pipeline``: decode a batch of encoded images and apply :func:`build_transform`'s transforms on
    ``device``, whole batches at a time (the same code runs on the CPU).

    Training: RandomResizedCrop (timm's parameter sampler, ``--train_interpolation`` with antialias), horizontal flip,
    RandAugment (timm's op list, magnitudes and probabilities, parsed by timm from ``--aa``; the ops of one layer are
    grouped over the batch) or, with ``--aa none``, torchvision's ColorJitter, normalisation, timm's RandomErasing.
    Small images (``--input_size`` <= 32) take the padded random crop instead. Evaluation: bicubic antialiased
    resize, centre crop, normalisation (:func:`eval_resize`).

    Differences from timm's PIL pipeline (the pixel-level ones are measured in tests/test_gpu_pipeline.py):

    * The decoder: nvJPEG / libjpeg-turbo through torchvision instead of PIL (a few grey levels on some pixels);
      non-JPEG files and JPEGs the batched call refuses are decoded one by one on the CPU.
    * Resizes use torch's antialiased bicubic (a few levels of difference from PIL's).
    * Rotate/Shear/Translate interpolate with ``grid_sample`` (bicubic a=-0.75 instead of PIL's -0.5).
    * Equalize and AutoContrast are torchvision's (same algorithm as PIL's; rounding differs at a few pixels).
    * The random numbers come from the main process (Python ``random`` / NumPy / torch, seeded per rank by
      ``main.py``), not from each loader worker: the same distributions, other draws.
    * Only ``rand-...`` policies; AutoAugment/AugMix policies and ``--train_interpolation random`` are refused.
    """

    def __init__(self, is_train: bool, args: argparse.Namespace, device: torch.device):
        device = _rank_device(device)
        self.is_train, self.device, self.size = is_train, device, args.input_size
        mean, std = mean_std(args)
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
        self.resize = None if is_train else eval_resize(args)
        self.rand_augment = self.color_jitter = self.random_erasing = None
        if not is_train:
            return
        if args.train_interpolation not in _INTERPOLATIONS:
            raise ValueError(f'--gpu_pipeline true supports --train_interpolation {" or ".join(_INTERPOLATIONS)}; '
                             f'got {args.train_interpolation!r}')
        self.interpolation = _INTERPOLATIONS[args.train_interpolation]
        self.hflip = getattr(args, 'hflip', 0.5)
        aa = _auto_augment(args.aa)
        if aa is not None:
            if not aa.startswith('rand'):
                raise ValueError(f'--gpu_pipeline true implements RandAugment ("rand-..." policies); got --aa {aa}: '
                                 f'use the CPU pipeline (--gpu_pipeline false) for it')
            # timm's create_transform hyper-parameters: the fill is the normalisation mean in 0-255
            img_mean = tuple(min(255, round(255 * x)) for x in mean)
            hparams = dict(translate_const=int(args.input_size * 0.45), img_mean=img_mean,
                           interpolation=str_to_pil_interp(args.train_interpolation))
            self.rand_augment = rand_augment_transform(aa, hparams)
            unknown = sorted({op.name for op in self.rand_augment.ops} - set(_RAND_OPS))
            if unknown:
                raise ValueError(f'--gpu_pipeline true has no GPU version of the RandAugment ops {unknown} of --aa '
                                 f'{aa}; use --gpu_pipeline false')
            self.fill = torch.tensor(img_mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        elif args.color_jitter:  # timm turns colour jitter off when RandAugment is on
            self.color_jitter = v2.ColorJitter(*(float(args.color_jitter),) * 3)
        if args.reprob > 0:
            self.random_erasing = RandomErasing(args.reprob, mode=args.remode, max_count=args.recount, device=device)

    def __repr__(self) -> str:
        if not self.is_train:
            return f'GpuAugment(eval, resize={self.resize}, crop={self.size if self.size < 384 else None})'
        return (f'GpuAugment(train, size={self.size}, interpolation={self.interpolation.value}, hflip={self.hflip}, '
                f'{self.rand_augment or self.color_jitter}, {self.random_erasing})')

    def __call__(self, data: Sequence[torch.Tensor], paths: Sequence[str]) -> torch.Tensor:
        """Normalised float images (N, 3, size, size) on the device from the files' bytes."""
        images = self.decode(data, paths)
        if not self.is_train:
            return self.normalize(self.eval_batch(images))
        batch = self.crop_and_flip(images)
        if self.rand_augment is not None:
            batch = self.apply_rand_augment(batch)
        elif self.color_jitter is not None:
            batch = torch.stack([self.color_jitter(image) for image in batch])
        batch = self.normalize(batch)
        return self.random_erasing(batch) if self.random_erasing is not None else batch

    def decode(self, data: Sequence[torch.Tensor], paths: Sequence[str]) -> List[torch.Tensor]:
        """RGB uint8 images (3, H, W) on the device: the JPEGs in one ``decode_jpeg`` call (nvJPEG on CUDA), the rest,
        and JPEGs that call refuses, one by one (a refused JPEG on the device, else on the CPU, like other formats).
        A file nothing decodes raises ValueError naming it."""
        images: List[Optional[torch.Tensor]] = [None] * len(data)
        jpegs = [i for i, d in enumerate(data) if d[:3].tolist() == _JPEG_MAGIC]
        try:
            for i, image in zip(jpegs, decode_jpeg([data[i] for i in jpegs], mode=ImageReadMode.RGB,
                                                   device=self.device) if jpegs else []):
                images[i] = image
        except RuntimeError:  # one bad file fails the whole call: decode each alone
            for i in jpegs:
                try:
                    images[i] = decode_jpeg(data[i], mode=ImageReadMode.RGB, device=self.device)
                except RuntimeError:
                    pass
        for i, image in enumerate(images):
            if image is None:
                try:
                    images[i] = decode_image(data[i], mode=ImageReadMode.RGB).to(self.device, non_blocking=True)
                except RuntimeError as e:
                    raise ValueError(f'cannot read image file {paths[i]}: {str(e).splitlines()[0]}; remove or replace '
                                     f'it') from None
        return images

    def merge_decoded(self, data: Sequence[torch.Tensor], paths: Sequence[str], positions: Sequence[int],
                      decoded: torch.Tensor, decoded_at: Sequence[int]) -> torch.Tensor:
        """A batch of which the loader workers decoded and transformed ``decoded`` (at positions ``decoded_at``) on
        the CPU: uint8 evaluation images, normalised here, or normalised training images, as they are. The rest
        (``data``, at ``positions``) go through this pipeline; the two are put back in batch order."""
        batch = decoded.to(self.device, non_blocking=True)
        if batch.dtype == torch.uint8:
            batch = self.normalize(batch)
        if positions:
            on_device = self(data, paths)
            merged = on_device.new_empty((len(positions) + len(decoded), *on_device.shape[1:]))
            merged[_positions(positions, self.device)] = on_device
            merged[_positions(decoded_at, self.device)] = batch.to(merged.dtype)
            batch = merged
        return batch

    def eval_batch(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """:meth:`eval_geometry` of every image, one call per distinct image size (ImageNet's validation images
        share a few sizes): fewer launches and less host time per batch, the same pixels as one call per image."""
        groups: Dict[Tuple[int, ...], List[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault(tuple(image.shape), []).append(i)
        batch = None
        for index in groups.values():
            same_size = torch.stack([images[i] for i in index]) if len(index) > 1 else images[index[0]]
            done = self.eval_geometry(same_size)
            if batch is None:
                batch = done.new_empty((len(images), *done.shape[-3:]))
            batch[_positions(index, batch.device)] = done if done.dim() == 4 else done[None]
        return batch

    def eval_geometry(self, image: torch.Tensor) -> torch.Tensor:
        """:func:`build_transform`'s evaluation resize and centre crop (padded with black if smaller)."""
        if self.resize is not None:
            image = F.resize(image, self.resize, interpolation=F.InterpolationMode.BICUBIC, antialias=True)
        return F.center_crop(image, [self.size, self.size]) if self.size < 384 else image

    def crop_and_flip(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """RandomResizedCrop with timm's parameter sampler (small images: pad 4, random crop), then the flip."""
        size, crops = self.size, []
        for image in images:
            if size <= 32:
                image = F.pad(image, [4])
                i, j = random.randint(0, image.shape[-2] - size), random.randint(0, image.shape[-1] - size)
                crops.append(image[:, i:i + size, j:j + size])
            else:
                i, j, h, w = RandomResizedCropAndInterpolation.get_params(image, _RRC_SCALE, _RRC_RATIO)
                crops.append(F.resized_crop(image, i, j, h, w, [size, size], interpolation=self.interpolation,
                                            antialias=True))
        batch = torch.stack(crops)
        flipped = [k for k in range(len(batch)) if random.random() < self.hflip]
        if flipped:
            at = _positions(flipped, batch.device)
            batch[at] = F.horizontal_flip(batch[at])
        return batch

    def apply_rand_augment(self, batch: torch.Tensor) -> torch.Tensor:
        """timm's RandAugment per image (op choice, probability, magnitude), applied layer by layer, one call per op
        over the images that drew it."""
        ra = self.rand_augment
        layers: List[Dict[str, List[Tuple[int, tuple]]]] = [{} for _ in range(ra.num_layers)]
        for k in range(len(batch)):
            chosen = np.random.choice(len(ra.ops), ra.num_layers, replace=ra.choice_weights is None,
                                      p=ra.choice_weights)
            for layer, index in enumerate(chosen):
                op = ra.ops[index]
                if op.prob < 1.0 and random.random() > op.prob:
                    continue
                layers[layer].setdefault(op.name, []).append((k, _sample_level_args(op)))
        mode = 'bicubic' if self.interpolation == F.InterpolationMode.BICUBIC else 'bilinear'
        for groups in layers:
            for name, items in groups.items():
                at = _positions([k for k, _ in items], batch.device)
                batch[at] = apply_rand_op(name, batch[at], [a for _, a in items], self.fill, mode)
        return batch

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """ToTensor + Normalize: uint8 -> float, (x / 255 - mean) / std."""
        return (batch.float() - self.mean) / self.std


class DeviceBatches:
    """A DataLoader of :class:`EncodedImageFolder` batches, seen as ``(images, targets)`` already on the device, so
    ``engine``'s loops (and SNIP's first batch) take it as a DataLoader; ``len``, ``sampler``, ``dataset`` pass
    through. Over a ``utils.FirstBatchShared`` loader, ``first_batch()`` is SNIP's scoring batch, decoded and
    augmented once: epoch 0 starts with that very batch and the workers that read it keep running."""

    def __init__(self, loader: torch.utils.data.DataLoader, augment: GpuAugment):
        self.loader, self.augment = loader, augment
        self.sampler, self.dataset = loader.sampler, loader.dataset
        self._first = None  # (the loader's first batch, as read; the same augmented)

    def __len__(self) -> int:
        return len(self.loader)

    def _on_device(self, batch) -> Tuple[torch.Tensor, torch.Tensor]:
        flat, lengths, targets, paths, *decoded = batch
        targets = targets.to(self.augment.device, non_blocking=True)
        on_cpu = decoded[1].tolist() if decoded else []
        if not any(on_cpu):
            return self.augment(flat.split(lengths.tolist()), paths), targets
        # --gpu_pipeline_cpu_share: the images the workers decoded, and where they go
        at = [k for k, cpu in enumerate(on_cpu) if cpu]
        rest = [k for k, cpu in enumerate(on_cpu) if not cpu]
        images = decoded[0].view(len(at), 3, self.augment.size, self.augment.size)
        return self.augment.merge_decoded(flat.split(lengths.tolist()), [paths[k] for k in rest], rest, images,
                                          at), targets

    def first_batch(self) -> Tuple[torch.Tensor, torch.Tensor]:
        take = getattr(self.loader, 'first_batch', None)
        if take is None:  # a plain DataLoader: a batch of a pass of its own
            return next(iter(self))
        raw = take()
        if self._first is None or self._first[0] is not raw:
            self._first = (raw, self._on_device(raw))
        return self._first[1]

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        if not getattr(self.augment, 'is_train', True):
            yield from self._prepared_ahead()
            return
        first, self._first = self._first, None
        for batch in self.loader:
            yield first[1] if first is not None and batch is first[0] else self._on_device(batch)
            first = None

    def _prepared_ahead(self, ahead: int = 1) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """Evaluation batches decoded and resized by a helper thread (on CUDA on a stream of its own), up to
        ``ahead`` + 1 batches before the model takes them: the decoder's host wait (``decode_jpeg`` on CUDA waits
        for its own stream) and the per-image resizes then overlap the model's batch instead of following it. The
        same batches in the same order (evaluation draws no random numbers); the thread's errors are raised here."""
        device = self.augment.device
        cuda = device.type == 'cuda'
        ready: queue.Queue = queue.Queue(maxsize=ahead)
        stop = threading.Event()
        done = object()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        def work() -> None:
            try:
                if cuda:  # (a new thread's current device is cuda:0; a rank's device may be another)
                    torch.cuda.set_device(device)
                stream = torch.cuda.Stream(device) if cuda else None
                for batch in self.loader:
                    with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
                        images, targets = self._on_device(batch)
                        event = stream.record_event() if cuda else None
                    if not put((images, targets, event)):
                        return
                put(done)
            except BaseException as e:  # (raised again in the consumer's thread)
                put(e)

        thread = threading.Thread(target=work, name='DeviceBatches-eval', daemon=True)
        thread.start()
        try:
            while True:
                item = ready.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                images, targets, event = item
                if cuda:  # the batch was made on the helper's stream; it is used and freed on this one
                    compute = torch.cuda.current_stream(device)
                    compute.wait_event(event)
                    images.record_stream(compute)
                    targets.record_stream(compute)
                yield images, targets
        finally:
            stop.set()
            thread.join()


class DeviceLoader:
    """A loader of ``(images, targets)`` on the CPU, seen with both on ``device``, so ``engine.evaluate`` finds its
    batches there. Exact: the same numbers as ``.to(device)`` of the batches as loaded.

    * On CUDA each batch is copied on a side stream: the copy of the next batch overlaps the kernels still queued
      for this one (copied on the compute stream, as ``engine`` did, it waits for them: ~115 MB of float32 images
      per evaluation batch of 192, a few ms at the host link's rate, idle for the kernels).
    * ``mean_std``: the images arrive as uint8 (:func:`build_transform` with ``normalize=False``: a quarter of the
      bytes to pin and copy, and the workers skip the float conversion) and become what ``ToTensor`` +
      ``Normalize(mean, std)`` give, on the device: ``x.float() / 255``, then ``- mean``, then ``/ std`` per channel,
      in float32, the same operations in the same order (the same bits: a CPU test compares them).

    ``len``, ``sampler`` and ``dataset`` are the loader's, and so are ``first_batch`` and ``prefetch`` where it has
    them (``utils.FirstBatchShared``: SNIP's batch, as loaded, on the CPU).
    """

    def __init__(self, loader, device: torch.device,
                 mean_std: Optional[Tuple[Sequence[float], Sequence[float]]] = None):
        self.loader, self.device = loader, _rank_device(device)
        self.sampler, self.dataset = getattr(loader, 'sampler', None), getattr(loader, 'dataset', None)
        self.mean_std = mean_std
        self._stream = None
        self._constants = None  # 255, mean, std as (1, C, 1, 1) float32 tensors on the device

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str):
        loader = self.__dict__.get('loader')
        if loader is not None and name in ('first_batch', 'prefetch'):  # (AttributeError where the loader has none)
            return getattr(loader, name)
        raise AttributeError(f'{type(self).__name__!r} object has no attribute {name!r}')

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        if self._constants is None:  # (255 as a device tensor: CUDA divides by a host scalar as a product with its
            # reciprocal, which differs from the division in the last bit for some pixels)
            self._constants = tuple(torch.as_tensor(v, dtype=torch.float32).view(1, -1, 1, 1).to(self.device)
                                    for v in ((255.,), *self.mean_std))
        scale, mean, std = self._constants
        return images.to(torch.float32).div_(scale).sub_(mean).div_(std)

    def _on_device(self, images: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.device.type != 'cuda':
            images, targets = images.to(self.device), targets.to(self.device)
        else:
            if self._stream is None:
                self._stream = torch.cuda.Stream(self.device)
            compute = torch.cuda.current_stream(self.device)
            with torch.cuda.stream(self._stream):
                images, targets = (images.to(self.device, non_blocking=True),
                                   targets.to(self.device, non_blocking=True))
            compute.wait_stream(self._stream)
            for tensor in (images, targets):  # made on the side stream, used and freed on the compute stream
                tensor.record_stream(compute)
        if self.mean_std is not None:
            if images.dtype != torch.uint8:
                raise ValueError(f'DeviceLoader(mean_std=...) normalises uint8 images; the loader gave '
                                 f'{images.dtype} (build the dataset with normalize=False)')
            images = self._normalize(images)
        return images, targets

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.loader:
            yield self._on_device(batch[0], batch[-1])
