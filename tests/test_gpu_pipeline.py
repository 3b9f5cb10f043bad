"""``--gpu_pipeline`` (datasets.GpuAugment, EncodedImageFolder, DeviceBatches) against timm's PIL pipeline, on the CPU.

Tolerances are in grey levels (0-255) for uint8 images and in normalised units for model inputs; each was measured
on this fixture and is stated next to its assertion.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from timm.data import auto_augment as timm_aa
from timm.data.transforms import RandomResizedCropAndInterpolation

import datasets
import main

# (width, height) of the JPEGs: landscape, portrait, square, smaller than the 64 px crop
SIZES = [(120, 90), (90, 130), (100, 100), (56, 48)]
FILL = (124, 116, 104)  # timm's RandAugment fill for the ImageNet mean (create_transform's img_mean)


def natural_image(w: int, h: int, seed: int) -> Image.Image:
    """Smooth colour fields with noise: JPEG-like content whose resizes and ops are not trivially exact."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(5, 6, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((w, h), Image.BICUBIC).filter(ImageFilter.GaussianBlur(1))
    noisy = np.asarray(img).astype(np.int16) + rng.integers(-20, 21, size=(h, w, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    """train/ and val/ with two classes: JPEGs of SIZES, a grey JPEG and a PNG (decoded on the CPU)."""
    root = tmp_path_factory.mktemp('jpegs')
    seed = 0
    for split in ('train', 'val'):
        for label in ('a', 'b'):
            os.makedirs(root / split / label)
            for k, (w, h) in enumerate(SIZES):
                seed += 1
                natural_image(w, h, seed).save(root / split / label / f'{k}.JPEG', quality=90)
    natural_image(70, 60, 100).convert('L').save(root / 'train' / 'a' / 'grey.JPEG', quality=90)
    natural_image(80, 64, 101).save(root / 'train' / 'b' / 'lossless.png')
    return str(root)


def _args(**kw) -> argparse.Namespace:
    args = main.get_args_parser().parse_args([])
    args.input_size, args.gpu_pipeline = 64, True
    for key, value in kw.items():
        setattr(args, key, value)
    return args


def _encoded(folder: str, split: str = 'train'):
    dataset = datasets.EncodedImageFolder(os.path.join(folder, split))
    flat, lengths, targets, paths = datasets.collate_encoded([dataset[i] for i in range(len(dataset))])[:4]
    return list(flat.split(lengths.tolist())), targets, paths


def _chw(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert('RGB')).copy()).permute(2, 0, 1)


def test_decode_matches_pil_png_and_grey_included(folder):
    data, targets, paths = _encoded(folder)
    assert len(data) == 10 and data[0].dtype == torch.uint8 and data[0].dim() == 1
    assert any(p.endswith('.png') for p in paths) and targets.tolist() == [0] * 5 + [1] * 5
    images = datasets.GpuAugment(False, _args(), torch.device('cpu')).decode(data, paths)
    for image, path in zip(images, paths):
        reference = _chw(datasets.rgb_loader(path))
        assert image.shape == reference.shape and image.dtype == torch.uint8
        # CPU: torchvision's libjpeg-turbo and PIL's give the same pixels here (measured 0); nvJPEG on CUDA differs
        # by about one level, within this bound
        assert (image.float() - reference.float()).abs().mean() < 1.0, path


def test_corrupt_files_are_named(folder, tmp_path):
    data, _, paths = _encoded(folder)
    garbage = tmp_path / 'garbage.JPEG'
    garbage.write_bytes(b'not an image at all' * 10)
    truncated = tmp_path / 'truncated.JPEG'  # JPEG magic, then nothing usable: the batched call fails, then this one
    truncated.write_bytes(open(paths[0], 'rb').read()[:40])
    augment = datasets.GpuAugment(False, _args(), torch.device('cpu'))
    for bad in (garbage, truncated):
        with pytest.raises(ValueError, match=f'cannot read image file {bad}: .*remove or replace it'):
            augment.decode(data[:3] + [torch.from_numpy(np.fromfile(bad, dtype=np.uint8))], paths[:3] + [str(bad)])


@pytest.mark.parametrize('input_size, crop_pct', [(64, None), (64, 0.95), (384, None)])
def test_eval_batch_matches_build_transform(folder, input_size, crop_pct):
    args = _args(input_size=input_size, crop_pct=crop_pct)
    data, _, paths = _encoded(folder, 'val')
    batch = datasets.GpuAugment(False, args, torch.device('cpu'))(data, paths)
    reference = datasets.build_transform(False, _args(input_size=input_size, crop_pct=crop_pct))
    expected = torch.stack([reference(datasets.rgb_loader(p)) for p in paths])
    assert batch.shape == expected.shape == (len(paths), 3, input_size, input_size)
    # torch's antialiased bicubic (uint8 on the CPU) vs PIL's: measured mean < 1e-4, max 0.035 (two grey levels);
    # the bound leaves room for the float path on CUDA
    diff = (batch - expected).abs()
    assert diff.mean() < 0.02 and diff.max() < 0.2


def _record_crops(monkeypatch) -> dict:
    """Record timm's crop sampler's (h, w, scale, ratio) into ``sink['to']``, a list the caller swaps."""
    original, sink = RandomResizedCropAndInterpolation.get_params, {'to': []}

    def recording(img, scale, ratio):
        i, j, h, w = original(img, scale, ratio)
        sink['to'].append((h, w, scale, ratio))
        return i, j, h, w
    monkeypatch.setattr(RandomResizedCropAndInterpolation, 'get_params', staticmethod(recording))
    return sink


def test_train_crop_and_flip_follow_timm(folder, monkeypatch):
    args = _args(aa='none', reprob=0, color_jitter=0)
    augment = datasets.GpuAugment(True, args, torch.device('cpu'))
    image = natural_image(120, 90, 7)
    ours, theirs, flips = [], [], []
    original_flip = datasets.F.horizontal_flip
    monkeypatch.setattr(datasets.F, 'horizontal_flip', lambda x: flips.append(len(x)) or original_flip(x))
    sink = _record_crops(monkeypatch)
    sink['to'] = ours
    random.seed(0)
    batch = None
    for _ in range(10):
        batch = augment.crop_and_flip([_chw(image)] * 200)
    assert batch.shape == (200, 3, 64, 64) and batch.dtype == torch.uint8
    sink['to'] = theirs
    timm_crop = datasets.build_transform(True, args).transforms[0]
    assert isinstance(timm_crop, RandomResizedCropAndInterpolation)
    random.seed(1)
    for _ in range(2000):
        timm_crop(image)
    assert len(ours) == len(theirs) == 2000 and ours[0][2:] == theirs[0][2:] == ((0.08, 1.0), (3 / 4, 4 / 3))
    for stat in (lambda h, w: h * w / (120 * 90), lambda h, w: math.log(w / h)):
        a = np.quantile([stat(h, w) for h, w, *_ in ours], [0.1, 0.25, 0.5, 0.75, 0.9])
        b = np.quantile([stat(h, w) for h, w, *_ in theirs], [0.1, 0.25, 0.5, 0.75, 0.9])
        assert np.abs(a - b).max() < 0.06, (a, b)  # 2,000 draws each: quantiles agree to a few hundredths
    assert 0.45 < sum(flips) / 2000 < 0.55


def test_train_batch_shape_range_and_erasing(folder):
    data, _, paths = _encoded(folder)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    low, high = (-mean / std).view(1, 3, 1, 1), ((1 - mean) / std).view(1, 3, 1, 1)
    random.seed(0)
    plain = datasets.GpuAugment(True, _args(aa='none', reprob=0), torch.device('cpu'))(data, paths)
    assert plain.shape == (10, 3, 64, 64) and plain.dtype == torch.float32
    assert (plain >= low - 1e-5).all() and (plain <= high + 1e-5).all()
    torch.manual_seed(0)
    full = datasets.GpuAugment(True, _args(reprob=1.0), torch.device('cpu'))(data, paths)  # RandAugment + erasing
    assert full.shape == (10, 3, 64, 64) and torch.isfinite(full).all()
    outside = (full < low - 1e-5) | (full > high + 1e-5)  # per-pixel normal noise leaves the image range
    assert outside.flatten(1).any(dim=1).all()


# every op of timm's RandAugment lists, with timm's level arguments at magnitude 9 (both signs for the signed ones)
OPS = timm_aa._RAND_INCREASING_TRANSFORMS + ['Posterize', 'Solarize', 'Color', 'Contrast', 'Brightness', 'Sharpness']
# mean / max |ours - timm's PIL op| in grey levels; geometric ops interpolate with grid_sample's bicubic (a=-0.75)
# instead of PIL's (a=-0.5): measured mean 0.33-0.70, max 5; every other op is measured exact here
GEOMETRIC = {'Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel'}


@pytest.mark.parametrize('name', OPS)
@pytest.mark.parametrize('sign', [1, -1])
def test_rand_augment_op_matches_timm(name, sign):
    hparams = dict(translate_const=28, img_mean=FILL, interpolation=Image.BICUBIC)
    op = timm_aa.AugmentOp(name, prob=1.0, magnitude=9, hparams=hparams)
    random.seed(0 if sign == 1 else 3)  # _randomly_negate draws the sign: seeds 0 and 3 give the two signs
    args = op.level_fn(9, hparams) if op.level_fn is not None else ()
    image = natural_image(96, 72, 11)
    expected = _chw(op.aug_fn(image, *args, **op.kwargs)).float()
    fill = torch.tensor(FILL, dtype=torch.float32).view(1, 3, 1, 1)
    got = datasets.apply_rand_op(name, _chw(image)[None], [args], fill)[0].float()
    diff = (got - expected).abs()
    if name in GEOMETRIC:
        assert diff.mean() < 1.0 and diff.max() <= 8, (args, diff.mean(), diff.max())
    else:
        assert diff.max() == 0, (args, diff.mean(), diff.max())


def test_rand_augment_factors_below_one_and_grouped_batches():
    """Blends towards the degenerate image (factor < 1) and one call over images with different arguments."""
    images = [natural_image(64, 64, s) for s in range(3)]
    batch = torch.stack([_chw(i) for i in images])
    fill = torch.tensor(FILL, dtype=torch.float32).view(1, 3, 1, 1)
    for name in ('Color', 'Contrast', 'Brightness', 'Sharpness', 'Solarize', 'Posterize', 'ShearX'):
        hparams = dict(translate_const=28, img_mean=FILL, interpolation=Image.BICUBIC)
        op = timm_aa.AugmentOp(name, prob=1.0, magnitude=9, hparams=hparams)
        args = [op.level_fn(m, hparams) for m in (3, 5, 9)]
        got = datasets.apply_rand_op(name, batch.clone(), args, fill).float()
        expected = torch.stack([_chw(op.aug_fn(i, *a, **op.kwargs)) for i, a in zip(images, args)]).float()
        assert (got - expected).abs().mean() < (1.0 if name == 'ShearX' else 1e-6), name


def test_posterize_to_zero_bits_is_black():
    """timm's PosterizeIncreasing at magnitude 10 (2.3 % of draws with mstd 0.5) keeps 0 bits: Pillow >= 11 refuses
    that (ValueError in timm's CPU pipeline); here it gives black, as older Pillow and TF's RandAugment did."""
    op = timm_aa.AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=10)
    assert op.level_fn(10, op.hparams) == (0,)
    image = _chw(natural_image(32, 32, 5))[None]
    assert datasets.apply_rand_op('PosterizeIncreasing', image, [(0,)], torch.zeros(1, 3, 1, 1)).eq(0).all()


def test_rand_augment_draws_follow_timm(monkeypatch):
    """Per image: two ops drawn with replacement from timm's 15, each applied with probability 0.5, magnitude
    N(9, 0.5) -> so 25 % of images get no op, 50 % one, 25 % two; every op occurs."""
    augment = datasets.GpuAugment(True, _args(), torch.device('cpu'))
    assert [op.name for op in augment.rand_augment.ops] == timm_aa._RAND_INCREASING_TRANSFORMS
    calls = []
    monkeypatch.setattr(datasets, 'apply_rand_op', lambda name, x, args, fill, mode: calls.append((name, x, args)) or x)
    random.seed(0)
    np.random.seed(0)
    n = 3000
    augment.apply_rand_augment(torch.zeros(n, 3, 4, 4, dtype=torch.uint8))
    assert {name for name, *_ in calls} == set(timm_aa._RAND_INCREASING_TRANSFORMS)
    applied = sum(len(x) for _, x, _ in calls)
    assert abs(applied / n - 1.0) < 0.05  # 2 layers x p 0.5
    rotations = [abs(a[0]) for name, _, args in calls if name == 'Rotate' for a in args]
    assert abs(np.mean(rotations) - 27.0) < 0.5 and 0.3 < np.std(rotations) / 3 < 0.7  # 30 deg x N(9, 0.5) / 10


def test_refused_choices_are_named(folder):
    with pytest.raises(ValueError, match='implements RandAugment'):
        datasets.GpuAugment(True, _args(aa='original-mstd0.5'), torch.device('cpu'))
    with pytest.raises(ValueError, match='--train_interpolation bicubic or bilinear'):
        datasets.GpuAugment(True, _args(train_interpolation='random'), torch.device('cpu'))
    with pytest.raises(ValueError, match=r'--gpu_pipeline true reads ImageNet-style folders only'):
        datasets.build_dataset(True, _args(data_set='CIFAR', data_path=folder))


@pytest.mark.parametrize('share, workers', [(0.0, 1), (0.5, 2)])
def test_main_trains_and_evaluates_with_gpu_pipeline_on_cpu(folder, tmp_path, capsys, share, workers):
    """Default augmentation (RandAugment, erasing, mixup/cutmix) through loader workers, one epoch, evaluation; and
    with half the images decoded by the workers (each pass's first batch joined from two workers' slices)."""
    argv = ['--model', 'SLaK_tiny', '--Decom', 'true', '--width_factor', '0.125', '--kernel_size', '7', '7', '5', '5',
            '3', '--input_size', '64', '--batch_size', '4', '--epochs', '1', '--warmup_epochs', '0', '--num_workers',
            str(workers), '--device', 'cpu', '--drop_path', '0', '--gpu_pipeline', 'true', '--data_path', folder,
            '--output_dir', str(tmp_path), '--channels_last', 'true', '--gpu_pipeline_cpu_share', str(share)]
    assert main.run(argv) == 0
    out = capsys.readouterr().out
    assert 'Transform = GpuAugment(train' in out and 'Transform = GpuAugment(eval' in out
    with open(tmp_path / 'log.txt') as f:
        log = json.loads(f.readline())
    assert math.isfinite(log['train_loss']) and math.isfinite(log['test_loss'])


def test_main_refuses_gpu_pipeline_on_other_data_sets(capsys):
    code = main.run(['--data_set', 'synthetic', '--gpu_pipeline', 'true', '--device', 'cpu', '--model', 'SLaK_tiny'])
    err = capsys.readouterr().err.strip()
    assert code == 2 and '\n' not in err
    assert err.startswith('error: --gpu_pipeline true reads ImageNet-style folders only')


def test_device_batches_hand_snips_augmented_batch_to_epoch_zero():
    """--gpu_pipeline's SNIP batch: DeviceBatches.first_batch() decodes and augments the shared loader's first batch
    once, epoch 0 starts with that very batch (not a second augmentation of its images), and later passes augment
    every batch afresh."""
    import utils
    encoded = [(torch.arange(6, dtype=torch.uint8) + 10 * i, torch.tensor([2, 4]), torch.tensor([i, i]), ['a', 'b'])
               for i in range(3)]

    class Augment:
        device = torch.device('cpu')
        calls = 0

        def __call__(self, data, paths):
            Augment.calls += 1
            return torch.stack([torch.cat([d.float(), torch.zeros(6 - len(d))]) for d in data]) + Augment.calls

    class Loader(list):
        sampler, dataset = None, None
    batches = datasets.DeviceBatches(utils.FirstBatchShared(Loader(encoded)), Augment())
    first = batches.first_batch()
    assert batches.first_batch() is first and Augment.calls == 1
    assert first[0].tolist() == [[1, 2, 1, 1, 1, 1], [3, 4, 5, 6, 1, 1]] and first[1].tolist() == [0, 0]
    epoch0 = list(batches)
    assert epoch0[0] is first and Augment.calls == 3 and [b[1].tolist() for b in epoch0] == [[0, 0], [1, 1], [2, 2]]
    again = list(batches)
    assert again[0] is not first and again[0][0].tolist()[0][0] == 4 and Augment.calls == 6  # augmented afresh
    plain = datasets.DeviceBatches(Loader(encoded), Augment())  # a loader without first_batch: a pass of its own
    assert plain.first_batch()[1].tolist() == [0, 0]


def test_evaluation_batches_are_prepared_ahead_by_a_thread_same_batches_errors_raised(folder, tmp_path):
    """--gpu_pipeline's evaluation: DeviceBatches decodes and resizes the next batches in a helper thread while the
    model runs; the batches are those prepared one by one, in order; a file that fails in the thread is named in the
    caller's; a pass left early lets its thread go."""
    import threading
    dataset = datasets.EncodedImageFolder(os.path.join(folder, 'val'))
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=datasets.collate_encoded)
    augment = datasets.GpuAugment(False, _args(), torch.device('cpu'))
    batches = datasets.DeviceBatches(loader, augment)
    threads = []
    original = datasets.DeviceBatches._on_device

    def noting(self, batch):
        threads.append(threading.current_thread().name)
        return original(self, batch)
    datasets.DeviceBatches._on_device = noting
    try:
        ahead = list(batches)
    finally:
        datasets.DeviceBatches._on_device = original
    assert set(threads) == {'DeviceBatches-eval'} and len(ahead) == 3
    one_by_one = [original(batches, batch) for batch in loader]
    for (x, y), (x_ref, y_ref) in zip(ahead, one_by_one, strict=True):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)

    before = threading.active_count()
    it = iter(batches)
    next(it)
    it.close()  # (a pass left early: the thread stops)
    assert threading.active_count() == before

    bad = tmp_path / 'val' / 'b'
    os.makedirs(bad)
    for name in os.listdir(os.path.join(folder, 'val', 'a')):
        (tmp_path / 'val' / 'b' / name).write_bytes(open(os.path.join(folder, 'val', 'a', name), 'rb').read())
    os.makedirs(tmp_path / 'val' / 'a')
    (tmp_path / 'val' / 'a' / 'x.JPEG').write_bytes(b'not an image at all' * 10)
    broken = datasets.DeviceBatches(torch.utils.data.DataLoader(
        datasets.EncodedImageFolder(str(tmp_path / 'val')), batch_size=3, collate_fn=datasets.collate_encoded),
        augment)
    with pytest.raises(ValueError, match=r'cannot read image file .*x\.JPEG: .*remove or replace it'):
        list(broken)
    assert threading.active_count() == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device (nvJPEG, side streams)')
def test_gpu_evaluation_batches_prepared_ahead_match_one_by_one(folder):
    """On CUDA the helper thread decodes (nvJPEG) and resizes on a stream of its own; each batch, used on the compute
    stream behind a long kernel queue, holds exactly what the same batch prepared on the compute stream holds."""
    dataset = datasets.EncodedImageFolder(os.path.join(folder, 'val'))
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=datasets.collate_encoded)
    batches = datasets.DeviceBatches(loader, datasets.GpuAugment(False, _args(), torch.device('cuda')))
    busy = torch.randn(2048, 2048, device='cuda')
    ahead = []
    for x, y in batches:
        for _ in range(20):
            busy = busy @ busy / 2048
        ahead.append((x.cpu(), y.cpu()))
    one_by_one = [(x.cpu(), y.cpu()) for x, y in (batches._on_device(b) for b in loader)]
    for (x, y), (x_ref, y_ref) in zip(ahead, one_by_one, strict=True):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


@pytest.mark.parametrize('input_size', [64, 384, 32])
def test_evaluation_resizes_each_image_size_once_same_pixels(folder, input_size):
    """GpuAugment's evaluation resizes the images of one size in one call: the pixels of one call per image."""
    args = _args(input_size=input_size)
    augment = datasets.GpuAugment(False, args, torch.device('cpu'))
    data, _, paths = _encoded(folder, 'val')
    images = augment.decode(data, paths)
    assert len({tuple(i.shape) for i in images}) == len(SIZES) < len(images)  # each size twice
    calls = []
    original = augment.eval_geometry
    augment.eval_geometry = lambda x: calls.append(x.shape) or original(x)
    grouped = augment.eval_batch(images)
    assert len(calls) == len(SIZES)
    one_by_one = torch.stack([original(image) for image in images])
    assert grouped.dtype == torch.uint8 and torch.equal(grouped, one_by_one)


def test_cpu_share_of_evaluation_images_is_decoded_by_the_workers_and_merged_in_order(folder, capsys):
    """--gpu_pipeline_cpu_share: that share of the evaluation images (evenly spread over the indices) is decoded
    and resized by the loader workers exactly as without --gpu_pipeline (PIL), the rest on the device; the batch
    keeps the dataset's order and labels, each image normalised like the others."""
    args = _args(gpu_pipeline_cpu_share=0.5, data_path=folder)
    dataset, _ = datasets.build_dataset(False, args)
    assert [dataset.on_cpu(i) for i in range(8)] == [False, True] * 4
    quarter = datasets.EncodedImageFolder(os.path.join(folder, 'val'))
    quarter.decode_on_cpu(datasets.build_transform(False, args, normalize=False), 0.25)
    assert [i for i in range(8) if quarter.on_cpu(i)] == [3, 7]
    with pytest.raises(ValueError, match=r'must be in \[0, 1\); got 1'):
        quarter.decode_on_cpu(None, 1.0)

    augment = datasets.GpuAugment(False, args, torch.device('cpu'))
    mixed = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=1, collate_fn=datasets.collate_encoded)
    batches = list(datasets.DeviceBatches(mixed, augment))
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert x.shape == (8, 3, 64, 64) and y.tolist() == [t for _, t in dataset.samples]
    plain = datasets.EncodedImageFolder(os.path.join(folder, 'val'))  # every image decoded on the device
    on_device = torch.cat([b[0] for b in datasets.DeviceBatches(torch.utils.data.DataLoader(
        plain, batch_size=3, collate_fn=datasets.collate_encoded), augment)])
    pil = datasets.build_transform(False, args, normalize=False)
    for i, (path, _) in enumerate(dataset.samples):
        if dataset.on_cpu(i):
            assert torch.equal(x[i], augment.normalize(pil(datasets.rgb_loader(path))[None])[0]), i
        else:
            assert torch.equal(x[i], on_device[i]), i
    # a pass's first batch is joined from slices read by several workers (utils.SplitFirstBatch), one of them
    # without a decoded image here: the joined batch is the batch
    import utils
    items = [dataset[i] for i in range(4)]
    whole = datasets.collate_encoded(items)
    joined = utils.join_batches([datasets.collate_encoded(items[:1]), datasets.collate_encoded(items[1:])])
    for a, b in zip(whole, joined, strict=True):
        assert (torch.equal(a, b) and a.dtype == b.dtype) if isinstance(a, torch.Tensor) else a == b
    assert torch.equal(datasets.DeviceBatches(mixed, augment)._on_device(joined)[0], x[:4])

    code = main.run(['--gpu_pipeline_cpu_share', '0.3', '--device', 'cpu', '--data_path', folder])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == ("error: --gpu_pipeline_cpu_share 0.3 splits --gpu_pipeline's decoding between the GPU "
                                 "and the loader workers: add --gpu_pipeline true or drop it")
    code = main.run(['--gpu_pipeline', 'true', '--gpu_pipeline_cpu_share', '1', '--device', 'cpu'])
    assert code == 2 and 'error: --gpu_pipeline_cpu_share must be in [0, 1)' in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device (stream synchronisation)')
def test_gpu_batches_are_prepared_without_waiting_for_the_queued_kernels(folder):
    """On CUDA a batch is prepared while the previous step's kernels still run: no operation of the crop/flip path,
    of the RandAugment ops below or of the evaluation merge waits for the stream (indexing with Python lists did:
    its positions were copied with a blocking copy). torch's sync debug mode raises on any such wait."""
    device = torch.device('cuda')
    data, _, paths = _encoded(folder, 'val')
    train = datasets.GpuAugment(True, _args(aa='none', reprob=0, color_jitter=0), device)
    evaluate = datasets.GpuAugment(False, _args(), device)
    images = evaluate.decode(data, paths)
    batch = torch.stack([evaluate.eval_geometry(image) for image in images])
    fill = torch.tensor(FILL, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    decoded = batch[:2].cpu().pin_memory()  # (as a loader's pinned batch)
    busy = torch.randn(4096, 4096, device=device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        for _ in range(10):  # kernels still queued while the batches below are prepared
            busy = busy @ busy / 4096
        assert train.crop_and_flip(images).shape == (len(images), 3, 64, 64)
        for name, args in (('Posterize', [(4,)] * len(batch)), ('Solarize', [(128,)] * len(batch)),
                           ('Rotate', [(10.,)] * len(batch)), ('Contrast', [(1.3,)] * len(batch)),
                           ('Sharpness', [(0.7,)] * len(batch))):
            datasets.apply_rand_op(name, batch, args, fill)
        evaluate.eval_batch(images)
        evaluate.merge_decoded([], [], [], decoded, [1, 0])
    finally:
        torch.cuda.set_sync_debug_mode('default')


def test_cpu_share_of_training_images_is_timms_transform_in_the_workers(folder):
    """--gpu_pipeline_cpu_share in training: that share of the images comes from timm's training transform in the
    loader workers (normalised float, erasing included), the rest from GpuAugment, each with its own random draws;
    the batch keeps its order."""
    args = _args(gpu_pipeline_cpu_share=0.5, data_path=folder, aa='none', reprob=0, color_jitter=0, hflip=0)
    dataset, _ = datasets.build_dataset(True, args)
    on_cpu = [dataset.on_cpu(i) for i in range(len(dataset))]
    assert on_cpu[:4] == [False, True, False, True] and len(dataset) == 10
    augment = datasets.GpuAugment(True, args, torch.device('cpu'))
    random.seed(3)
    batch = datasets.collate_encoded([dataset[i] for i in range(len(dataset))])
    x, y = datasets.DeviceBatches(torch.utils.data.DataLoader(dataset), augment)._on_device(batch)
    assert x.shape == (10, 3, 64, 64) and x.dtype == torch.float32 and y.tolist() == [t for _, t in dataset.samples]
    random.seed(3)  # the same draws: the workers' transforms first, then the device's, as above
    cpu_items = {i: dataset[i][0] for i in range(len(dataset)) if on_cpu[i]}
    gpu = [i for i in range(len(dataset)) if not on_cpu[i]]
    data, _, paths = _encoded(folder)
    expected_gpu = augment([data[i] for i in gpu], [paths[i] for i in gpu])
    for i, image in cpu_items.items():
        assert image.dtype == torch.float32 and torch.equal(x[i], image), i
    assert torch.equal(x[gpu], expected_gpu)
