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
"""
from __future__ import annotations

import argparse
import os
from typing import Tuple

import torch
from PIL import Image, UnidentifiedImageError
from timm.data import create_transform
from timm.data.constants import (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN,
                                 IMAGENET_INCEPTION_STD)
from torchvision import datasets, transforms

DATA_SETS = ('CIFAR', 'IMNET', 'image_folder', 'synthetic')


def rgb_loader(path: str) -> Image.Image:
    """Open an image as RGB; an unreadable file raises ``ValueError`` naming it (not a bare PIL traceback)."""
    try:
        with open(path, 'rb') as f:
            img = Image.open(f)
            return img.convert('RGB')
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        cause = 'not an image file PIL can decode' if isinstance(e, UnidentifiedImageError) else e
        raise ValueError(f'cannot read image file {path}: {cause}; remove or replace it') from None


def _image_folder(root: str, transform, flag: str) -> datasets.ImageFolder:
    if not os.path.isdir(root):
        raise ValueError(f'{flag}: folder not found: {root}')
    try:
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


def build_dataset(is_train: bool, args: argparse.Namespace) -> Tuple[datasets.VisionDataset, int]:
    """Build the train (``is_train``) or validation dataset named by ``args.data_set``; returns (dataset, classes)."""
    if args.data_set == 'synthetic':
        size = args.synthetic_size if is_train else max(args.synthetic_size // 10, 1)
        return SyntheticImages(size, args.nb_classes, args.input_size, seed=1 + int(is_train)), args.nb_classes
    transform = build_transform(is_train, args)
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
        dataset = _image_folder(root, transform, '--data_path')
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


def build_transform(is_train: bool, args: argparse.Namespace) -> transforms.Compose:
    """timm training transform / resize-crop evaluation transform of the original."""
    resize_im = args.input_size > 32
    imagenet_default_mean_and_std = args.imagenet_default_mean_and_std
    mean = IMAGENET_DEFAULT_MEAN if imagenet_default_mean_and_std else IMAGENET_INCEPTION_MEAN
    std = IMAGENET_DEFAULT_STD if imagenet_default_mean_and_std else IMAGENET_INCEPTION_STD

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
    if resize_im:
        if args.input_size >= 384:
            t.append(transforms.Resize((args.input_size, args.input_size),
                                       interpolation=transforms.InterpolationMode.BICUBIC))
            print(f'Warping {args.input_size} size input images...')
        else:
            if args.crop_pct is None:
                args.crop_pct = 224 / 256
            size = int(args.input_size / args.crop_pct)
            t.append(transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC))
            t.append(transforms.CenterCrop(args.input_size))
    else:
        t.append(transforms.CenterCrop(args.input_size))
    t.append(transforms.ToTensor())
    t.append(transforms.Normalize(mean, std))
    return transforms.Compose(t)
