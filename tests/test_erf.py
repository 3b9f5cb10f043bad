"""Tests of the effective-receptive-field tools in erf/ (contribution maps, area ratios, figures, CLI errors)."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import matplotlib.image  # noqa: E402

import SLaK  # noqa: E402
from erf.analyze_erf import THRESHOLDS, area_ratios, high_contribution_sides, normalise  # noqa: E402
from erf.visualize_erf import (aggregate_contributions, build_model, bundled_photos, contribution_map,  # noqa: E402
                               get_args_parser, load_images, main, select_images)


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, 'erf', script), *args],
                          capture_output=True, text=True, timeout=300)


def write_images(folder: str, names, size=(40, 30)) -> None:
    rng = np.random.default_rng(0)
    for name in names:
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


# ---- area ratios ----------------------------------------------------------------------------------------------------
def geometric_side(q: float, h: int, t: float):
    """Closed form of the window rule for B[r, s] = q^|r-c| q^|s-c| (c = h//2): the square share is (P(i)/T)^2 with
    P(i) = 1 + 2q(1-q^i)/(1-q) and T the full row sum, so the first i with P(i) > sqrt(t) T solves q^i < R."""
    c = h // 2
    total = 1 + q * (1 - q ** c) / (1 - q) + q * (1 - q ** (h - 1 - c)) / (1 - q)
    bound = 1 - (math.sqrt(t) * total - 1) * (1 - q) / (2 * q)
    if bound <= 0:
        return None
    i = max(1, math.floor(math.log(bound) / math.log(q)) + 1)
    return 2 * i + 1 if i <= h // 2 - 1 else None


@pytest.mark.parametrize('q', [0.8, 0.9, 0.97])
def test_area_ratios_match_closed_form_after_log_normalisation(q):
    h = 64
    profile = q ** np.abs(np.arange(h) - h // 2)
    target = np.outer(profile, profile)  # what log10(A + 1) / max must give back
    matrix = 10 ** (3 * target) - 1
    np.testing.assert_allclose(normalise(matrix), target, atol=1e-12)
    ratios = area_ratios(matrix)
    assert list(ratios) == [str(t) for t in THRESHOLDS]
    for t in THRESHOLDS:
        side = geometric_side(q, h, t)
        if side is None:
            assert ratios[str(t)] is None
        else:
            assert ratios[str(t)] == {'side_length': side, 'area_ratio': pytest.approx(side ** 2 / h ** 2)}
    assert any(r is not None for r in ratios.values())


@pytest.mark.parametrize('shape', [(33, 33), (40, 64), (64, 37)])
def test_window_rule_matches_original_loop(shape):
    """The summed-area version equals the original's loop over i (generalised to centre (h//2, w//2))."""
    rng = np.random.default_rng(1)
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    normalised = np.exp(-((yy - h // 2) ** 2 + (xx - w // 2) ** 2) / 150.0) * rng.uniform(0.5, 1, shape)
    thresholds = (0.05, 0.2, 0.5, 0.9, 0.999)
    expected = {}
    for t in thresholds:
        expected[t] = None
        for i in range(1, min(h, w) // 2):
            window = normalised[h // 2 - i:h // 2 + i + 1, w // 2 - i:w // 2 + i + 1]
            if window.sum() / normalised.sum() > t:
                expected[t] = 2 * i + 1
                break
    assert high_contribution_sides(normalised, thresholds) == expected
    ratios = area_ratios(10 ** normalised - 1, thresholds)
    for t, side in expected.items():
        assert ratios[str(t)] == (None if side is None else
                                  {'side_length': side, 'area_ratio': pytest.approx(side * side / (h * w))})


def test_unreached_threshold_gives_null_and_heatmap_png(tmp_path):
    """A uniform 64x64 matrix: the largest square (63x63) holds 96.9 % < 99 %, so t=0.99 is never reached."""
    matrix = np.ones((64, 64), dtype=np.float32)
    matrix[20:40, 25:30] = 50.0
    src, png, js = tmp_path / 'm.npy', tmp_path / 'h.png', tmp_path / 'r.json'
    np.save(src, matrix)
    result = run_script('analyze_erf.py', '--source', str(src), '--heatmap_save', str(png), '--json', str(js))
    assert result.returncode == 0, result.stderr
    ratios = json.loads(js.read_text())
    assert ratios['0.99'] is None
    assert ratios == json.loads(json.dumps(area_ratios(matrix)))
    assert 'no centred square reaches' in result.stdout
    image = matplotlib.image.imread(str(png))
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0.01


def test_compare_figure_table_and_label_errors(tmp_path):
    h = 48
    yy, xx = np.mgrid[:h, :h] - h // 2
    paths = []
    for name, sigma in [('narrow', 2.0), ('wide', 8.0)]:
        paths.append(str(tmp_path / f'{name}.npy'))
        np.save(paths[-1], 100 * np.exp(-(yy ** 2 + xx ** 2) / (2 * sigma ** 2)))
    out, js = tmp_path / 'fig.png', tmp_path / 'table.json'
    result = run_script('compare_erf.py', *paths, '--labels', 'small', 'large', '--out', str(out), '--json', str(js))
    assert result.returncode == 0, result.stderr
    table = json.loads(js.read_text())
    assert list(table) == ['small', 'large']
    for label, path in zip(['small', 'large'], paths):
        assert table[label] == json.loads(json.dumps(area_ratios(np.load(path))))
    assert table['large']['0.5']['area_ratio'] > table['small']['0.5']['area_ratio']
    image = matplotlib.image.imread(str(out))
    assert image.shape[1] > 1.5 * image.shape[0] and image[..., :3].std() > 0.01

    bad = run_script('compare_erf.py', *paths, '--labels', 'only-one', '--out', str(tmp_path / 'x.png'))
    assert bad.returncode == 2
    assert 'error: --labels gives 1 labels for 2 matrices' in bad.stderr
    assert 'Traceback' not in bad.stderr


# ---- contribution maps ----------------------------------------------------------------------------------------------
def test_single_conv_contribution_is_kernel_footprint():
    """out = conv(x) + b with a large b keeps the centre pre-activations positive, so d out[o, cy, cx] / d x[i, cy+u-p,
    cx+v-p] = K[o, i, u, v] (cross-correlation: the kernel is not flipped) and the map is sum_i ReLU(sum_o K[o, i])."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 2, kernel_size=(5, 3), padding=(2, 1), bias=True).double()
    with torch.no_grad():
        conv.bias.fill_(100.0)
    h, w = 16, 21
    scores = contribution_map(conv, torch.rand(1, 3, h, w, dtype=torch.float64))
    kernel = conv.weight.detach()
    expected = torch.zeros(h, w, dtype=torch.float64)
    expected[h // 2 - 2:h // 2 + 3, w // 2 - 1:w // 2 + 2] = torch.relu(kernel.sum(0)).sum(0)
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-12)
    assert (scores[expected == 0] == 0).all() and (scores[expected > 0] > 0).all()


def test_aggregate_averages_and_skips_nan_maps():
    conv = nn.Conv2d(3, 2, 3, padding=1).double()

    def feature_fn(x):  # a constant image makes std 0 -> NaN/Inf gradient
        return conv(x) / x.std()

    good = [torch.rand(3, 12, 12, dtype=torch.float64) for _ in range(2)]
    images = [good[0], torch.ones(3, 12, 12, dtype=torch.float64), good[1]]
    mean, used = aggregate_contributions(feature_fn, images, torch.device('cpu'), total=3)
    assert used == 2
    expected = (contribution_map(feature_fn, good[0][None]) + contribution_map(feature_fn, good[1][None])) / 2
    np.testing.assert_allclose(mean, expected.numpy(), rtol=1e-12)


def test_non_spatial_features_are_rejected():
    with pytest.raises(ValueError, match='no spatial feature map'):
        contribution_map(lambda x: x.mean((2, 3)), torch.rand(1, 3, 8, 8))


def test_resnet_feature_map_is_layer4_of_the_torchvision_model():
    args = get_args_parser().parse_args(['--model', 'resnet18'])
    model, feature_fn = build_model(args)
    x = torch.rand(1, 3, 64, 64)
    features = feature_fn(x)
    assert features.shape == (1, 512, 2, 2)
    torch.testing.assert_close(model.fc(features.mean((2, 3))), model(x))


def test_slak_runs_folded_by_default_with_the_same_contribution_map():
    """--eval_folded (default): the folded model's feature map, and so its ERF, equals the training form's."""
    base = ['--model', 'SLaK_tiny', '--width_factor', '0.125', '--kernel_size', '9', '7', '5', '5', '3', '--Decom',
            'true', '--layer_scale_init_value', '1']
    maps = {}
    for folded in ('true', 'false'):
        torch.manual_seed(0)
        model, feature_fn = build_model(get_args_parser().parse_args(base + ['--eval_folded', folded]))
        block = model.stages[0][0].large_kernel
        assert hasattr(block, 'lkb_decomposed' if folded == 'true' else 'LoRA1')
        torch.manual_seed(1)
        maps[folded] = contribution_map(feature_fn, torch.rand(1, 3, 64, 64))
    assert ((maps['true'] - maps['false']).norm() / maps['false'].norm()).item() < 1e-4


def test_larger_kernels_give_wider_erf():
    """Random-init tiny SLaK on the bundled photos: 31-29-27-13 (decomposed) spreads wider than 3-3-3-3.

    Layer scale 1: with the default 1e-6 the random blocks are near-identity and every net shows the stem's box.
    """
    paths = bundled_photos()[:2]
    ratios = {}
    for kernels, decom in [('31 29 27 13 5', 'true'), ('3 3 3 3 100', 'false')]:
        args = get_args_parser().parse_args(['--model', 'SLaK_tiny', '--width_factor', '0.125', '--kernel_size',
                                             *kernels.split(), '--Decom', decom, '--layer_scale_init_value', '1'])
        torch.manual_seed(0)
        _, feature_fn = build_model(args)
        mean, used = aggregate_contributions(feature_fn, load_images(paths, 128), torch.device('cpu'))
        assert used == len(paths) and mean.shape == (128, 128)
        ratios[kernels] = area_ratios(mean)['0.5']['area_ratio']
    assert ratios['31 29 27 13 5'] > 1.2 * ratios['3 3 3 3 100']  # 1.43 with this seed, 1.31-1.53 over seeds 0-2


# ---- images ---------------------------------------------------------------------------------------------------------
def test_bundled_photos_exist_and_load():
    paths = bundled_photos()
    assert paths[0].endswith('grace_hopper.jpg') and all(os.path.isfile(p) for p in paths)
    first = next(iter(load_images(paths[:1], 48)))
    assert first.shape == (3, 48, 48) and first.std() > 0.1


def test_select_images_spreads_over_classes(tmp_path):
    names = [f'val/class{c}/img{i}.{ext}' for c in range(5) for i, ext in enumerate(['JPG', 'png', 'jpeg', 'bmp'])]
    write_images(str(tmp_path), names)
    (tmp_path / 'val' / 'class0' / 'notes.txt').write_text('not an image')
    chosen = select_images(str(tmp_path), 5)
    assert [os.path.basename(os.path.dirname(p)) for p in chosen] == [f'class{c}' for c in range(5)]
    assert len(select_images(str(tmp_path), 100)) == 20
    with pytest.raises(ValueError, match='--data_path .* is not a directory'):
        select_images(str(tmp_path / 'missing'), 5)


# ---- command line ---------------------------------------------------------------------------------------------------
def test_visualize_main_writes_matrix_and_cli_reports_errors(tmp_path):
    write_images(str(tmp_path / 'imgs'), ['a/x.png', 'b/y.jpg'])
    out = tmp_path / 'sub' / 'erf.npy'
    tiny = ['--model', 'SLaK_tiny', '--width_factor', '0.125', '--kernel_size', '7', '7', '5', '5', '3',
            '--input_size', '64', '--device', 'cpu']
    main(get_args_parser().parse_args([*tiny, '--data_path', str(tmp_path / 'imgs'), '--save_path', str(out)]))
    matrix = np.load(out)
    assert matrix.shape == (64, 64) and np.isfinite(matrix).all() and matrix.min() >= 0 and matrix.max() > 0

    (tmp_path / 'empty' / 'sub').mkdir(parents=True)
    empty = run_script('visualize_erf.py', *tiny, '--data_path', str(tmp_path / 'empty'))
    assert empty.returncode == 2 and 'error: --data_path' in empty.stderr and 'holds no images' in empty.stderr

    slak = SLaK.SLaK(width_factor=0.125, kernel_size=[7, 7, 5, 5, 3], num_classes=10)
    torch.save({'model': slak.state_dict()}, tmp_path / 'slak.pth')
    # a 10-class checkpoint loads into the 1000-class ERF model: the classifier is skipped, everything else is loaded
    loaded, _ = build_model(get_args_parser().parse_args([*tiny, '--weights', str(tmp_path / 'slak.pth'),
                                                           '--eval_folded', 'false']))
    own = loaded.state_dict()
    assert all(torch.equal(own[k], v) for k, v in slak.state_dict().items() if not k.startswith('head.'))
    wrong = run_script('visualize_erf.py', '--model', 'resnet18', '--weights', str(tmp_path / 'slak.pth'),
                       '--data_path', str(tmp_path / 'imgs'), '--input_size', '64', '--device', 'cpu')
    assert wrong.returncode == 2
    assert wrong.stderr.startswith('error: ') and 'conv1.weight' in wrong.stderr and 'downsample_layers.0.0.weight' \
        in wrong.stderr
    assert 'Traceback' not in wrong.stderr


def test_garbage_input_and_unwritable_outputs_give_one_error_line(tmp_path, monkeypatch, capsys):
    """Each of the three scripts, in process (as their command lines run them): bad matrices, weights, images and
    output paths end in one ``error:`` line naming the file, and nothing is computed for a bad --save_path."""
    from erf import analyze_erf, compare_erf, visualize_erf

    def cli(module, *argv):
        monkeypatch.setattr(sys, 'argv', [module.__name__, *argv])
        code = analyze_erf.run_cli(module.main, module.get_args_parser())
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.count('error: ') == 1 and 'Traceback' not in err, err
        last = err.splitlines()[-1]  # after visualize_erf's progress bar, if any
        assert last.startswith('error: '), err
        return last

    good = tmp_path / 'm.npy'
    np.save(good, np.ones((9, 9)))
    (tmp_path / 'text.npy').write_text('not a matrix')
    with open(good, 'rb') as f:
        (tmp_path / 'cut.npy').write_bytes(f.read()[:40])
    np.save(tmp_path / 'objects.npy', np.array([{'a': 1}], dtype=object), allow_pickle=True)
    (tmp_path / 'file').write_text('a file, not a folder')
    assert cli(analyze_erf, '--source', str(tmp_path / 'text.npy')) == (
        f'error: {tmp_path / "text.npy"} is not a .npy file (np.save format); create it with erf/visualize_erf.py '
        f'--save_path {tmp_path / "text.npy"}')
    assert cli(analyze_erf, '--source', str(tmp_path / 'cut.npy')).startswith(
        f'error: {tmp_path / "cut.npy"} cannot be read as a matrix (EOF: reading array header')
    assert 'Object arrays cannot be loaded' in cli(compare_erf, str(good), str(tmp_path / 'objects.npy'))
    assert cli(analyze_erf, '--source', str(good), '--heatmap_save', str(tmp_path / 'no' / 'h.png')) == (
        f'error: --heatmap_save {tmp_path / "no" / "h.png"}: cannot write it (No such file or directory)')
    assert cli(analyze_erf, '--source', str(good), '--heatmap_save', str(tmp_path / 'h.xyz')).startswith(
        f"error: --heatmap_save {tmp_path / 'h.xyz'}: cannot write it (Format 'xyz' is not supported")
    assert cli(analyze_erf, '--source', str(good), '--heatmap_save', str(tmp_path / 'h.png'), '--json',
               str(tmp_path / 'file' / 'r.json')) == (
        f'error: --json {tmp_path / "file" / "r.json"}: cannot write it (Not a directory)')
    assert cli(compare_erf, str(good), '--out', str(tmp_path / 'file' / 'f.png')).startswith(
        f'error: --out {tmp_path / "file" / "f.png"}: cannot write it (Not a directory)')

    tiny = ['--model', 'SLaK_tiny', '--width_factor', '0.125', '--kernel_size', '7', '7', '5', '5', '3',
            '--input_size', '32', '--device', 'cpu', '--save_path', str(tmp_path / 'erf.npy')]
    assert cli(visualize_erf, *tiny, '--weights', str(tmp_path / 'text.npy')).startswith(
        f"error: {tmp_path / 'text.npy'} is a text file, not a checkpoint (it begins 'not a matrix')")
    write_images(str(tmp_path / 'imgs'), ['a/x.png'])
    (tmp_path / 'imgs' / 'a' / 'y.png').write_bytes(b'\x89PNG broken')
    assert cli(visualize_erf, *tiny, '--data_path', str(tmp_path / 'imgs')) == (
        f'error: model SLaK_tiny: cannot read image file {tmp_path / "imgs" / "a" / "y.png"}: not an image file PIL '
        f'can decode; remove or replace it')

    def no_work(*args, **kwargs):
        raise AssertionError('work started before the output path was checked')
    monkeypatch.setattr(visualize_erf, 'select_images', no_work)
    assert cli(visualize_erf, *tiny[:-1], str(tmp_path / 'file' / 'erf.npy')) == (
        f"error: --save_path's folder {tmp_path / 'file'} is a file, not a folder; pass a folder path")
    assert sorted(os.listdir(tmp_path / 'imgs' / 'a')) == ['x.png', 'y.png'] and not (tmp_path / 'erf.npy').exists()
