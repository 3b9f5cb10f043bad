"""Issue 20's record, ``compiled_baseline_<card>.json``, from one device call's pieces: ``bench_throughput.py --graph
--json`` at training batch 64 and at 128 (inference batch 128), and ``bench_dwconv.py --rotate_mb ... --layers_json``::

    python benchmarks/compiled_baseline.py --b64 T64.json --b128 T128.json --layers LAYERS.json --out DIR

Writes ``DIR/compiled_baseline_<card>.json`` = ``{"card", "train": {"64": {"convnext_tiny_compiled", "slak_t"},
"128": {...}}, "infer_128": {"convnext_tiny_compiled", "slak_t_folded"}, "layers": [...]}`` (img/s of graph replays,
SLaK-T's faster training path and folded inference path, named; the ratios beside them) and prints the issue's
lines against their targets (0.45x training, 0.5x folded inference, every large-kernel layer 8x cuDNN
forward+backward).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from bench_main import card_label

COMPILED, SLAK, FOLDED = 'convnext_tiny (timm) torch.compile', 'SLaK-T ours', 'SLaK-T ours folded decomposed'
# SLaK-T's two ways to train (eager with compiled block tails, the default; the whole model compiled, --compile true)
# and to infer folded (eager, compiled): the record takes the faster of each and names it
TRAIN_PATHS = {'eager + compiled tails': SLAK, 'whole-model torch.compile': 'SLaK-T ours torch.compile'}
FOLDED_PATHS = {'eager + compiled tails': FOLDED, 'whole-model torch.compile': FOLDED + ' torch.compile'}


def _get(rows: dict, name: str, key: str):
    value = rows.get(name, {}).get(key)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _fastest(rows: dict, paths: dict, key: str):
    """(img/s, path) of the fastest of SLaK-T's measured ``paths`` ({label: bench_throughput row}); (None, None)
    where none was measured; every measured path's img/s by label."""
    measured = {label: _get(rows, name, key) for label, name in paths.items()}
    measured = {label: v for label, v in measured.items() if v is not None}
    if not measured:
        return None, None, {}
    label = max(measured, key=measured.get)
    return measured[label], label, measured


def compose(b64: dict, b128: dict, layers: dict) -> dict:
    card = card_label(b128.get('device') or b64.get('device') or layers.get('card') or 'unknown')
    record = {'card': card, 'train': {}, 'infer_128': {}, 'layers': layers.get('layers', [])}
    for batch, run in (('64', b64), ('128', b128)):
        rows = run.get('rows', {})
        base = _get(rows, COMPILED, 'train_img_s')
        ours, path, measured = _fastest(rows, TRAIN_PATHS, 'train_img_s')
        record['train'][batch] = {'convnext_tiny_compiled': base, 'slak_t': ours, 'slak_t_path': path,
                                  'slak_t_paths': measured, 'ratio': ours / base if base and ours else None}
    rows = b128.get('rows', {})
    base = _get(rows, COMPILED, 'infer_img_s')
    folded, path, measured = _fastest(rows, FOLDED_PATHS, 'infer_img_s')
    record['infer_128'] = {'convnext_tiny_compiled': base, 'slak_t_folded': folded, 'slak_t_folded_path': path,
                           'slak_t_folded_paths': measured, 'ratio': folded / base if base and folded else None}
    record['min_layer_speedup_fb'] = layers.get('min_speedup_fb_large_kernel')
    return record


def verdicts(record: dict) -> list:
    def line(what, value, target):
        shown = f'{value:.3f}' if value is not None else 'not measured'
        met = 'met' if value is not None and value >= target else 'NOT met'
        return f'{what}: {shown} (target {target}) {met}'
    return [line('training vs compiled ConvNeXt-T, batch 64', record['train']['64']['ratio'], 0.45),
            line('training vs compiled ConvNeXt-T, batch 128', record['train']['128']['ratio'], 0.45),
            line('folded inference vs compiled ConvNeXt-T, batch 128', record['infer_128']['ratio'], 0.5),
            line('slowest large-kernel layer vs cuDNN, f+b, rotating inputs', record['min_layer_speedup_fb'], 8.0)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--b64', required=True)
    parser.add_argument('--b128', required=True)
    parser.add_argument('--layers', default='')
    parser.add_argument('--out', default='benchmarks/results')
    args = parser.parse_args()

    def read(path):
        return json.loads(Path(path).read_text()) if path and Path(path).exists() else {}
    record = compose(read(args.b64), read(args.b128), read(args.layers))
    out = Path(args.out) / f'compiled_baseline_{record["card"]}.json'
    out.write_text(json.dumps(record, indent=1))
    print('\n'.join(verdicts(record)))
    print(f'written: {out}')


if __name__ == '__main__':
    main()
