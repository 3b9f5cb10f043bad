"""benchmarks/compiled_baseline.py: issue 20's record composed from the device call's pieces, and its verdicts."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'benchmarks'))

import compiled_baseline as cb  # noqa: E402


def throughput(device, train_batch, rows):
    return {'device': device, 'graph': True, 'train_batch': train_batch, 'infer_batch': 128,
            'rows': {name: {'train_img_s': t, 'train_mem_gb': 1.0, 'infer_img_s': i, 'infer_mem_gb': 1.0}
                     for name, (t, i) in rows.items()}}


def test_record_ratios_and_verdicts(tmp_path):
    nan = float('nan')
    b64 = throughput('NVIDIA H100 80GB HBM3', 64, {cb.COMPILED: (3000.0, 14000.0), cb.SLAK: (1500.0, 4000.0)})
    b128 = throughput('NVIDIA H100 80GB HBM3', 128, {cb.COMPILED: (3700.0, 14700.0), cb.SLAK: (1300.0, 4500.0),
                                                      cb.FOLDED: (nan, 7500.0)})
    layers = {'card': 'H100_80GB_HBM3', 'layers': [{'layer': '124@56 51x5', 'ours_fb_ms': 1.0, 'cudnn_fb_ms': 9.0}],
              'min_speedup_fb_large_kernel': 9.0}
    paths = []
    for name, data in (('b64', b64), ('b128', b128), ('layers', layers)):
        paths.append(tmp_path / f'{name}.json')
        paths[-1].write_text(json.dumps(data))
    out = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'compiled_baseline.py'), '--b64', str(paths[0]),
                          '--b128', str(paths[1]), '--layers', str(paths[2]), '--out', str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout
    record = json.loads((tmp_path / 'compiled_baseline_H100_80GB_HBM3.json').read_text())
    assert record['train']['64'] == {'convnext_tiny_compiled': 3000.0, 'slak_t': 1500.0, 'ratio': 0.5}
    assert abs(record['train']['128']['ratio'] - 1300 / 3700) < 1e-12
    assert abs(record['infer_128']['ratio'] - 7500 / 14700) < 1e-12
    assert record['layers'][0]['layer'] == '124@56 51x5'
    lines = out.splitlines()
    assert lines[0].endswith('(target 0.45) met') and lines[1].endswith('(target 0.45) NOT met')
    assert lines[2].endswith('(target 0.5) met') and lines[3].endswith('(target 8.0) met')


def test_missing_pieces_are_not_measured_never_met():
    record = cb.compose({}, {'rows': {cb.COMPILED: {'train_img_s': float('nan')}}}, {})
    assert record['train']['128']['ratio'] is None and record['infer_128']['ratio'] is None
    assert all(line.endswith('NOT met') and 'not measured' in line for line in cb.verdicts(record))
