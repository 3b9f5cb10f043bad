"""Aggregated contribution-score matrix of a model's last feature map (the effective receptive field, ERF).

For each image the score is s = sum_c ReLU(out[:, c, H//2, W//2]) on the last stage's feature map ``out``; the
image's map is the ReLU of ds/dx summed over the batch and the input channels. The maps are averaged over
``--num_images`` images (images whose map holds NaN/Inf are skipped with a message) and saved with ``np.save``.
The method is RepLKNet's, used by SLaK for Figure 3; ``analyze_erf.py`` turns the matrix into area ratios and a heatmap.

Fixed against the original: the SLaK wrapper returned the pooled vector (crash); the feature
map now comes from SLaK's ``forward_features`` (timm's convention: the stage-4 map) and, for other timm models, from
``forward_intermediates``; the ``SLaK`` alias used stage-4 kernel 7 instead of the trained 13;
the 50 images were all from the first class folder, now they are spread over the whole folder; ResNets no longer need
a model copy and nothing is downloaded; weights load strictly with a one-line error naming mismatched keys, and only
with ``weights_only=True`` (``SLaK.load_checkpoint_file``: the original unpickled everything, so a crafted file ran
code); unreadable images and an unwritable ``--save_path`` (checked before the work) are one-line errors too.

Example::

    python erf/visualize_erf.py --model SLaK_tiny --kernel_size 51 49 47 13 5 --width_factor 1.3 --Decom true \\
        --weights SLaK_tiny_checkpoint.pth --data_path /path/to/imagenet-1k --save_path SLaK_tiny_erf.npy
"""
import argparse
import functools
import importlib.util
import os
import sys
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import matplotlib.cbook
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import timm  # noqa: E402
import torchvision  # noqa: E402
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # noqa: E402

import SLaK  # noqa: E402  (also registers the SLaK_* models with timm)
from datasets import rgb_loader  # noqa: E402
from erf.analyze_erf import run_cli, write_output  # noqa: E402
from utils import make_writable_dir, str2bool  # noqa: E402

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')

# Aliases kept from the original script. 'SLaK' is SLaK-T as trained (the original had stage-4 kernel 7, not 13).
MODEL_ALIASES = {
    'SLaK': dict(name='SLaK_tiny', kernel_size=[51, 49, 47, 13, 5], width_factor=1.3),
    'ConvNeXt': dict(name='SLaK_tiny', kernel_size=[7, 7, 7, 7, 100], width_factor=1.0, Decom=False),
}

# Real photographs that ship inside installed packages, used when no --data_path is given (nothing is downloaded).
# matplotlib's sample data holds one photo; its other images are clip art, a logo and raw MRI data. scikit-image
# (optional) bundles these photographs; the rest of its data folder is synthetic, microscopy or text scans.
SKIMAGE_PHOTOS = ('astronaut.png', 'brick.png', 'camera.png', 'chelsea.png', 'coffee.png', 'coins.png', 'grass.png',
                  'gravel.png', 'hubble_deep_field.jpg', 'moon.png', 'motorcycle_left.png', 'rocket.jpg')

FeatureFn = Callable[[torch.Tensor], torch.Tensor]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('Aggregated contribution-score matrix (effective receptive field)')
    parser.add_argument('--model', default='resnet101', type=str,
                        help='SLaK_tiny/_small/_base/_large, the aliases SLaK (SLaK-T 51-49-47-13-5, width 1.3; add '
                             '--Decom true for the released SLaK-T) and ConvNeXt (SLaK_tiny 7-7-7-7-100), a '
                             'torchvision ResNet (resnet50, resnet101, ...) or any timm model with '
                             'forward_intermediates')
    parser.add_argument('--weights', default=None, type=str,
                        help='local checkpoint (keys model / state_dict / model_ema are unwrapped); '
                             'default: random init')
    parser.add_argument('--data_path', default=None, type=str,
                        help='ImageFolder root (DIR/val is used if it exists) or any folder of images; '
                             'default: photos bundled with matplotlib (and scikit-image if installed)')
    parser.add_argument('--save_path', default='temp.npy', type=str, help='where to np.save the averaged matrix')
    parser.add_argument('--num_images', default=50, type=int, help='images to average over')
    parser.add_argument('--input_size', default=1024, type=int, help='images are resized to input_size x input_size')
    parser.add_argument('--kernel_size', default=None, type=int, nargs=5,
                        help='SLaK models: 4 stage kernels + small kernel (default 51 49 47 13 5)')
    parser.add_argument('--width_factor', default=None, type=float,
                        help='SLaK models: channel multiplier (default 1.0)')
    parser.add_argument('--Decom', default=None, type=str2bool,
                        help='SLaK models: decomposed LoRA kernels (default false)')
    parser.add_argument('--bn', default=True, type=str2bool, help='SLaK models: BN after each conv branch')
    parser.add_argument('--eval_folded', default=True, type=str2bool,
                        help='SLaK models: run folded (branches and BNs merged into one or two kernels per block; the '
                             'same function, faster); false runs the training form')
    parser.add_argument('--layer_scale_init_value', default=1e-6, type=float,
                        help='SLaK models: initial layer scale; irrelevant with --weights. Randomly initialised '
                             'blocks are near-identity with 1e-6, so use 1.0 to see a random net\'s kernel sizes')
    parser.add_argument('--seed', default=0, type=int, help='seed of the random initialisation (without --weights)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', type=str,
                        help='cpu or cuda (default: cuda when available)')
    return parser


# ---- models ---------------------------------------------------------------------------------------------------------
def resnet_feature_map(model: torchvision.models.ResNet, x: torch.Tensor) -> torch.Tensor:
    """Output of ``layer4`` of a torchvision ResNet, computed with the model's own submodules (no pooling/fc)."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    return model.layer4(model.layer3(model.layer2(model.layer1(x))))


def last_intermediate(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Last entry of timm's ``forward_intermediates``: an NCHW map for CNNs and ViTs alike (whose
    ``forward_features`` returns tokens)."""
    try:
        return model.forward_intermediates(x, intermediates_only=True)[-1]
    except NotImplementedError as e:
        raise ValueError(f'exposes no spatial feature map (forward_intermediates: {e})') from e


def _is_torchvision_resnet(name: str) -> bool:
    return (name.startswith(('resnet', 'resnext', 'wide_resnet'))
            and name in torchvision.models.list_models(module=torchvision.models))


def build_model(args: argparse.Namespace) -> Tuple[nn.Module, FeatureFn]:
    """The model named by ``--model`` (random init, eval mode) and the function giving its last feature map.

    SLaK flags given explicitly override an alias's settings. Nothing is downloaded: torchvision and timm models are
    built without pretrained weights; use ``--weights`` for a local checkpoint.
    """
    name = args.model
    slak_cfg = dict(kernel_size=[51, 49, 47, 13, 5], width_factor=1.0, Decom=False)
    if name in MODEL_ALIASES:
        slak_cfg.update(MODEL_ALIASES[name])
        name = slak_cfg.pop('name')
    explicit = dict(kernel_size=args.kernel_size, width_factor=args.width_factor, Decom=args.Decom)
    is_slak = name.startswith('SLaK_') and timm.is_model(name)
    if not is_slak and any(v is not None for v in explicit.values()):
        raise ValueError(f'--kernel_size, --width_factor and --Decom only apply to SLaK models; got --model {name}')
    slak_cfg.update({k: v for k, v in explicit.items() if v is not None})

    if is_slak:
        model = timm.create_model(name, pretrained=False, drop_path_rate=0.,
                                  layer_scale_init_value=args.layer_scale_init_value, bn=args.bn, **slak_cfg)
        feature_fn = model.forward_features  # timm convention: the stage-4 map, before pooling and norm
    elif _is_torchvision_resnet(name):
        model = torchvision.models.get_model(name, weights=None)
        feature_fn = functools.partial(resnet_feature_map, model)
    elif timm.is_model(name):
        model = timm.create_model(name, pretrained=False)
        if not hasattr(model, 'forward_intermediates'):
            raise ValueError(f'model {name} exposes no spatial feature map (it has no forward_intermediates)')
        feature_fn = functools.partial(last_intermediate, model)
    else:
        raise ValueError(f'unknown --model {name!r}: use SLaK_tiny/_small/_base/_large, SLaK, ConvNeXt, a torchvision '
                         f'ResNet (e.g. resnet101) or a timm model name')
    if args.weights is not None:
        # the classifier plays no part in the feature map: a checkpoint trained on other classes loads too
        SLaK.load_checkpoint(model, args.weights, strict=True, keys=('model', 'state_dict', 'model_ema'),
                             ignore=('head.', 'fc.'))
    model.eval()
    if is_slak and args.eval_folded:
        model.reparameterize(decomposed=True)  # in place: feature_fn is bound to this model
    model.requires_grad_(False)  # only the input's gradient is needed
    return model, feature_fn


# ---- images ---------------------------------------------------------------------------------------------------------
def bundled_photos() -> List[str]:
    """Paths of real photos shipped inside installed packages (matplotlib always; scikit-image when installed)."""
    paths = [str(matplotlib.cbook.get_sample_data('grace_hopper.jpg', asfileobj=False))]
    spec = importlib.util.find_spec('skimage')
    if spec is not None and spec.submodule_search_locations:
        data_dir = os.path.join(spec.submodule_search_locations[0], 'data')
        paths += [os.path.join(data_dir, f) for f in SKIMAGE_PHOTOS if os.path.isfile(os.path.join(data_dir, f))]
    return paths


def find_images(root: str) -> List[str]:
    """All image files under ``root`` (recursive, sorted: class folders in ImageFolder order, then file names)."""
    paths = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        paths += [os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS)]
    return paths


def select_images(data_path: Optional[str], num_images: int) -> List[str]:
    """``num_images`` image paths spread evenly over the sorted folder (or all bundled photos when fewer).

    Even striding over the sorted list visits every part of an ImageFolder: for ImageNet val (50 images a class) the
    default 50 images come from 50 classes 20 apart, not all from the first class as in the original.
    """
    if num_images < 1:
        raise ValueError(f'--num_images must be >= 1; got {num_images}')
    if data_path is None:
        paths = bundled_photos()
    else:
        if not os.path.isdir(data_path):
            raise ValueError(f'--data_path {data_path} is not a directory; pass an ImageFolder root or image folder')
        if os.path.isdir(os.path.join(data_path, 'val')):
            data_path = os.path.join(data_path, 'val')
        paths = find_images(data_path)
        if not paths:
            raise ValueError(f'--data_path {data_path} holds no images ({", ".join(IMAGE_EXTENSIONS)}), '
                             f'searched recursively')
    if num_images >= len(paths):
        return paths
    return [paths[i * len(paths) // num_images] for i in range(num_images)]


def load_images(paths: Sequence[str], input_size: int) -> Iterable[torch.Tensor]:
    """Each image resized to (input_size, input_size) bicubic and ImageNet-normalised, as a (3, H, W) tensor."""
    transform = transforms.Compose([
        transforms.Resize((input_size, input_size), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
    for path in paths:
        yield transform(rgb_loader(path))  # an unreadable image is a ValueError naming it


# ---- contribution scores --------------------------------------------------------------------------------------------
def contribution_map(feature_fn: FeatureFn, images: torch.Tensor) -> torch.Tensor:
    """ReLU of d(sum_c ReLU(out[:, c, H//2, W//2]))/d(images), summed over batch and input channels -> (H_in, W_in)."""
    x = images.detach().requires_grad_(True)
    try:
        out = feature_fn(x)
    except (RuntimeError, AssertionError) as e:  # e.g. a ViT built for 224 given another --input_size
        raise ValueError(f'forward pass failed on a {tuple(x.shape)} input ({e}); check --input_size') from e
    if not isinstance(out, torch.Tensor) or out.dim() != 4:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f'exposes no spatial feature map: its last feature output is {shape}, not (N, C, H, W)')
    h, w = out.shape[-2:]
    score = F.relu(out[:, :, h // 2, w // 2]).sum()
    grad, = torch.autograd.grad(score, x, allow_unused=True)
    if grad is None:
        return torch.zeros(x.shape[-2:], dtype=x.dtype, device=x.device)
    return F.relu(grad).sum(dim=(0, 1))


def aggregate_contributions(feature_fn: FeatureFn, images: Iterable[torch.Tensor], device: torch.device,
                            total: Optional[int] = None) -> Tuple[np.ndarray, int]:
    """Mean contribution map over ``images`` (one at a time) and the number of images used.

    Maps with NaN/Inf (e.g. overflow in a half-trained net) are skipped with a message, as in the original.
    """
    try:
        from tqdm import tqdm
        progress = tqdm(total=total, desc='images', unit='img')
    except ImportError:
        progress = None
    running_sum, used = None, 0
    try:
        for index, image in enumerate(images):
            scores = contribution_map(feature_fn, image.unsqueeze(0).to(device)).double().cpu().numpy()
            if not np.isfinite(scores).all():
                print(f'image {index}: contribution map holds NaN/Inf, skipped')
            else:
                running_sum = scores if running_sum is None else running_sum + scores
                used += 1
            if progress is not None:
                progress.update(1)
            else:
                print(f'image {index + 1}/{total if total is not None else "?"}', flush=True)
    finally:
        if progress is not None:
            progress.close()  # ends the bar's line so that an error message starts on its own line
    if used == 0:
        raise ValueError('every image gave a NaN/Inf contribution map; check --weights')
    return running_sum / used, used


def main(args: argparse.Namespace) -> None:
    if args.input_size < 32:
        raise ValueError(f'--input_size must be >= 32 (models downsample 32x); got {args.input_size}')
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        raise ValueError('--device cuda requested but no GPU is available; use --device cpu')
    device = torch.device(args.device)
    make_writable_dir(os.path.dirname(os.path.abspath(args.save_path)), "--save_path's folder")  # before the work
    paths = select_images(args.data_path, args.num_images)
    torch.manual_seed(args.seed)
    model, feature_fn = build_model(args)
    model.to(device)
    print(f'{args.model}: averaging contribution maps over {len(paths)} images at {args.input_size}x{args.input_size}')
    try:
        mean_map, used = aggregate_contributions(feature_fn, load_images(paths, args.input_size), device, len(paths))
    except ValueError as e:
        raise ValueError(f'model {args.model}: {e}') from e
    write_output(args.save_path, '--save_path', lambda path: np.save(path, mean_map.astype(np.float32)))
    print(f'saved the mean of {used} contribution maps {mean_map.shape} to {args.save_path}')


if __name__ == '__main__':
    sys.exit(run_cli(main, get_args_parser()))
