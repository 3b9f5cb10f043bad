"""benchmarks/bench_downstream.py: its ADE20K / COCO writers (read back by mmseg's and mmdet's own datasets), its
main.py-style checkpoint, and one tiny run per framework on CPU through the frameworks' tools/train.py, parsed."""
from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest
import torch

from mm_utils import REPO_ROOT, require

require('mmdet')
require('mmseg')

sys.path.insert(0, os.path.join(REPO_ROOT, 'benchmarks'))
import bench_downstream  # noqa: E402
import downstream_probe  # noqa: E402


def test_uncompressed_rle_decodes_to_the_mask():
    from pycocotools import mask as mask_utils
    rng = np.random.default_rng(0)
    for first in (0, 1):
        mask = (rng.random((7, 5)) > 0.5).astype(np.uint8)
        mask[0, 0] = first
        rle = bench_downstream.uncompressed_rle(mask)
        assert (rle['counts'][0] == 0) == bool(first) and sum(rle['counts']) == mask.size
        decoded = mask_utils.decode(mask_utils.frPyObjects(rle, *rle['size']))
        assert np.array_equal(decoded, mask)


def test_cfg_values_read_back_through_mmengine():
    import argparse
    from mmengine.config import DictAction
    options = {'a.b': [7, 7, 100], 'c': (64, 64), 'd': [(96, 160), (128, 213)], 'e': False, 'f': 0., 'g': '/x/y/',
               'h': (5,)}
    parser = argparse.ArgumentParser()
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    parsed = parser.parse_args(['--cfg-options', *bench_downstream.cfg_options(options)]).cfg_options
    assert parsed == options


def test_parse_scalars_takes_the_steady_median_and_the_metrics():
    lines = [{'loss': 5. - 0.1 * i, 'time': 10. if i <= 2 else 1. + 0.01 * i, 'data_time': 0.1,
              'memory': 30000 if i == 1 else 2048 + i, 'iter': i, 'step': i} for i in range(1, 13)]
    lines[-1]['time'] = 50.  # a profiled iteration: left out
    lines.append({'mIoU': 1.5, 'aAcc': 20., 'data_time': 0.1, 'time': 0.2, 'step': 12})
    out = bench_downstream.parse_scalars(lines, skip=2, untimed_tail=1)
    assert out['iters'] == 12 and out['timed_iters'] == 9 and out['slow_iters'] == 0
    assert out['iter_s'] == pytest.approx(1.07)
    assert out['first_loss'] == 4.9 and out['last_loss'] == pytest.approx(3.8) and out['loss_decreased']
    assert out['peak_mem_gb'] == round(2060 / 1024, 2) and out['metrics'] == {'mIoU': 1.5, 'aAcc': 20.}
    assert out['peak_mem_gb_first_iters'] == round(30000 / 1024, 2)  # cuDNN autotuning's trial workspaces, apart


def test_box_ops_on_gpu_rule():
    assert downstream_probe.box_ops_on_gpu({'torchvision.ops.nms@cuda': 3}, expect_calls=True)
    calls = {'torchvision.ops.nms@cuda': 3, 'torchvision.ops.roi_align@cpu': 1}
    assert not downstream_probe.box_ops_on_gpu(calls, expect_calls=True)
    assert not downstream_probe.box_ops_on_gpu({}, expect_calls=True)
    assert downstream_probe.box_ops_on_gpu({}, expect_calls=False)


def test_compile_seconds_include_the_lazily_compiled_backward(monkeypatch):
    """AOTAutograd compiles a graph's backward at its first backward call, outside dynamo's ``compile_inner`` timing
    (checked on CPU with Inductor: 8.9 s forward, 0.8 s backward apart): the probe adds ``bw_compiler``'s seconds."""
    import torch._dynamo.utils as dynamo_utils
    fake = {'_compile.compile_inner': [1.0, 2.0], 'compile_fx.<locals>.bw_compiler': [0.5], 'GraphLowering.run': [9.]}
    monkeypatch.setattr(dynamo_utils, 'compilation_time_metrics', fake)
    assert downstream_probe.compile_seconds() == 3.5
    monkeypatch.setattr(dynamo_utils, 'compilation_time_metrics', {'_compile.compile_inner': [1.25]})
    assert downstream_probe.compile_seconds() == 1.25
    monkeypatch.setattr(dynamo_utils, 'compilation_time_metrics', {})
    assert downstream_probe.compile_seconds() == 0.0


def test_triton_compile_counter_wraps_once_and_counts(monkeypatch):
    """The probe counts JIT compiles (our kernels specialise on map sizes); the interpreter never compiles, so the
    compile step is a stub here; installing twice must not count twice."""
    from triton.runtime.jit import JITFunction
    monkeypatch.setattr(JITFunction, '_do_compile', lambda self, *a, **k: ('kernel', a))
    before = downstream_probe.triton_compiles()['compiles']
    assert downstream_probe.count_triton_compiles() and downstream_probe.count_triton_compiles()
    assert JITFunction._do_compile(None, 'key', warmup=False) == ('kernel', ('key',))
    JITFunction._do_compile(None, 'other')
    after = downstream_probe.triton_compiles()
    assert after['compiles'] - before == 2 and after['seconds'] >= 0


def test_importing_the_probe_leaves_torchvision_alone():
    """Only the hook, in the training process, wraps the box ops (a replaced torch.ops entry broke ONNX export)."""
    import torchvision.ops
    assert torchvision.ops.nms.__module__ == 'torchvision.ops.boxes' and torchvision.ops.nms.__name__ == 'nms'
    assert isinstance(torch.ops.torchvision.nms, torch._ops.OpOverloadPacket)


def test_checkpoint_is_main_py_style_and_sparse(tmp_path):
    flags = bench_downstream.SMOKE_BACKBONE_FLAGS['SLaK-T']
    info = bench_downstream.write_classification_checkpoint(tmp_path / 'slak.pth', flags, sparsity=0.4)
    assert 0.55 < info['density_2d_4d'] < 0.65
    ckpt = torch.load(tmp_path / 'slak.pth', weights_only=True)
    assert ckpt['args']['kernel_size'] == [7, 7, 5, 5, 3] and ckpt['args']['Decom'] is True
    weight = ckpt['model']['stages.1.0.large_kernel.LoRA1.conv.weight']
    assert 0.3 < (weight == 0).float().mean() < 0.5
    assert not (ckpt['model']['stages.1.0.gamma'] == 0).any()  # 1-D tensors stay dense


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    ade = bench_downstream.write_ade20k(root / bench_downstream.ADE_DIR, n_train=6, n_val=2, workers=1,
                                        short_range=(64, 96))
    coco = bench_downstream.write_coco(root / 'coco', n_train=8, n_val=2, workers=1, short_range=(64, 128))
    return root, ade, coco


def test_ade20k_loads_through_mmseg(data):
    from mmseg.datasets import ADE20KDataset
    root, _, _ = data
    dataset = ADE20KDataset(data_root=str(root / bench_downstream.ADE_DIR / 'ADEChallengeData2016'),
                            data_prefix=dict(img_path='images/training', seg_map_path='annotations/training'),
                            pipeline=[dict(type='LoadImageFromFile'),
                                      dict(type='mmseg.LoadAnnotations', reduce_zero_label=True)])
    assert len(dataset) == 6
    sample = dataset[0]
    labels = sample['gt_seg_map']
    assert sample['img'].shape[:2] == labels.shape and 64 <= min(labels.shape) <= 96
    values = set(np.unique(labels).tolist())
    assert values <= set(range(150)) | {255} and len(values - {255}) >= 2  # 0 became 255 (ignored)


def test_ade20k_labels_can_be_learnt_from_the_colours(data):
    """A segmentation run can only show a falling loss if the labels follow from the image: the nearest class colour
    of each labelled pixel (JPEG, blur, noise and the background's texture included) must name its class for most
    pixels, the large background class included (0.78 here; 0.08 with v1's random backgrounds)."""
    from PIL import Image
    root, _, _ = data
    base = root / bench_downstream.ADE_DIR / 'ADEChallengeData2016'
    colours = np.stack([bench_downstream._class_colour(c) for c in range(151)]).astype(np.float32)  # 0..150
    hits = total = 0
    for image_path in sorted((base / 'images' / 'training').glob('*.jpg')):
        img = np.asarray(Image.open(image_path).convert('RGB'), dtype=np.float32)
        labels = np.asarray(Image.open(base / 'annotations' / 'training' / f'{image_path.stem}.png'))
        keep = labels > 0
        pixels, truth = img[keep], labels[keep]
        nearest = np.argmin(((pixels[:, None, :] - colours[None, 1:, :]) ** 2).sum(-1), axis=1) + 1
        hits += int((nearest == truth).sum())
        total += truth.size
    assert total > 0 and hits / total > 0.7, hits / total


def test_ade20k_background_classes_are_few_and_colours_far_apart(data):
    """v3: each image's background ("stuff") class is one of the few frequent ones, as in ADE20K, so the most common
    label of every map is among them; any two class colours are at least 39 apart (a grid palette)."""
    from PIL import Image
    root, _, _ = data
    base = root / bench_downstream.ADE_DIR / 'ADEChallengeData2016' / 'annotations'
    for label_path in sorted(base.glob('*/*.png')):
        values, counts = np.unique(np.asarray(Image.open(label_path)), return_counts=True)
        assert 1 <= values[np.argmax(counts)] <= bench_downstream.STUFF_CLASSES
    colours = np.stack([bench_downstream._class_colour(c) for c in range(151)]).astype(np.float64)
    gaps = np.sqrt(((colours[:, None] - colours[None]) ** 2).sum(-1)) + np.eye(151) * 1e9
    assert gaps.min() >= 39


def test_coco_loads_through_mmdet_with_polygons_and_rle(data):
    from mmdet.datasets import CocoDataset
    root, _, coco = data
    assert coco['train2017']['images'] == 8 and coco['train2017']['crowd'] > 0
    assert coco['train2017']['rle'] > coco['train2017']['crowd']  # crowd regions and compressed RLE instances
    ann = json.loads((root / 'coco' / 'annotations' / 'instances_train2017.json').read_text())
    kinds = {('crowd' if a['iscrowd'] else 'rle') if isinstance(a['segmentation'], dict) else 'polygon'
             for a in ann['annotations']}
    assert kinds == {'polygon', 'rle', 'crowd'}
    sizes = {(im['width'], im['height']) for im in ann['images']}
    assert len(sizes) > 3 and any(w < h for w, h in sizes) and any(w > h for w, h in sizes)
    dataset = CocoDataset(data_root=str(root / 'coco') + '/', ann_file='annotations/instances_train2017.json',
                          data_prefix=dict(img='train2017/'),
                          pipeline=[dict(type='LoadImageFromFile'),
                                    dict(type='mmdet.LoadAnnotations', with_bbox=True, with_mask=True)])
    assert len(dataset) == 8
    sample = dataset[0]
    masks, boxes = sample['gt_masks'], sample['gt_bboxes']
    assert len(masks) == len(boxes) > 0 and masks.masks.shape[1:] == sample['img'].shape[:2]
    for mask, box in zip(masks.masks, boxes.tensor.numpy()):
        ys, xs = np.nonzero(mask)
        assert abs(xs.min() - box[0]) <= 1 and abs(ys.max() + 1 - box[3]) <= 1  # boxes are the masks' extents


def test_tiny_runs_through_the_frameworks_train_py(data, tmp_path):
    """The whole chain on CPU: tools/train.py of both wheels, the probe, the parser, the records."""
    root, _, _ = data
    out = tmp_path / 'out'
    report = bench_downstream.main([
        '--smoke', '--out', str(out), '--data_root', str(root), '--work_root', str(tmp_path / 'work'),
        '--runs', 'upernet_slak,cascade_slak', '--iters', '4', '--skip_iters', '1', '--profile_iters', '1',
        '--warmup_iters', '2', '--workers', '1'])
    assert report['train_py']['mmseg'].endswith(os.path.join('mmseg', '.mim', 'tools', 'train.py'))
    records = json.loads((out / 'downstream_cpu.json').read_text())
    assert [(r['task'], r['backbone']) for r in records] == [('upernet', 'SLaK-T'), ('cascade_mask_rcnn', 'SLaK-T')]
    required = {'task', 'backbone', 'iters', 'iter_s', 'peak_mem_gb', 'first_loss', 'last_loss', 'nms_roi_on_gpu',
                'compiled_tail_graphs', 'card'}
    for record in records:
        assert required <= set(record) and record['exit_code'] == 0, report['runs']
        assert record['iters'] == 4 and record['iter_s'] > 0 and record['card'] == 'cpu'
        assert math.isfinite(record['first_loss']) and math.isfinite(record['last_loss'])
        assert record['compiled_tail_graphs'] == 0  # the tail compiles on CUDA only
    upernet, cascade = records
    assert 'mIoU' in upernet['metrics'] and 'coco/bbox_mAP' in cascade['metrics']
    assert 'coco/segm_mAP' in cascade['metrics']
    # the detector's NMS and RoIAlign calls were seen, all on the CPU here: "not on the GPU"
    calls = cascade['box_op_calls']
    assert calls.get('torchvision.ops.nms@cpu', 0) > 0 and calls.get('torchvision.ops.roi_align@cpu', 0) > 0
    assert cascade['nms_roi_on_gpu'] is False and upernet['box_op_calls'] == {}
    runs = json.loads((out / 'downstream_cpu_runs.json').read_text())['runs']
    profile = runs['cascade_slak']['probe']['profile']
    assert profile['iters'] == [3, 4] and any('nms' in row['name'] for row in profile['box_ops'])
    assert runs['cascade_slak']['timed_iters'] == 2  # iterations 2 and 3: after the skipped one, before the profiled


def test_probe_writes_its_record_after_every_iteration(tmp_path):
    """A run cut off by its time limit (killed: no atexit) still leaves the iterations it finished."""
    out = tmp_path / 'probe.json'
    hook = downstream_probe.DownstreamProbeHook(str(out))
    runner = type('Runner', (), {'iter': 0})()
    for i in range(3):
        runner.iter = i
        hook.after_train_iter(runner, i)
        record = json.loads(out.read_text())
        assert len(record['tail_graphs_by_iter']) == len(record['triton_by_iter']) == i + 1
        assert set(record) >= {'box_op_calls', 'box_ops_on_gpu', 'tail', 'triton', 'seconds'}


def test_committed_h100_record_has_every_field_and_the_issue_19_figures():
    """The record the benchmark wrote on the H100 (session 10): the issue's fields, a like-for-like ConvNeXt-T row
    per config, and what it measured: <= 1.25x per config, finite falling losses, box ops on the GPU, tail graphs."""
    path = os.path.join(REPO_ROOT, 'benchmarks', 'results', 'downstream_H100_80GB_HBM3.json')
    records = json.loads(open(path).read())
    required = {'task', 'backbone', 'iters', 'iter_s', 'peak_mem_gb', 'first_loss', 'last_loss', 'nms_roi_on_gpu',
                'compiled_tail_graphs', 'card'}
    for record in records:
        assert required <= set(record) and record['card'] == 'H100_80GB_HBM3' and record['iters'] >= 50
        assert math.isfinite(record['first_loss']) and record['loss_last5'] < record['loss_first5']
        assert record['nms_roi_on_gpu'] is True and record['exit_code'] == 0
        assert not any(op.endswith('@cpu') for op in record['box_op_calls'])
    default = {(r['task'], r['backbone']): r for r in records if r['compile_tail'] == 'default'}
    for task in ('upernet', 'cascade_mask_rcnn'):
        ratio = default[(task, 'SLaK-T')]['iter_s'] / default[(task, 'ConvNeXt-T')]['iter_s']
        assert ratio <= 1.25 and ratio == pytest.approx(default[(task, 'SLaK-T')]['ratio_to_convnext'], abs=1e-3)
    assert default[('cascade_mask_rcnn', 'SLaK-T')]['box_op_calls'].get('torchvision.ops.roi_align@cuda', 0) > 0
    notail = [r for r in records if r['compile_tail'] != 'default']
    assert notail and all(r['compiled_tail_graphs'] == 0 for r in notail)
