"""No file given to a checkpoint loader of the project runs code; broken files end in one clear error; the converter.

A planted checkpoint whose unpickling would create a marker file goes to every loader: ``--resume``, auto-resume,
``--finetune``, ``SLaK.load_checkpoint``, ``main_KD.py``'s teacher, ``erf/`` ``--weights``, the segmentation /
detection backbone and the URL path. Loaded with full unpickling (as the original did) it does create the marker.
"""
from __future__ import annotations

import argparse
import ast
import fractions
import glob
import hashlib
import os
import random
import struct
import zipfile

import numpy as np
import pytest
import torch

from mnist_mini import REPO, make_mini_mnist, run_files
from test_main import SPARSE, TINY, parse

import SLaK
import main
import main_KD

CONVERTER = os.path.join(REPO, 'tools', 'convert_checkpoint.py')


class _Payload:
    """Unpickling this calls ``open(marker, 'w')``, which creates the marker: it stands for any code a crafted .pth
    could run when loaded with full unpickling."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, 'w')


@pytest.fixture(scope='module')
def written(tmp_path_factory):
    """(data folder, checkpoint-0.pth of a 1-epoch sparse run of main.py with EMA)."""
    data = make_mini_mnist(str(tmp_path_factory.mktemp('digits')), 8, 2)
    out = str(tmp_path_factory.mktemp('run'))
    main.main(parse(TINY + SPARSE + ['--epochs', '1', '--data_path', data, '--output_dir', out, '--model_ema', 'true',
                                     '--disable_eval', 'true']))
    return data, os.path.join(out, 'checkpoint-0.pth')


def plant(folder, name: str, base: dict):
    """``base`` with a payload under 'args', saved as ``folder/name``; returns (path, marker path)."""
    marker = os.path.join(str(folder), f'{name}.ran')
    path = os.path.join(str(folder), name)
    torch.save({**base, 'args': _Payload(marker)}, path)
    return path, marker


def digest(path: str) -> str:
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_planted_payload_runs_under_full_unpickling(tmp_path):
    """The control: what the original's loader (full unpickling) would have done with the planted file."""
    path, marker = plant(tmp_path, 'evil.pth', {'model': {'w': torch.ones(1)}})
    torch.load(path, weights_only=False)
    assert os.path.exists(marker)


@pytest.mark.parametrize('how', ['resume', 'auto_resume', 'finetune'])
def test_main_refuses_planted_checkpoint(how, written, tmp_path, capsys):
    data, good = written
    out = tmp_path / 'out'
    out.mkdir()
    evil, marker = plant(out if how == 'auto_resume' else tmp_path, 'checkpoint-3.pth',
                         torch.load(good, weights_only=True))
    before = digest(evil)
    extra = {'resume': ['--resume', evil], 'auto_resume': [], 'finetune': ['--finetune', evil]}[how]
    code = main.run(TINY + ['--epochs', '1', '--data_path', data, '--output_dir', str(out)] + extra)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith('error: ') and '\n' not in err
    assert f'{evil} was refused: it pickles io.open' in err
    assert f'python tools/convert_checkpoint.py {evil} ' in err
    assert not os.path.exists(marker)
    assert digest(evil) == before and run_files(out) == (['checkpoint-3.pth'] if how == 'auto_resume' else [])


def test_kd_teacher_refuses_planted_checkpoint(written, tmp_path, capsys):
    data, good = written
    evil, marker = plant(tmp_path, 'teacher.pth', {'model': torch.load(good, weights_only=True)['model']})
    argv = ['--device', 'cpu', '--data_path', data, '--input_size', '32', '--batch_size', '4', '--num_workers', '0',
            '--pin_mem', 'false', '--resume', evil, '--output_dir', str(tmp_path / 'out'), '--model', 'SLaK_tiny',
            '--kernel_size', '7', '7', '5', '5', '3', '--width_factor', '0.125', '--Decom', 'true', '--model_s',
            'SLaK_tiny', '--width_factor_s', '0.125', '--distill_type', 'KD']
    assert main_KD.run(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f'error: {evil} was refused') and '\n' not in err
    assert not os.path.exists(marker)


def _tiny_slak(num_classes: int = 10) -> torch.nn.Module:
    return SLaK.SLaK(num_classes=num_classes, width_factor=0.125, kernel_size=[7, 7, 5, 5, 3], Decom=True)


def test_slak_load_checkpoint_and_erf_weights_refuse_planted_checkpoint(written, tmp_path, monkeypatch):
    from erf.visualize_erf import build_model, get_args_parser
    evil, marker = plant(tmp_path, 'evil.pth', {'model': torch.load(written[1], weights_only=True)['model']})
    monkeypatch.setenv('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '1')  # flips torch.load's default, not our explicit True
    with pytest.raises(SLaK.CheckpointError, match='was refused: it pickles io.open'):
        SLaK.load_checkpoint(_tiny_slak(), evil)
    args = get_args_parser().parse_args(['--model', 'SLaK_tiny', '--width_factor', '0.125', '--kernel_size', '7', '7',
                                         '5', '5', '3', '--Decom', 'true', '--weights', evil, '--device', 'cpu'])
    with pytest.raises(SLaK.CheckpointError, match='was refused'):
        build_model(args)
    assert not os.path.exists(marker)


@pytest.mark.parametrize('framework', ['segmentation', 'detection'])
def test_downstream_backbones_refuse_planted_checkpoint(framework, written, tmp_path):
    pytest.importorskip('mmengine')
    pytest.importorskip({'segmentation': 'mmseg', 'detection': 'mmdet'}[framework])
    import importlib
    from mm_utils import TINY_BACKBONE
    backbone = importlib.import_module(f'{framework}.slak').SLaK
    evil, marker = plant(tmp_path, 'evil.pth', {'model': torch.load(written[1], weights_only=True)['model']})
    model = backbone(**dict(TINY_BACKBONE, Decom=True), init_cfg=dict(type='Pretrained', checkpoint=evil))
    with pytest.raises(SLaK.CheckpointError, match='was refused'):
        model.init_weights()
    with pytest.raises(SLaK.CheckpointError, match='was refused'):  # the same file behind a URL
        model.load_classification_checkpoint(f'file://{evil}')
    assert not os.path.exists(marker)


def test_url_checkpoints_load_through_the_same_safe_path(written, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, '_hub_dir', str(tmp_path / 'hub'))
    good = written[1]
    loaded = SLaK.load_checkpoint_file(f'file://{good}')
    assert torch.equal(loaded['model']['head.weight'], torch.load(good, weights_only=True)['model']['head.weight'])
    evil, marker = plant(tmp_path, 'remote.pth', {'model': {'w': torch.ones(1)}})
    cached = str(tmp_path / 'hub' / 'checkpoints' / 'remote.pth')
    with pytest.raises(SLaK.CheckpointError, match=f'{cached} was refused'):  # names the downloaded copy
        SLaK.load_checkpoint_file(f'file://{evil}')
    assert not os.path.exists(marker)
    with pytest.raises(SLaK.CheckpointError, match='cannot download file:///nonexistent/x.pth'):
        SLaK.load_checkpoint_file('file:///nonexistent/x.pth')
    with pytest.raises(SLaK.CheckpointError, match='only local files and http'):
        SLaK.load_checkpoint_file('s3://bucket/x.pth')


def test_every_torch_load_of_the_project_is_weights_only():
    """Source scan: every ``torch.load`` outside tests passes ``weights_only=True`` (the converter, run knowingly on
    a trusted file, is the one exception) and nothing loads through ``torch.hub.load_state_dict_from_url``."""
    offenders = []
    for path in glob.glob(os.path.join(REPO, '**', '*.py'), recursive=True):
        rel = os.path.relpath(path, REPO)
        if rel.startswith(('tests', '.venv')) or rel == os.path.join('tools', 'convert_checkpoint.py'):
            continue
        with open(path, encoding='utf-8') as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if node.func.attr == 'load_state_dict_from_url':
                    offenders.append(f'{rel}:{node.lineno}')
                if node.func.attr == 'load' and isinstance(node.func.value, ast.Name) and node.func.value.id == 'torch':
                    weights_only = {k.arg: k.value for k in node.keywords}.get('weights_only')
                    if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                        offenders.append(f'{rel}:{node.lineno}')
    assert offenders == []


@pytest.mark.parametrize('content, problem', [
    (b'', 'is not a readable PyTorch checkpoint'),
    (b'<!DOCTYPE html><html>Google Drive - Virus scan warning', "is a text file, not a checkpoint (it begins '<!DOC"),
    (bytes(random.Random(0).randrange(256) for _ in range(4096)), 'is not a checkpoint that loads safely'),
])
def test_garbage_files_give_one_line_naming_the_file(content, problem, tmp_path):
    path = tmp_path / 'bad.pth'
    path.write_bytes(content)
    with pytest.raises(SLaK.CheckpointError) as info:
        SLaK.load_checkpoint_file(str(path))
    assert str(info.value).startswith(str(path)) and problem in str(info.value) and '\n' not in str(info.value)


def test_a_broken_resume_file_is_one_error_line_of_main(written, tmp_path, capsys):
    data, good = written
    with open(good, 'rb') as f:
        (tmp_path / 'cut.pth').write_bytes(f.read()[:1000])
    code = main.run(TINY + ['--data_path', data, '--resume', str(tmp_path / 'cut.pth')])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f'error: {tmp_path / "cut.pth"} is not a readable PyTorch checkpoint (')
    assert '\n' not in err


def test_truncated_non_dict_and_state_dict_less_checkpoints(written, tmp_path):
    with open(written[1], 'rb') as f:
        data = f.read()
    (tmp_path / 'cut.pth').write_bytes(data[:len(data) // 2])
    with pytest.raises(SLaK.CheckpointError, match='cut.pth is not a readable PyTorch checkpoint .*central directory'):
        SLaK.load_checkpoint_file(str(tmp_path / 'cut.pth'))
    torch.save([torch.ones(2)], tmp_path / 'list.pth')
    with pytest.raises(SLaK.CheckpointError, match='list.pth holds a list, not a checkpoint'):
        SLaK.load_checkpoint_file(str(tmp_path / 'list.pth'))
    torch.save({'epoch': 3, 'args': {'lr': 0.1}}, tmp_path / 'nosd.pth')
    with pytest.raises(SLaK.CheckpointError, match=r"nosd.pth holds no state dict .*found \['args', 'epoch'\]"):
        SLaK.load_checkpoint(_tiny_slak(), str(tmp_path / 'nosd.pth'))


def test_fuzzed_checkpoints_load_or_fail_with_our_error(written, tmp_path):
    """30 truncations and bit flips (a third aimed at the pickle) of a real main.py checkpoint: each either loads
    (into the model, or with a key/shape mismatch ValueError) or raises CheckpointError; nothing else escapes."""
    good = written[1]
    with open(good, 'rb') as f:
        data = f.read()
    with zipfile.ZipFile(good) as z:
        info = next(i for i in z.infolist() if i.filename.endswith('data.pkl'))
    name_length, extra_length = struct.unpack('<HH', data[info.header_offset + 26:info.header_offset + 30])
    pickle_start = info.header_offset + 30 + name_length + extra_length  # after the member's local header
    rng = random.Random(0)
    model = _tiny_slak()
    outcomes = {'loaded': 0, 'mismatch': 0, 'refused': 0}
    for i in range(30):
        variant = bytearray(data)
        if i < 10:
            variant = variant[:rng.randrange(len(data))]
        else:
            lo, hi = (pickle_start, pickle_start + info.compress_size) if i < 20 else (0, len(data))
            for _ in range(rng.randint(1, 8)):
                variant[rng.randrange(lo, hi)] ^= 1 << rng.randrange(8)
        path = tmp_path / f'fuzz{i}.pth'
        path.write_bytes(bytes(variant))
        try:
            checkpoint = SLaK.load_checkpoint_file(str(path))
        except SLaK.CheckpointError as e:
            assert str(e).startswith(str(path)) and '\n' not in str(e)
            outcomes['refused'] += 1
            continue
        try:
            SLaK.load_checkpoint(model, checkpoint, keys=('model',), source=str(path))
            outcomes['loaded'] += 1
        except ValueError as e:
            assert str(e).startswith(str(path)), e
            outcomes['mismatch'] += 1
    assert outcomes['refused'] >= 10 and outcomes['loaded'] >= 1  # every truncation is refused; some flips hit data


def load_converter():
    """tools/convert_checkpoint.py as a module (tools/ is not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location('convert_checkpoint', CONVERTER)
    converter = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(converter)
    return converter


def test_converter_turns_an_original_checkpoint_into_a_safe_one(tmp_path, capsys):
    converter = load_converter()
    model = _tiny_slak()
    optimizer = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    original = {'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'epoch': 299, 'scaler': {},
                'args': argparse.Namespace(lr=4e-3, kernel_size=[7, 7, 5, 5, 3], Decom=True, device='cuda'),
                'max_accuracy': np.float64(82.5), 'hist': np.arange(3), 'note': fractions.Fraction(1, 3)}
    source = str(tmp_path / 'SLaK_tiny.pth')
    torch.save(original, source)
    before = digest(source)
    with pytest.raises(SLaK.CheckpointError, match='it pickles .*argparse.Namespace') as info:
        SLaK.load_checkpoint_file(source)
    assert f'python tools/convert_checkpoint.py {source} {tmp_path / "SLaK_tiny-converted.pth"}' in str(info.value)

    target = str(tmp_path / 'SLaK_tiny-converted.pth')
    assert converter.main([source, target]) == 0
    printed = capsys.readouterr()
    assert printed.err.startswith(f'warning: loading {source} with full unpickling, which runs any code')
    assert "dropped (not tensors or plain values): checkpoint['note'] (fractions.Fraction)" in printed.out
    converted = SLaK.load_checkpoint_file(target)
    assert converted['args'] == {'lr': 4e-3, 'kernel_size': [7, 7, 5, 5, 3], 'Decom': True, 'device': 'cuda'}
    assert converted['max_accuracy'] == 82.5 and isinstance(converted['max_accuracy'], float)
    assert torch.equal(converted['hist'], torch.arange(3)) and 'note' not in converted
    fresh = _tiny_slak()
    SLaK.load_checkpoint(fresh, target)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())
    fresh_optimizer = torch.optim.AdamW(fresh.parameters())
    fresh_optimizer.load_state_dict(converted['optimizer'])
    assert torch.equal(fresh_optimizer.state_dict()['state'][0]['exp_avg'],
                       optimizer.state_dict()['state'][0]['exp_avg'])
    assert digest(source) == before and sorted(os.listdir(tmp_path)) == ['SLaK_tiny-converted.pth', 'SLaK_tiny.pth']

    assert converter.main([source, target]) == 2  # never overwrites
    assert 'already exists' in capsys.readouterr().err
    assert converter.main([str(tmp_path / 'missing.pth'), str(tmp_path / 'x.pth')]) == 2
    assert capsys.readouterr().err.strip() == f'error: {tmp_path / "missing.pth"} not found'


def test_converted_checkpoint_keeps_main_py_checkpoints_unchanged(written, tmp_path):
    """A checkpoint main.py wrote is already safe: converting it changes no key and no tensor."""
    target = str(tmp_path / 'same.pth')
    assert load_converter().convert(written[1], target) == []
    a, b = torch.load(written[1], weights_only=True), torch.load(target, weights_only=True)
    assert a.keys() == b.keys() and a['args'] == b['args'] and torch.equal(a['rng'][0]['torch'], b['rng'][0]['torch'])
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
