"""UperNet and Cascade Mask R-CNN with a SLaK-T backbone and with the ConvNeXt-T emulation, trained through the
frameworks' own ``tools/train.py`` as ``segmentation/README.md`` and ``detection/README.md`` tell users (issue 19).

Run on a CUDA machine from the repository root, with mmengine, mmcv(-lite), mmsegmentation and mmdet importable::

    python benchmarks/bench_downstream.py --out results/ [--iters 50] [--runs all] [--budget_s 400]

Steps:

1. Data on local disk (``--data_root``), in the real formats: ADE20K (``ADEChallengeData2016/images/{training,
   validation}/*.jpg`` and ``annotations/.../*.png`` label maps, values 0..150, 0 = "other", which mmseg's
   ``reduce_zero_label`` ignores) and COCO (``train2017/``, ``val2017/``, ``annotations/instances_{train,val}2017.json``
   with polygons, RLE for crowd regions (uncompressed, as COCO's own) and a few compressed-RLE instances; images of
   varied sizes and both orientations). Colours and textures follow the classes, so the models can learn something.
2. Two classification checkpoints written the way ``main.py`` writes them (``{'model': state_dict, 'epoch', 'args'}``,
   model built by ``main.build_model`` from ``main.py``'s own flags): SLaK-T (``--Decom true --width_factor 1.3
   --kernel_size 51 49 47 13 5``) made ``--sparsity`` sparse (uniform random zeros in every 2-D/4-D weight, the
   tensors ``main.py --sparse`` masks), and the ConvNeXt-T emulation (``--kernel_size 7 7 7 7 100``, same width 1.3, so
   the FPN / UperNet heads see the same channels), dense.
3. Runs, each in its own process: ``python -m segmentation.mmcv_ext_fallback <framework>/.mim/tools/train.py CONFIG
   --work-dir ... --cfg-options ...`` (the ``tools/train.py`` that the mmsegmentation / mmdet wheels ship under
   ``.mim/tools``, identical to the repositories' v1.2.2 / v3.3.0 ones; ``--seg_train_py`` / ``--det_train_py`` take a
   clone's). CONFIG is a two-line child of the shipped config
   (``upernet_slak_tiny_512_160k_ade20k_ss.py``, ``cascade_mask_rcnn_slak_tiny_mstrain_480-800_giou_4conv1f_adamw_3x_
   coco_in1k.py``) that adds ``benchmarks/downstream_probe.py`` (custom import + hook); ``--cfg-options`` set the data
   roots, the checkpoint, ``--iters`` iterations (``IterBasedTrainLoop``; one validation at the end), logging of every
   iteration (``window_size=1``), no checkpoint saving, a linear warmup of ``--warmup_iters`` (the configs' 1500 /
   500 would keep the lr near 0 for the whole run: set 0 to keep them) and, for detection, ``score_thr=0`` at test
   time (an under-trained detector scores every box below the config's 0.05, and COCO AP of no boxes is not
   computed). Batch size, crops, multi-scale pipeline,
   optimizer and model are the configs'. Runs (``--runs``): ``upernet_slak``, ``upernet_convnext``, ``cascade_slak``,
   ``cascade_convnext``, and ``cascade_slak_notail`` (SLaK-T with ``SLAK_COMPILE_TAIL=0``); ``--budget_s`` skips runs
   that would start after it and cuts a run at it.
4. Figures per run, from mmengine's ``vis_data/scalars.json``: iterations, median seconds per iteration over the steady
   ones (after ``--skip_iters``, without the profiled ones), loss first / last (and means of the first / last 5),
   peak GPU memory (mmengine's ``memory``: ``max_memory_allocated`` since the previous log line) over the steady
   iterations and, apart, over the first ones (cuDNN's autotuning of new shapes, which mmseg's configs turn on,
   briefly holds tens of GB of trial workspace there: 38 GB for both backbones), the validation metrics (mIoU;
   COCO bbox / segm AP); from the probe: NMS / RoIAlign calls by device and a ``torch.profiler`` table of the last
   ``--profile_iters`` detection iterations, SLaK tail graphs compiled (after each iteration) and torch.compile seconds.

Writes ``downstream_<card>.json`` (issue 19's records) and ``downstream_<card>_runs.json`` (everything, with log
tails) under ``--out`` after every run, so a cut-off call still leaves what was measured, and prints a summary.
``--smoke`` shrinks models, images and runs for a CPU check of the whole chain (tests/test_bench_downstream.py);
with ``--learning_check`` it keeps UperNet's model, lr and batch and only shrinks the crops (128 px), to check on a
CPU that the loss falls on the generated data (``benchmarks/RESULTS.md``, issue 19).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'benchmarks'))
from bench_main import card_name, run_logged, write_classification_checkpoint  # noqa: E402,F401

SEG_CONFIG = ROOT / 'segmentation' / 'configs' / 'upernet_slak_tiny_512_160k_ade20k_ss.py'
DET_CONFIG = (ROOT / 'detection' / 'configs' /
              'cascade_mask_rcnn_slak_tiny_mstrain_480-800_giou_4conv1f_adamw_3x_coco_in1k.py')
TASKS = {  # task -> (framework, shipped config, its custom imports)
    'upernet': ('mmseg', SEG_CONFIG, 'segmentation.slak'),
    'cascade_mask_rcnn': ('mmdet', DET_CONFIG, 'detection.slak'),
}
# backbone -> main.py flags of its classification checkpoint (README commands; width 1.3 for both)
BACKBONE_FLAGS = {
    'SLaK-T': ['--Decom', 'true', '--width_factor', '1.3', '--kernel_size', '51', '49', '47', '13', '5'],
    'ConvNeXt-T': ['--Decom', 'false', '--width_factor', '1.3', '--kernel_size', '7', '7', '7', '7', '100'],
}
SMOKE_BACKBONE_FLAGS = {  # --smoke: same depths (the checkpoint must fit), width 0.125, small kernels
    'SLaK-T': ['--Decom', 'true', '--width_factor', '0.125', '--kernel_size', '7', '7', '5', '5', '3'],
    'ConvNeXt-T': ['--Decom', 'false', '--width_factor', '0.125', '--kernel_size', '3', '3', '3', '3', '100'],
}
RUNS = {  # name -> (task, backbone, extra environment)
    'upernet_slak': ('upernet', 'SLaK-T', {}),
    'upernet_convnext': ('upernet', 'ConvNeXt-T', {}),
    'cascade_slak': ('cascade_mask_rcnn', 'SLaK-T', {}),
    'cascade_convnext': ('cascade_mask_rcnn', 'ConvNeXt-T', {}),
    'cascade_slak_notail': ('cascade_mask_rcnn', 'SLaK-T', {'SLAK_COMPILE_TAIL': '0'}),
}


# ---- data -----------------------------------------------------------------------------------------------------------
def _image_size(rng: np.random.Generator, short_range: Sequence[int]) -> tuple:
    """(width, height) of a natural-looking photo: short side in ``short_range``, landscape or portrait."""
    short = int(rng.integers(short_range[0], short_range[1] + 1))
    aspect = float(rng.choice([4 / 3, 3 / 2, 1.0, 3 / 4, 2 / 3, 16 / 9]))
    return (int(short * aspect), short) if aspect >= 1 else (short, int(short / aspect))


# Class colours: points of a 6 x 6 x 6 grid over [30, 225]^3 (any two at least 39 apart), in a fixed shuffled
# order, so that a class can be told from its colour through JPEG, blur, noise and texture (random colours put some
# classes within 12 of each other).
_PALETTE = np.random.default_rng(1000).permutation(
    np.stack(np.meshgrid(*[np.linspace(30, 225, 6).round()] * 3, indexing='ij'), -1).reshape(-1, 3))


def _class_colour(label: int) -> np.ndarray:
    return _PALETTE[label % len(_PALETTE)].astype(np.int64)


# The ADE20K-style data's folder under --data_root; a new name whenever the generator changes what it writes, so a
# machine that kept the old data writes the new. v2: the "stuff" class covering the background is painted in its
# class colour like every object, so that every labelled pixel can be told from its colour (v1's background had
# random colours: most pixels' labels could not be learnt, and 50 iterations of UperNet showed no falling loss).
# v3: the stuff class is one of the STUFF_CLASSES most frequent ones, as in ADE20K (wall, building, sky, floor, tree,
# ... cover most pixels), not one of 150 equally likely: a class prior that a few dozen iterations can learn.
ADE_DIR = 'ade_v3'
STUFF_CLASSES = 8


def _polygon(rng: np.random.Generator, w: int, h: int, min_side: int) -> List[tuple]:
    """A star-shaped polygon (8-14 vertices) inside the image, at least ``min_side`` px across."""
    rx = float(rng.uniform(min_side / 2, max(min_side / 2 + 1, w / 4)))
    ry = float(rng.uniform(min_side / 2, max(min_side / 2 + 1, h / 4)))
    cx, cy = float(rng.uniform(rx, w - rx)), float(rng.uniform(ry, h - ry))
    angles = np.sort(rng.uniform(0, 2 * np.pi, size=int(rng.integers(8, 15))))
    radii = rng.uniform(0.6, 1.0, size=angles.size)
    return [(float(np.clip(cx + rx * r * np.cos(a), 0, w - 1)), float(np.clip(cy + ry * r * np.sin(a), 0, h - 1)))
            for a, r in zip(angles, radii)]


def _background(rng: np.random.Generator, w: int, h: int):
    from PIL import Image
    base = rng.integers(0, 256, size=(int(rng.integers(2, 6)), int(rng.integers(2, 6)), 3), dtype=np.uint8)
    return Image.fromarray(base).resize((w, h), Image.BICUBIC)


def _finish(img, rng: np.random.Generator):
    """Blur, sensor noise; a PIL image ready to be saved as JPEG."""
    from PIL import Image, ImageFilter
    img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.2))))
    pixels = np.asarray(img, dtype=np.float32) + rng.normal(0, 6, size=(img.size[1], img.size[0], 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _ade_sample(task) -> None:
    """One ADE20K-style pair: JPEG photo + PNG label map (0 = other/ignored, 1..150 = classes)."""
    from PIL import Image, ImageDraw
    image_path, label_path, seed, short_range, classes = task
    rng = np.random.default_rng(seed)
    w, h = _image_size(rng, short_range)
    texture = np.asarray(_background(rng, w, h), dtype=np.float32)
    stuff = int(rng.integers(1, min(STUFF_CLASSES, classes) + 1))  # the rest: a frequent class, with some texture
    img = Image.fromarray(np.clip(0.9 * _class_colour(stuff) + 0.1 * texture, 0, 255).astype(np.uint8))
    labels = Image.new('L', (w, h), stuff)
    draw, draw_label = ImageDraw.Draw(img), ImageDraw.Draw(labels)
    for _ in range(int(rng.integers(3, 9))):
        label = int(rng.integers(0, classes + 1))  # 0: an unlabelled region
        polygon = _polygon(rng, w, h, min_side=max(8, min(w, h) // 8))
        colour = tuple(int(c) for c in np.clip(_class_colour(label) + rng.normal(0, 4, 3), 0, 255))
        draw.polygon(polygon, fill=colour)
        draw_label.polygon(polygon, fill=label)
    _finish(img, rng).save(image_path, quality=int(rng.integers(85, 96)))
    labels.save(label_path)


def write_ade20k(root: Path, n_train: int, n_val: int, workers: int, short_range=(384, 512),
                 classes: int = 150) -> Dict[str, float]:
    """``root/ADEChallengeData2016`` in ADE20K's layout; returns counts and seconds."""
    start = time.time()
    base = root / 'ADEChallengeData2016'
    tasks = []
    for split, n, offset in (('training', n_train, 0), ('validation', n_val, 10 ** 6)):
        (base / 'images' / split).mkdir(parents=True, exist_ok=True)
        (base / 'annotations' / split).mkdir(parents=True, exist_ok=True)
        prefix = 'ADE_train' if split == 'training' else 'ADE_val'
        for i in range(n):
            name = f'{prefix}_{i + 1:08d}'
            tasks.append((str(base / 'images' / split / f'{name}.jpg'),
                          str(base / 'annotations' / split / f'{name}.png'), offset + i, short_range, classes))
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_ade_sample, tasks, chunksize=16))
    return {'train_images': n_train, 'val_images': n_val, 'seconds': round(time.time() - start, 1)}


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE of a binary (h, w) mask: run lengths in column-major order, starting with zeros."""
    flat = mask.astype(np.uint8).flatten(order='F')
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    if flat.size and flat[0] == 1:
        runs = [0] + runs
    return {'counts': runs, 'size': [int(mask.shape[0]), int(mask.shape[1])]}


def _coco_sample(task) -> dict:
    """One COCO-style image and its annotations (image-local ids; ``write_coco`` numbers them)."""
    from PIL import Image, ImageDraw
    from pycocotools import mask as mask_utils
    image_path, seed, short_range, category_ids = task
    rng = np.random.default_rng(seed)
    w, h = _image_size(rng, short_range)
    img = _background(rng, w, h)
    draw = ImageDraw.Draw(img)
    annotations = []
    for k in range(int(rng.integers(1, 7))):
        label = int(rng.integers(0, len(category_ids)))
        polygon = _polygon(rng, w, h, min_side=max(12, min(w, h) // 10))
        colour = tuple(int(c) for c in np.clip(_class_colour(label) + rng.normal(0, 4, 3), 0, 255))
        draw.polygon(polygon, fill=colour)
        mask_img = Image.new('L', (w, h), 0)
        ImageDraw.Draw(mask_img).polygon(polygon, fill=1)
        mask = np.asarray(mask_img, dtype=np.uint8)
        ys, xs = np.nonzero(mask)
        if xs.size == 0:
            continue
        kind = 'polygon' if k % 4 else ('crowd' if k % 8 == 0 else 'rle')
        if kind == 'polygon':
            segmentation = [[round(c, 2) for xy in polygon for c in xy]]
        elif kind == 'crowd':  # COCO's own crowd regions: uncompressed RLE
            segmentation = uncompressed_rle(mask)
        else:
            rle = mask_utils.encode(np.asfortranarray(mask))
            segmentation = {'counts': rle['counts'].decode('ascii'), 'size': list(rle['size'])}
        x0, y0 = int(xs.min()), int(ys.min())
        annotations.append({'category_id': int(category_ids[label]), 'segmentation': segmentation,
                            'area': float(mask.sum()), 'iscrowd': int(kind == 'crowd'),
                            'bbox': [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1]})
    _finish(img, rng).save(image_path, quality=int(rng.integers(85, 96)))
    return {'width': w, 'height': h, 'annotations': annotations}


def write_coco(root: Path, n_train: int, n_val: int, workers: int, short_range=(320, 480),
               classes: int = 12) -> Dict[str, float]:
    """``root/{train2017,val2017,annotations}`` in COCO's layout, objects of the first ``classes`` COCO classes (all 80
    categories listed, by the names mmdet's ``CocoDataset`` matches); returns counts and seconds."""
    from segmentation import mmcv_ext_fallback
    mmcv_ext_fallback.install()  # mmdet.datasets imports mmcv.ops
    from mmdet.datasets.coco import CocoDataset
    start = time.time()
    names = CocoDataset.METAINFO['classes']
    categories = [{'id': i + 1, 'name': name, 'supercategory': 'thing'} for i, name in enumerate(names)]
    counts = {}
    for split, n, offset in (('train2017', n_train, 0), ('val2017', n_val, 10 ** 6)):
        (root / split).mkdir(parents=True, exist_ok=True)
        (root / 'annotations').mkdir(parents=True, exist_ok=True)
        files = [f'{offset + i + 1:012d}.jpg' for i in range(n)]
        tasks = [(str(root / split / f), offset + i, short_range, list(range(1, classes + 1)))
                 for i, f in enumerate(files)]
        with ProcessPoolExecutor(workers) as pool:
            samples = list(pool.map(_coco_sample, tasks, chunksize=16))
        images, annotations = [], []
        for image_id, (file_name, sample) in enumerate(zip(files, samples), start=offset + 1):
            images.append({'id': image_id, 'file_name': file_name, 'width': sample['width'],
                           'height': sample['height']})
            for ann in sample['annotations']:
                annotations.append(dict(ann, id=len(annotations) + 1 + offset, image_id=image_id))
        coco = {'info': {'description': 'synthetic COCO-format data (bench_downstream.py)'}, 'licenses': [],
                'images': images, 'annotations': annotations, 'categories': categories}
        (root / 'annotations' / f'instances_{split}.json').write_text(json.dumps(coco))
        counts[split] = {'images': n, 'annotations': len(annotations),
                         'crowd': sum(a['iscrowd'] for a in annotations),
                         'rle': sum(isinstance(a['segmentation'], dict) for a in annotations)}
    return dict(counts, seconds=round(time.time() - start, 1))


# ---- checkpoints ----------------------------------------------------------------------------------------------------
# ---- runs -----------------------------------------------------------------------------------------------------------
def train_script(framework: str) -> Path:
    """The framework's ``tools/train.py`` as its wheel ships it (``<package>/.mim/tools/train.py``)."""
    spec = importlib.util.find_spec(framework)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f'{framework} is not installed: pip install -r requirements-mm.txt')
    path = Path(list(spec.submodule_search_locations)[0]) / '.mim' / 'tools' / 'train.py'
    if not path.is_file():
        raise SystemExit(f'{path} not found; pass --seg_train_py / --det_train_py (tools/train.py of a clone)')
    return path


def cfg_value(value) -> str:
    """``value`` as mmengine's ``--cfg-options`` parser (``DictAction``) reads it back (no spaces)."""
    if isinstance(value, (list, tuple)):
        inner = ','.join(cfg_value(v) for v in value)
        return f'[{inner}]' if isinstance(value, list) else f'({inner}{"," if len(value) == 1 else ""})'
    return str(value)


def cfg_options(options: Dict[str, object]) -> List[str]:
    return [f'{key}={cfg_value(value)}' for key, value in options.items()]


def run_options(task: str, data_root: Path, checkpoint: Path, backbone: str, iters: int, warmup: int) -> Dict:
    """``--cfg-options`` of a benchmark run: data, checkpoint, backbone kernels, a short iteration-based schedule."""
    options: Dict[str, object] = {
        'model.backbone.init_cfg.checkpoint': str(checkpoint),
        'train_cfg._delete_': True, 'train_cfg.type': 'IterBasedTrainLoop', 'train_cfg.max_iters': iters,
        'train_cfg.val_interval': iters,
        'default_hooks.logger.interval': 1, 'default_hooks.logger.log_metric_by_epoch': False,
        'log_processor.window_size': 1, 'log_processor.by_epoch': False,
        'default_hooks.checkpoint.by_epoch': False, 'default_hooks.checkpoint.interval': -1,
        'default_hooks.checkpoint.save_last': False, 'randomness.seed': 0,
    }
    if warmup:
        options['param_scheduler.0.end'] = warmup
    if task == 'upernet':
        root = data_root / ADE_DIR / 'ADEChallengeData2016'
        for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
            options[f'{loader}.dataset.data_root'] = str(root)
    else:
        root = data_root / 'coco'
        for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
            options[f'{loader}.dataset.data_root'] = str(root) + '/'
        for evaluator in ('val_evaluator', 'test_evaluator'):
            options[f'{evaluator}.ann_file'] = str(root / 'annotations' / 'instances_val2017.json')
        options['model.test_cfg.rcnn.score_thr'] = 0.  # evaluate an under-trained model's boxes too (AP near 0)
    if backbone == 'ConvNeXt-T':
        decom_key = 'Decom' if task == 'upernet' else 'LoRA'
        options.update({'model.backbone.kernel_size': [7, 7, 7, 7, 100], f'model.backbone.{decom_key}': False})
    return options


def _cpu_loader_options() -> Dict[str, object]:
    """No loader worker processes (the CPU checks)."""
    options: Dict[str, object] = {}
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        options.update({f'{loader}.num_workers': 0, f'{loader}.persistent_workers': False})
    return options


def _upernet_crop_options(crop: int) -> Dict[str, object]:
    """UperNet on ``crop`` x ``crop`` crops of images resized to a short side of ``crop`` (the config: 512), slid
    over at test time with a third of overlap."""
    stride = round(crop * 2 / 3)
    return {'model.data_preprocessor.size': (crop, crop), 'model.test_cfg.crop_size': (crop, crop),
            'model.test_cfg.stride': (stride, stride), 'train_dataloader.dataset.pipeline.2.scale': (4 * crop, crop),
            'train_dataloader.dataset.pipeline.3.crop_size': (crop, crop),
            'val_dataloader.dataset.pipeline.1.scale': (4 * crop, crop)}


def learning_check_options(crop: int = 128) -> Dict[str, object]:
    """``--learning_check``: UperNet as configured (full-width backbone and heads, lr, batch) on crops of ``crop``
    px, no loader workers: on CPU, whether the loss falls within the benchmark's iterations on this data."""
    return {**_cpu_loader_options(), **_upernet_crop_options(crop)}


def smoke_options(task: str, backbone: str) -> Dict[str, object]:
    """``--smoke``: width-0.125 backbones, 32-channel heads, images of ~64-128 px, no loader workers (CPU check)."""
    kernels = [7, 7, 5, 5, 3] if backbone == 'SLaK-T' else [3, 3, 3, 3, 100]
    channels = [12, 24, 48, 96]
    options: Dict[str, object] = {'model.backbone.width_factor': 0.125, 'model.backbone.kernel_size': kernels,
                                  **_cpu_loader_options()}
    if task == 'upernet':
        options.update({
            **_upernet_crop_options(64), 'model.decode_head.in_channels': channels,
            'model.decode_head.channels': 16, 'model.auxiliary_head.in_channels': 48,
            'model.auxiliary_head.channels': 8})
        return options
    scales = [(96, 160), (128, 213)]
    options.update({
        'model.neck.in_channels': channels, 'model.neck.out_channels': 32, 'model.rpn_head.in_channels': 32,
        'model.rpn_head.feat_channels': 32, 'model.roi_head.bbox_roi_extractor.out_channels': 32,
        'model.roi_head.mask_roi_extractor.out_channels': 32, 'model.roi_head.mask_head.in_channels': 32,
        'model.roi_head.mask_head.conv_out_channels': 32, 'model.train_cfg.rpn_proposal.nms_pre': 200,
        'model.train_cfg.rpn_proposal.max_per_img': 100, 'model.test_cfg.rpn.nms_pre': 200,
        'model.test_cfg.rpn.max_per_img': 50,
        'train_dataloader.dataset.pipeline.3.transforms.0.0.scales': scales,
        'train_dataloader.dataset.pipeline.3.transforms.1.0.scales': [(64, 160), (80, 160)],
        'train_dataloader.dataset.pipeline.3.transforms.1.1.crop_size': (48, 80),
        'train_dataloader.dataset.pipeline.3.transforms.1.2.scales': scales,
        'val_dataloader.dataset.pipeline.1.scale': (213, 128)})
    for stage in range(3):
        options.update({f'model.roi_head.bbox_head.{stage}.in_channels': 32,
                        f'model.roi_head.bbox_head.{stage}.conv_out_channels': 32,
                        f'model.roi_head.bbox_head.{stage}.fc_out_channels': 64,
                        f'model.train_cfg.rcnn.{stage}.sampler.num': 32})
    return options


def probe_config(path: Path, task: str, probe_file: Path, profile_iters: Sequence[int]) -> Path:
    """The shipped config of ``task`` plus ``downstream_probe`` (a custom import and its hook), written to ``path``.
    (``--cfg-options`` cannot add these: the tools import ``custom_imports`` when reading the file, and dicts in
    ``custom_hooks`` have no command-line syntax.)"""
    _, config, imports = TASKS[task]
    hook = dict(type='DownstreamProbeHook', out_file=str(probe_file), profile_iters=list(profile_iters),
                expect_box_ops=task == 'cascade_mask_rcnn')
    path.write_text(f'# {task} as shipped, plus benchmarks/downstream_probe.py (written by bench_downstream.py)\n'
                    f'_base_ = [{str(config)!r}]\n'
                    f'custom_imports = dict(imports=[{imports!r}, "downstream_probe"], allow_failed_imports=False)\n'
                    f'custom_hooks = [{hook!r}]\n')
    return path


def read_scalars(work_dir: Path) -> List[dict]:
    """The lines of mmengine's ``<work_dir>/<timestamp>/vis_data/scalars.json`` (the latest run's)."""
    files = sorted(work_dir.glob('*/vis_data/scalars.json'))
    if not files:
        return []
    return [json.loads(line) for line in files[-1].read_text().splitlines() if line.strip()]


def parse_scalars(lines: List[dict], skip: int, untimed_tail: int) -> Dict[str, object]:
    """Figures of one run from its scalars (``iter`` is 1-based; validation lines have no ``loss``).

    ``iter_s``: median ``time`` (data + step, per mmengine's IterTimerHook) of iterations ``skip + 1`` to
    ``iters - untimed_tail``; ``memory`` is logged in MB."""
    train = {int(r['iter']): r for r in lines if 'loss' in r and 'iter' in r}
    iters = sorted(train)
    out: Dict[str, object] = {'iters': len(iters)}
    if not iters:
        return out
    losses = [float(train[i]['loss']) for i in iters]
    times = [float(train[i]['time']) for i in iters if 'time' in train[i]]
    steady = [float(train[i]['time']) for i in iters if skip < i <= iters[-1] - untimed_tail and 'time' in train[i]]
    median = statistics.median(steady) if steady else None
    memory = [float(train[i]['memory']) for i in iters if 'memory' in train[i] and i > skip]
    memory_first = [float(train[i]['memory']) for i in iters if 'memory' in train[i] and i <= skip]
    out.update({
        'iter_s': median, 'iter_s_mean': statistics.fmean(steady) if steady else None, 'timed_iters': len(steady),
        'slow_iters': sum(t > 2 * median for t in steady) if median else None,
        'data_time_s': statistics.median([float(train[i].get('data_time', 0)) for i in iters[skip:]] or [0.]),
        'first_loss': losses[0], 'last_loss': losses[-1],
        'loss_first5': statistics.fmean(losses[:5]), 'loss_last5': statistics.fmean(losses[-5:]),
        'loss_finite': all(math.isfinite(v) for v in losses),
        'peak_mem_gb': round(max(memory) / 1024, 2) if memory else None,
        'peak_mem_gb_first_iters': round(max(memory_first) / 1024, 2) if memory_first else None,
        'iter_times': [round(t, 4) for t in times], 'losses': [round(v, 4) for v in losses],
    })
    out['loss_decreased'] = out['loss_finite'] and out['loss_last5'] < out['loss_first5']
    metric_lines = [r for r in lines if 'loss' not in r and any(k in r for k in ('mIoU', 'coco/bbox_mAP'))]
    out['metrics'] = {k: v for k, v in metric_lines[-1].items() if k not in ('step', 'data_time', 'time')} \
        if metric_lines else {}
    return out


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default='benchmarks/results', help='folder for the JSON files')
    parser.add_argument('--data_root', default='/tmp/bench_downstream_data', help='where the data is written (kept)')
    parser.add_argument('--work_root', default='/tmp/bench_downstream_runs',
                        help='checkpoints, configs and work dirs (removed at the start)')
    parser.add_argument('--runs', default='all', help=f'comma-separated subset of {", ".join(RUNS)}, in run order')
    parser.add_argument('--iters', type=int, default=50, help='training iterations per run (>= 50 for issue 19)')
    parser.add_argument('--skip_iters', type=int, default=10, help='iterations left out of iter_s (warm-up)')
    parser.add_argument('--profile_iters', type=int, default=2,
                        help='last detection iterations run under torch.profiler (left out of iter_s); 0: none')
    parser.add_argument('--warmup_iters', type=int, default=10,
                        help='linear warmup of the runs (the configs: 1500 / 500); 0 keeps the config\'s')
    parser.add_argument('--train_images', type=int, default=240)
    parser.add_argument('--val_images', type=int, default=16)
    parser.add_argument('--sparsity', type=float, default=0.4, help='zeros in the SLaK-T checkpoint')
    parser.add_argument('--amp', action='store_true', help='pass --amp to tools/train.py (the configs train fp32)')
    parser.add_argument('--workers', type=int, default=os.cpu_count(), help='processes writing the data')
    parser.add_argument('--budget_s', type=float, default=400, help='no run starts or goes on after this many s')
    parser.add_argument('--run_timeout_s', type=float, default=240)
    parser.add_argument('--cache_root', default='',
                        help="the runs' Inductor/Triton caches (kept); default: under --work_root")
    parser.add_argument('--seg_train_py', default='', help="mmsegmentation's tools/train.py (default: the wheel's)")
    parser.add_argument('--det_train_py', default='', help="mmdet's tools/train.py (default: the wheel's)")
    parser.add_argument('--smoke', action='store_true', help='tiny models and images: a CPU check of the chain')
    parser.add_argument('--learning_check', action='store_true',
                        help='with --smoke and --runs upernet_slak: the configured model on 128 px crops (CPU, '
                             '~4 s an iteration): does the loss fall on this data?')
    args = parser.parse_args(argv)
    t0 = time.time()
    wanted = list(RUNS) if args.runs == 'all' else args.runs.split(',')
    unknown = [r for r in wanted if r not in RUNS]
    if unknown:
        raise SystemExit(f'--runs: unknown {unknown}; choose from {list(RUNS)}')
    card = card_name()
    out_dir, data_root, work_root = Path(args.out), Path(args.data_root), Path(args.work_root)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work_root, ignore_errors=True)
    work_root.mkdir(parents=True)
    caches = Path(args.cache_root) if args.cache_root else work_root / 'cache'
    tools = {'mmseg': Path(args.seg_train_py) if args.seg_train_py else train_script('mmseg'),
             'mmdet': Path(args.det_train_py) if args.det_train_py else train_script('mmdet')}
    report: Dict[str, object] = {'card': card, 'args': vars(args), 'train_py': {k: str(v) for k, v in tools.items()},
                                 'compile_cache_was_warm': caches.is_dir() and any(caches.iterdir()), 'runs': {}}
    records: List[dict] = []

    def save() -> None:
        (out_dir / f'downstream_{card}.json').write_text(json.dumps(records, indent=1))
        (out_dir / f'downstream_{card}_runs.json').write_text(json.dumps(report, indent=1))

    # data and checkpoints
    tasks_wanted = {RUNS[r][0] for r in wanted}
    short = {'upernet': (64, 96), 'cascade_mask_rcnn': (64, 128)} if args.smoke else \
        {'upernet': (384, 512), 'cascade_mask_rcnn': (320, 480)}
    report['data'] = {}
    if 'upernet' in tasks_wanted:
        if not (data_root / ADE_DIR / 'ADEChallengeData2016' / 'annotations' / 'validation').is_dir():
            report['data']['ade20k'] = write_ade20k(data_root / ADE_DIR, args.train_images, args.val_images,
                                                    args.workers, short['upernet'])
    if 'cascade_mask_rcnn' in tasks_wanted:
        if not (data_root / 'coco' / 'annotations' / 'instances_val2017.json').is_file():
            report['data']['coco'] = write_coco(data_root / 'coco', args.train_images, args.val_images, args.workers,
                                                short['cascade_mask_rcnn'])
    flags = SMOKE_BACKBONE_FLAGS if args.smoke and not args.learning_check else BACKBONE_FLAGS
    checkpoints, report['checkpoints'] = {}, {}
    for backbone in sorted({RUNS[r][1] for r in wanted}):
        path = work_root / f'{backbone}_classification.pth'
        report['checkpoints'][backbone] = write_classification_checkpoint(
            path, flags[backbone], args.sparsity if backbone == 'SLaK-T' else 0.)
        checkpoints[backbone] = path
    print(f'data: {report["data"]}\ncheckpoints: {report["checkpoints"]}', flush=True)
    save()

    for name in wanted:
        task, backbone, extra_env = RUNS[name]
        left = args.budget_s - (time.time() - t0)
        if left < 30:
            print(f'{name}: skipped (time budget)', flush=True)
            report['runs'][name] = {'skipped': 'time budget'}
            save()
            continue
        framework = TASKS[task][0]
        run_dir = work_root / name
        run_dir.mkdir()
        profile = [args.iters - args.profile_iters, args.iters] \
            if task == 'cascade_mask_rcnn' and args.profile_iters else []
        config = probe_config(run_dir / 'config.py', task, run_dir / 'probe.json', profile)
        options = run_options(task, data_root, checkpoints[backbone], backbone, args.iters, args.warmup_iters)
        if args.learning_check:
            options.update(learning_check_options())
        elif args.smoke:
            options.update(smoke_options(task, backbone))
        cmd = [sys.executable, '-m', 'segmentation.mmcv_ext_fallback', str(tools[framework]), str(config),
               '--work-dir', str(run_dir / 'work'), *(['--amp'] if args.amp else []),
               '--cfg-options', *cfg_options(options)]
        env = dict(os.environ, PYTHONUNBUFFERED='1', TORCHINDUCTOR_CACHE_DIR=str(caches / 'inductor'),
                   TRITON_CACHE_DIR=str(caches / 'triton'),
                   PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / 'benchmarks'), os.environ.get('PYTHONPATH', '')]))
        env.update(extra_env)
        lines = run_logged(cmd, env, min(args.run_timeout_s, left))
        exit_code = next((int(line.rsplit(' ', 1)[1]) for _, line in reversed(lines)
                          if line.startswith('bench_main: exit code')), None)
        parsed = parse_scalars(read_scalars(run_dir / 'work'), args.skip_iters, args.profile_iters if profile else 0)
        probe = json.loads((run_dir / 'probe.json').read_text()) if (run_dir / 'probe.json').is_file() else {}
        graphs = probe.get('tail_graphs_by_iter') or []
        compile_by_iter = probe.get('compile_s_by_iter') or []
        parsed.update({
            'exit_code': exit_code, 'wall_s': round(lines[-1][0], 1), 'env': extra_env,
            'compiled_tail_graphs': (probe.get('tail') or {}).get('graphs'),
            'tail_graphs_after_skip': graphs[args.skip_iters - 1] if len(graphs) >= args.skip_iters else None,
            'compile_s_train': compile_by_iter[-1] if compile_by_iter else None,
            'compile_s_timed': round(compile_by_iter[-1] - compile_by_iter[args.skip_iters - 1], 2)
            if len(compile_by_iter) > args.skip_iters and None not in compile_by_iter else None,
            'probe': probe, 'command': ' '.join(cmd[1:]),
            'log_tail': [f'{t:7.1f} {line[:300]}' for t, line in lines if not line.startswith(('|', '+'))][-40:],
            'errors': [f'{t:7.1f} {line[:300]}' for t, line in lines if 'Error' in line or 'Traceback' in line][:20]})
        report['runs'][name] = parsed
        records.append({
            'task': task, 'backbone': backbone, 'iters': parsed['iters'], 'iter_s': parsed.get('iter_s'),
            **{key: parsed.get(key) for key in ('peak_mem_gb', 'peak_mem_gb_first_iters', 'first_loss', 'last_loss',
                                                'loss_first5', 'loss_last5')},
            'nms_roi_on_gpu': probe.get('box_ops_on_gpu'),
            'compiled_tail_graphs': parsed['compiled_tail_graphs'], 'card': card,
            'compile_tail': extra_env.get('SLAK_COMPILE_TAIL', 'default'), 'amp': args.amp,
            'tail_compile_s': parsed['compile_s_train'], 'loss_decreased': parsed.get('loss_decreased'),
            'metrics': parsed.get('metrics'), 'box_op_calls': probe.get('box_op_calls'), 'exit_code': exit_code,
            'triton_compiles': (probe.get('triton') or {}).get('compiles'),
            'triton_compile_s': (probe.get('triton') or {}).get('seconds')})
        print(f'{name}: exit {exit_code}, {parsed["iters"]} iters, iter_s {parsed.get("iter_s")}, loss '
              f'{parsed.get("first_loss")} -> {parsed.get("last_loss")}, peak {parsed.get("peak_mem_gb")} GB, tail '
              f'graphs {parsed["compiled_tail_graphs"]}, compile {parsed["compile_s_train"]} s, Triton kernels '
              f'compiled {probe.get("triton")}, box ops {probe.get("box_op_calls")}, metrics {parsed.get("metrics")}',
              flush=True)
        save()

    base = {r['task']: r['iter_s'] for r in records if r['backbone'] == 'ConvNeXt-T' and r['iter_s']}
    for r in records:
        r['ratio_to_convnext'] = round(r['iter_s'] / base[r['task']], 3) \
            if r['iter_s'] and r['task'] in base else None
    save()
    print(f'\n{"task":18s} {"backbone":10s} {"tail":7s} {"iters":>5s} {"s/iter":>7s} {"ratio":>6s} {"peak GB":>7s} '
          f'{"loss first->last":>17s} {"metric":>15s} {"box ops GPU":>11s} {"graphs":>6s} {"compile s":>9s}')
    for r in records:
        metric = next((f'{k.split("/")[-1]} {v:.2f}' for k, v in (r['metrics'] or {}).items()
                       if k in ('mIoU', 'coco/segm_mAP')), '-')

        def f(v, fmt='{:.3f}'):
            return fmt.format(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)
        print(f'{r["task"]:18s} {r["backbone"]:10s} {r["compile_tail"]:7s} {r["iters"]:5d} {f(r["iter_s"]):>7s} '
              f'{f(r["ratio_to_convnext"], "{:.2f}"):>6s} {f(r["peak_mem_gb"], "{:.1f}"):>7s} '
              f'{f(r["first_loss"], "{:.2f}"):>8s}->{f(r["last_loss"], "{:.2f}"):<8s} {metric:>15s} '
              f'{str(r["nms_roi_on_gpu"]):>11s} {f(r["compiled_tail_graphs"], "{}"):>6s} '
              f'{f(r["tail_compile_s"], "{:.1f}"):>9s}')
    print(f'total {time.time() - t0:.0f} s')
    return report


if __name__ == '__main__':
    main()
