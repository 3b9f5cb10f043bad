"""End to end, as a user meets it: ``main.py`` with the README's SLaK-T recipe on a JPEG ImageFolder, next to timm's
``convnext_tiny`` (eager and ``--compile true``) with the same flags, and next to the same models' bare steps.

Run on a CUDA machine from the repository root::

    python benchmarks/bench_main.py --out results/ [--data_path /path/to/imagenet-like] [--runs all] \
        [--gpu_pipeline true]

Without ``--data_path`` it first writes an ImageNet-like folder on local disk (``--train_images`` 12,800 /
``--val_images`` 1,280 over 100 classes; JPEGs of natural sizes around 500x375 whose content is smooth colour fields,
shapes and sensor-like noise, ~60-120 KB each, so decoding costs what ImageNet's does). Then, per model, each in its
own process with the wall time of every log line recorded:

* ``main.py`` for ``--epochs`` (>= 2) epochs at ``--batch_size`` 128, bf16 AMP, EMA + EMA evaluation, the default
  augmentation (RandAugment, mixup/cutmix, random erasing), ``--num_workers`` = cores; SLaK-T adds ``--sparse``
  (SNIP, 40 %), ``-u 100`` (so prune/grow happens inside the run), ``--Decom true``, 51 49 47 13 5, width 1.3.
  SLaK-T runs twice: once with empty Inductor/Triton caches (a fresh machine, "cold") and once reusing them ("warm").
* the loader alone (main.py's dataset and transforms, same batch and workers), in img/s;
* ``bench_throughput.py`` at the same batch (eager and CUDA-graph replays) for the host-overhead ratio.

Reported per model: steady img/s (the median of main.py's 20-step windows in the last epoch, ``--print_freq 20``,
leaving out windows with a prune/grow update; their mean with them as ``img_s_with_updates``), seconds from launch
to the first training step (cold / warm), the first evaluation's seconds, evaluation img/s, peak GPU memory of
training and of start-up (SNIP), the phases of start-up. ``--gpu_pipeline true`` passes the flag to every main.py run
(decoding and augmentation on the GPU) and times that loader (bytes read by the workers, decoded and augmented on
the GPU); its files end in ``_gpu_pipeline``. Writes ``e2e_<card>.json`` (the records of issue 18) and
``e2e_<card>_runs.json`` (everything parsed, plus the log tails) under ``--out`` after every run, so a run that is cut
off still leaves what was measured.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

SLAK_T_FLAGS = ['--model', 'SLaK_tiny', '--Decom', 'true', '--sparse', '--width_factor', '1.3', '-u', '100',
                '--sparsity', '0.4', '--sparse_init', 'snip', '--prune_rate', '0.5', '--growth', 'random',
                '--kernel_size', '51', '49', '47', '13', '5']
CONVNEXT_FLAGS = ['--model', 'convnext_tiny']
COMMON_FLAGS = ['--print_freq', '20', '--drop_path', '0.1', '--lr', '4e-3', '--update_freq', '1', '--model_ema', 'true',
                '--model_ema_eval', 'true', '--use_amp', 'true', '--amp_dtype', 'bfloat16', '--warmup_epochs', '1']

# ---- data -----------------------------------------------------------------------------------------------------------


_NOISE = {}


def _noise_tile(rng: np.random.Generator) -> np.ndarray:
    """A per-process bank of fine texture + sensor noise (drawn once; each image takes a random crop of it)."""
    if 'tile' not in _NOISE:
        texture = rng.normal(0, 10, size=(257, 257, 1)).repeat(4, 0).repeat(4, 1)
        _NOISE['tile'] = (texture + rng.normal(0, 6, size=(1028, 1028, 3))).astype(np.float32)
    return _NOISE['tile']


def _one_image(task) -> int:
    """Write one JPEG: a smooth random colour field (upsampled noise), a few filled shapes in a class-dependent
    palette, blur, a fine texture and sensor noise; natural aspect ratios and sizes (short side 300-500 px)."""
    from PIL import Image, ImageDraw, ImageFilter
    path, label, seed = task
    rng = np.random.default_rng(seed)
    short = int(rng.integers(300, 501))
    aspect = float(rng.choice([4 / 3, 3 / 2, 1.0, 3 / 4, 16 / 9]))
    w, h = (int(short * aspect), short) if aspect >= 1 else (short, int(short / aspect))
    base = rng.integers(0, 256, size=(int(rng.integers(3, 7)), int(rng.integers(3, 7)), 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    palette = np.random.default_rng(label).integers(0, 256, size=(4, 3))
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(w // 10, w // 2)), y0 + int(rng.integers(h // 10, h // 2))
        colour = tuple(int(c) for c in np.clip(palette[rng.integers(0, 4)] + rng.normal(0, 20, 3), 0, 255))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.0))))
    tile = _noise_tile(rng)
    oy, ox = int(rng.integers(0, tile.shape[0] - h + 1)), int(rng.integers(0, tile.shape[1] - w + 1))
    pixels = np.asarray(img, dtype=np.float32) + tile[oy:oy + h, ox:ox + w]
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=int(rng.integers(85, 96)))
    return os.path.getsize(path)


def write_jpeg_folder(root: Path, n_train: int, n_val: int, classes: int, workers: int) -> Dict[str, float]:
    """``root/{train,val}/<class>/*.JPEG`` (ImageNet's layout); returns counts, mean file size and seconds."""
    start = time.time()
    tasks = []
    for split, n, offset in (('train', n_train, 0), ('val', n_val, 10 ** 7)):
        for c in range(classes):
            (root / split / f'n{c:08d}').mkdir(parents=True, exist_ok=True)
        for i in range(n):
            label = i % classes
            tasks.append((str(root / split / f'n{label:08d}' / f'{split}_{i:06d}.JPEG'), label, offset + i))
    with ProcessPoolExecutor(workers) as pool:
        sizes = list(pool.map(_one_image, tasks, chunksize=64))
    return {'train_images': n_train, 'val_images': n_val, 'classes': classes,
            'mean_kb': float(np.mean(sizes)) / 1024, 'seconds': time.time() - start}


# ---- runs -----------------------------------------------------------------------------------------------------------
STEP_LINE = re.compile(r'^Epoch: \[(\d+)\]\s+\[\s*(\d+)/(\d+)\]')
EPOCH_END = re.compile(r'^Epoch: \[(\d+)\] Total time')
EVAL_END = re.compile(r'^\* Acc@1')
IPS = re.compile(r'img/s: ([\d.]+)')
MEM = re.compile(r'max mem: (\d+)')
PRECOMPILED = re.compile(r'^Triton kernels: (\d+) versions compiled ahead of the first step in ([\d.]+) s')
CAPTURED = re.compile(r'^CUDA graphs: training forward and backward captured at batch \d+ in ([\d.]+) s')
GRAPHS_AHEAD = re.compile(r'^Block tails: (\d+) training graphs traced ahead of the first step in ([\d.]+) s')
SNIP_TIMES = re.compile(r'^SNIP: first batch in ([\d.]+) s, scoring pass in ([\d.]+) s')
PHASES = {  # first log line of each start-up phase (main.py's order)
    'data_ready': re.compile(r'^(Mixup is activated|Model: )'),
    'masks_ready': re.compile(r'^sparse masks'),
    'flops_counted': re.compile(r'^model: '),
    'training_starts': re.compile(r'^Start training'),
}


def card_label(device_name: str) -> str:
    """The card as result files name it: 'NVIDIA H100 80GB HBM3' -> 'H100_80GB_HBM3'."""
    return device_name.replace('NVIDIA ', '').replace(' ', '_')


def card_name() -> str:
    """:func:`card_label` of this machine's GPU, or 'cpu'."""
    import torch
    return card_label(torch.cuda.get_device_name()) if torch.cuda.is_available() else 'cpu'


def run_logged(cmd: List[str], env: Dict[str, str], timeout: float) -> List[tuple]:
    """Run ``cmd``; return ``(seconds since launch, line)`` for every line of its stdout+stderr.

    After ``timeout`` seconds the command and everything it started (its process group: data loader workers) are
    killed, whether or not it is still printing."""
    start = time.time()
    lines = []
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True)
    timer = threading.Timer(timeout, os.killpg, (proc.pid, signal.SIGKILL))
    timer.start()
    try:
        for line in proc.stdout:
            lines.append((time.time() - start, line.rstrip('\n')))
    finally:
        proc.wait()
        timer.cancel()
    if time.time() - start >= timeout and proc.returncode == -signal.SIGKILL:
        lines.append((time.time() - start, f'bench_main: killed after {timeout:.0f} s'))
    lines.append((time.time() - start, f'bench_main: exit code {proc.returncode}'))
    return lines


def parse_main_log(lines: List[tuple], val_images: int) -> Dict[str, Optional[float]]:
    """Figures of one main.py run from its time-stamped log (see module docstring)."""
    out: Dict[str, Optional[float]] = {'first_step_s': None, 'img_s': None, 'peak_mem_gb': None,
                                       'startup_peak_mem_gb': None, 'first_eval_s': None, 'eval_img_s': None}
    for key, pattern in PHASES.items():
        out[key + '_s'] = next((t for t, line in lines if pattern.search(line)), None)
    windows: Dict[int, List[tuple]] = {}  # epoch -> (img/s of the 20-step window, a prune/grow inside it)
    mems, evals = [], []
    epoch_end_t = None
    update_in_window = False
    for t, line in lines:
        if line.startswith('prune/grow at step'):
            update_in_window = True
        step = STEP_LINE.search(line)
        if step and out['first_step_s'] is None:
            out['first_step_s'] = t
        if step:
            m = IPS.search(line)
            if m and int(step.group(2)) >= 19:  # a full window of 20 steps, all in this epoch
                windows.setdefault(int(step.group(1)), []).append((float(m.group(1)), update_in_window))
            update_in_window = False
            m = MEM.search(line)
            if m:
                mems.append(float(m.group(1)) / 1024)
        m = GRAPHS_AHEAD.search(line)
        if m:  # the training tail graphs traced in a background thread (SLAK_WARM_GRAPHS, on by default)
            out['graphs_ahead'], out['graphs_ahead_s'] = int(m.group(1)), float(m.group(2))
        m = SNIP_TIMES.search(line)
        if m:  # SNIP's wait for its batch and its scoring pass
            out['snip_batch_s'], out['snip_pass_s'] = float(m.group(1)), float(m.group(2))
        m = PRECOMPILED.search(line)
        if m:  # the step's Triton kernels compiled in a background thread (main.py's default on CUDA)
            out['precompiled_kernels'], out['precompile_s'] = int(m.group(1)), float(m.group(2))
        if line.startswith('Peak GPU memory before training'):
            m = re.search(r'([\d.]+) GiB', line)
            out['startup_peak_mem_gb'] = float(m.group(1)) if m else None
        if line.startswith('Peak GPU memory reserved'):  # the footprint (CUDA graphs keep a pool of their own)
            m = re.search(r'([\d.]+) GiB', line)
            out['peak_reserved_gb'] = float(m.group(1)) if m else None
        m = CAPTURED.search(line)
        if m:  # --cuda_graph true: the capture's seconds
            out['graph_capture_s'] = float(m.group(1))
        if EPOCH_END.search(line):
            epoch_end_t = t
        elif EVAL_END.search(line) and epoch_end_t is not None:
            evals.append(t - epoch_end_t)
            epoch_end_t = t  # the EMA evaluation follows the raw one
    if windows:
        last = windows[max(windows)]
        clean = [ips for ips, update in last if not update] or [ips for ips, _ in last]
        out['img_s'] = float(np.median(clean))
        out['img_s_with_updates'] = float(np.mean([ips for ips, _ in last]))
    out['peak_mem_gb'] = max(mems) if mems else None
    if evals:
        out['first_eval_s'] = evals[0]
        out['eval_img_s'] = val_images / min(evals)
    out['exit_code'] = next((int(line.rsplit(' ', 1)[1]) for _, line in reversed(lines)
                             if line.startswith('bench_main: exit code')), None)
    return out


TEST_LINE = re.compile(r'^Test:\s+\[\s*(\d+)/(\d+)\]')
ACCURACY = re.compile(r'^Accuracy of the network on (\d+) test images: ([\d.]+)%')
EVAL_FLAGS = ['--model', 'SLaK_tiny', '--eval', 'true', '--Decom', 'True', '--kernel_size', '51', '49', '47', '13',
              '5', '--width_factor', '1.3', '--input_size', '224', '--drop_path', '0.2']  # the README's command


# main.py runs: name -> (model flags, cache folder: runs sharing one are cold then warm, environment)
MAIN_RUNS: Dict[str, Tuple[List[str], str, Dict[str, str]]] = {
    'slak_cold': (SLAK_T_FLAGS, 'slak', {}),
    'convnext': (CONVNEXT_FLAGS, 'convnext', {}),
    'convnext_compile': (CONVNEXT_FLAGS + ['--compile', 'true'], 'convnext', {}),
    # ConvNeXt-T with its training step replayed as CUDA graphs too ('auto' leaves models other than SLaK eager)
    'convnext_graph': (CONVNEXT_FLAGS + ['--cuda_graph', 'true'], 'convnext', {}),
    'slak_warm': (SLAK_T_FLAGS, 'slak', {}),
    'slak_compile': (SLAK_T_FLAGS + ['--compile', 'true'], 'slak_compile', {}),  # cold caches
    # the whole-model compile replayed as CUDA graphs by torch.compile (no per-kernel launch cost)
    'slak_compile_ro': (SLAK_T_FLAGS + ['--compile', 'true', '--compile_mode', 'reduce-overhead'], 'slak_compile_ro',
                        {}),
    # the README's command with --cuda_graph true / false: forward and backward replayed as CUDA graphs
    # (main.graph_training_forward; what 'auto', the default, does for SLaK since session 13) or eager launches;
    # both share slak's caches (warm after slak_cold)
    'slak_graph': (SLAK_T_FLAGS + ['--cuda_graph', 'true'], 'slak', {}),
    'slak_eager': (SLAK_T_FLAGS + ['--cuda_graph', 'false'], 'slak', {}),
    # without the background compile of the step's Triton kernels (main.py's default), own caches
    'slak_cold_noprecompile': (SLAK_T_FLAGS, 'slak_noprecompile', {'SLAK_PRECOMPILE': '0'}),
    'slak_warm_noprecompile': (SLAK_T_FLAGS, 'slak_noprecompile', {'SLAK_PRECOMPILE': '0'}),
    # the training tail graphs traced ahead in a background thread (main.py's default since session 14), own caches
    'slak_cold_graphs': (SLAK_T_FLAGS, 'slak_graphs', {'SLAK_WARM_GRAPHS': '1'}),
    'slak_warm_graphs': (SLAK_T_FLAGS, 'slak_graphs', {'SLAK_WARM_GRAPHS': '1'}),
    # without that background trace (SLAK_WARM_GRAPHS=0): warm with slak's caches (after slak_cold), the A/B of
    # slak_warm; cold with caches of its own, the A/B of slak_cold
    'slak_warm_nowg': (SLAK_T_FLAGS, 'slak', {'SLAK_WARM_GRAPHS': '0'}),
    'slak_cold_nowg': (SLAK_T_FLAGS, 'slak_nowg', {'SLAK_WARM_GRAPHS': '0'}),
    # one compiled tail graph for every stage (SLAK_TAIL_SHAPES=dynamic: symbolic channels and map sizes), own caches
    'slak_cold_dyn': (SLAK_T_FLAGS, 'slak_dyn', {'SLAK_TAIL_SHAPES': 'dynamic'}),
    'slak_warm_dyn': (SLAK_T_FLAGS, 'slak_dyn', {'SLAK_TAIL_SHAPES': 'dynamic'}),
}
THROUGHPUT_MODELS = ('SLaK-T ours', 'convnext_tiny (timm)', 'convnext_tiny (timm) torch.compile')
DEFAULT_MAIN_RUNS = ('slak_cold', 'convnext', 'convnext_compile', 'slak_warm')
EVAL_RUNS = {  # main.py --eval true runs (issue 20): the README's command as written (fp32, batch 64 -> 96 per
    # evaluation batch), in bf16 at --batch_size (x1.5 per evaluation batch), and that with the JPEGs decoded on the GPU
    'slak_eval': [],
    'slak_eval_bf16': ['--use_amp', 'true', '--amp_dtype', 'bfloat16'],
    'slak_eval_bf16_gpu': ['--use_amp', 'true', '--amp_dtype', 'bfloat16', '--gpu_pipeline', 'true'],
    # and with --gpu_pipeline_cpu_share (the benchmark's --eval_cpu_share): both decoders at once
    'slak_eval_bf16_mix': ['--use_amp', 'true', '--amp_dtype', 'bfloat16', '--gpu_pipeline', 'true'],
}
OTHER_RUNS = ('loader', 'throughput', 'throughput_graph', *EVAL_RUNS, 'eval_loader', 'eval_loader_gpu',
              'eval_loader_mix')


def main_run_order(runs: str) -> List[str]:
    """The main.py runs ``--runs`` asks for, in its order ("all": the default four); an unknown name is an error."""
    if runs == 'all':
        return list(DEFAULT_MAIN_RUNS)
    names = [n for n in runs.split(',') if n]
    unknown = [n for n in names if n not in MAIN_RUNS and n not in OTHER_RUNS]
    if unknown or not names:
        raise ValueError(f'--runs: unknown run(s) {unknown!r}; the runs are: {", ".join([*OTHER_RUNS, *MAIN_RUNS])}')
    return [n for n in dict.fromkeys(names) if n in MAIN_RUNS]


def parse_eval_log(lines: List[tuple]) -> Dict[str, Optional[float]]:
    """Figures of a ``main.py --eval true`` log of (seconds since launch, line): the last progress line's img/s
    (the meter's window: the steady rate), seconds from launch to the first batch done (first progress line) and to
    the end (the accuracy line), the images counted and their top-1."""
    out: Dict[str, Optional[float]] = {'eval_img_s': None, 'first_batch_s': None, 'done_s': None, 'images': None,
                                       'acc1': None, 'exit_code': None}
    for t, line in lines:
        if TEST_LINE.search(line):
            if out['first_batch_s'] is None:
                out['first_batch_s'] = t
            m = IPS.search(line)
            if m:
                out['eval_img_s'] = float(m.group(1))
        m = ACCURACY.search(line)
        if m:
            out['done_s'], out['images'], out['acc1'] = t, int(m.group(1)), float(m.group(2))
        if line.startswith('bench_main: exit code'):
            out['exit_code'] = int(line.rsplit(' ', 1)[1])
    return out


def write_classification_checkpoint(path: Path, flags: List[str], sparsity: float, seed: int = 0) -> Dict[str, float]:
    """A ``main.py``-style checkpoint of ``SLaK_tiny`` built from ``main.py`` flags; with ``sparsity`` > 0, that share
    of every 2-D/4-D weight (what ``main.py --sparse`` masks) is set to exactly zero, uniformly at random."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import torch
    import main as main_py
    from utils import args_to_dict
    args = main_py.get_args_parser().parse_args(['--model', 'SLaK_tiny', '--nb_classes', '1000', *flags])
    torch.manual_seed(seed)
    model = main_py.build_model(args, args.model)
    state = model.state_dict()
    total = zeros = 0
    if sparsity > 0:
        generator = torch.Generator().manual_seed(seed)
        for name, param in model.named_parameters():
            if param.dim() in (2, 4):
                keep = torch.rand(param.shape, generator=generator) >= sparsity
                state[name] = state[name] * keep
                total += keep.numel()
                zeros += int((~keep).sum())
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({'model': state, 'epoch': 0, 'args': args_to_dict(args)}, path)
    return {'path': str(path), 'density_2d_4d': 1 - zeros / total if total else 1.0,
            'mb': round(path.stat().st_size / 2 ** 20, 1)}


def eval_view(data_path: str, root: Path) -> str:
    """A folder whose ``train`` and ``val`` are both links to ``data_path``'s training images, so that an
    evaluation-only run has enough batches for a steady rate (the generated val split holds 1,280 images)."""
    root.mkdir(parents=True, exist_ok=True)
    for split in ('train', 'val'):
        link = root / split
        if not link.exists():
            link.symlink_to(Path(data_path).resolve() / 'train', target_is_directory=True)
    return str(root)


def eval_run_flags(name: str, batch_size: int, cpu_share: float) -> List[str]:
    """main.py flags of the evaluation run ``name`` beyond ``EVAL_FLAGS``: the README's command adds none; the bf16
    runs add the benchmark's batch, ``slak_eval_bf16_mix`` also ``--gpu_pipeline_cpu_share``."""
    extra = list(EVAL_RUNS[name])
    if extra:
        extra += ['--batch_size', str(batch_size)]
    if name == 'slak_eval_bf16_mix':
        extra += ['--gpu_pipeline_cpu_share', str(cpu_share)]
    return extra


def loader_speed(data_path: str, batch: int, workers: int, batches: int = 60, gpu_pipeline: bool = False,
                 is_train: bool = True, cpu_share: float = 0.0) -> float:
    """img/s of main.py's training loader alone (its dataset, transforms, batch and workers; no model), or with
    ``is_train=False`` of its evaluation loader (resize + centre crop, uint8 images normalised on the GPU by
    ``DeviceLoader``, as main.py does); with ``gpu_pipeline`` the workers read bytes and ``GpuAugment`` decodes and
    augments on the GPU (timed to the end of its GPU work)."""
    sys.path.insert(0, str(ROOT))
    import torch
    import main as main_py
    from datasets import DeviceBatches, DeviceLoader, GpuAugment, build_dataset, collate_encoded, mean_std
    args = main_py.get_args_parser().parse_args(['--data_path', data_path, '--batch_size', str(batch),
                                                 '--gpu_pipeline', str(gpu_pipeline),
                                                 '--gpu_pipeline_cpu_share', str(cpu_share)])
    on_device = not is_train and not gpu_pipeline  # main.py's evaluation loader
    dataset, _ = build_dataset(is_train=is_train, args=args, normalize=not on_device)
    encoded = dict(collate_fn=collate_encoded) if gpu_pipeline else dict(pin_memory=torch.cuda.is_available())
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers, shuffle=True,
                                         drop_last=True, **encoded)
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if gpu_pipeline:
        loader = DeviceBatches(loader, GpuAugment(is_train, args, device))
    elif on_device:
        loader = DeviceLoader(loader, device, mean_std=mean_std(args))
    it = iter(loader)
    warm = min(5, len(loader) - 1)
    for _ in range(warm):  # workers started, first batches decoded
        next(it)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start, n = time.time(), 0
    for _ in range(min(batches, len(loader) - warm)):
        images, _ = next(it)
        n += images.shape[0]
    sync()
    return n / (time.time() - start)


def throughput(models: str, batch: int, graph: bool, env: Dict[str, str], timeout: float,
               infer_batch: Optional[int] = None) -> Dict[str, dict]:
    """``bench_throughput.py`` train/infer img/s at ``batch`` (inference at ``infer_batch``, default ``batch``; 0:
    none) for the named models."""
    cmd = [sys.executable, 'benchmarks/bench_throughput.py', '--models', models, '--train-batch', str(batch),
           '--infer-batch', str(batch if infer_batch is None else infer_batch), '--steps', '20'] + (
               ['--graph'] if graph else [])
    lines = run_logged(cmd, env, timeout)
    rows = {}
    for _, line in lines:
        m = re.match(r'^\[0\] (.+?)\s+train\s+([\d.na]+) img/s \(\s*([\d.na]+) GiB\)\s+infer\s+([\d.na]+) img/s', line)
        if m:
            rows[m.group(1).strip()] = {'train_img_s': float(m.group(2)), 'train_mem_gb': float(m.group(3)),
                                        'infer_img_s': float(m.group(4))}
    return {'rows': rows, 'tail': [line for _, line in lines[-15:]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default='benchmarks/results', help='folder for the JSON files')
    parser.add_argument('--data_path', default='', help='an ImageNet-style folder; default: write one')
    parser.add_argument('--data_root', default='/tmp/bench_main_data', help='where to write the generated folder')
    parser.add_argument('--train_images', type=int, default=12800)
    parser.add_argument('--val_images', type=int, default=1280)
    parser.add_argument('--classes', type=int, default=100)
    parser.add_argument('--batch_size', type=int, default=128)
    parser.add_argument('--epochs', type=int, default=2)
    parser.add_argument('--num_workers', type=int, default=os.cpu_count())
    parser.add_argument('--runs', default='all',
                        help='comma-separated, run in this order: loader, throughput, throughput_graph and the main.py '
                             'runs ' + ', '.join(MAIN_RUNS) + ' (all: loader, ' + ', '.join(DEFAULT_MAIN_RUNS) +
                             ', throughput, throughput_graph); slak_compile: SLaK-T with --compile true, '
                             'slak_compile_ro: and --compile_mode reduce-overhead (own caches); slak_graph: '
                             '--cuda_graph true, slak_eager: --cuda_graph false (slak\'s caches), convnext_graph: '
                             'ConvNeXt-T with --cuda_graph true; *_noprecompile: '
                             'SLAK_PRECOMPILE=0, *_graphs: SLAK_WARM_GRAPHS=1 (own caches), slak_warm_nowg: '
                             'SLAK_WARM_GRAPHS=0 (slak\'s caches), slak_cold_nowg: the same, own caches; *_dyn: '
                             'SLAK_TAIL_SHAPES=dynamic (own caches); also slak_eval, '
                             'slak_eval_bf16, slak_eval_bf16_gpu (--gpu_pipeline true), slak_eval_bf16_mix (and '
                             '--gpu_pipeline_cpu_share --eval_cpu_share), eval_loader, eval_loader_gpu, '
                             'eval_loader_mix (issue 20: main.py --eval true, the README\'s command)')
    parser.add_argument('--eval_cpu_share', type=float, default=0.4,
                        help='--gpu_pipeline_cpu_share of the eval_loader_mix and slak_eval_bf16_mix runs')
    parser.add_argument('--budget_s', type=float, default=560, help='skip runs that would start after this')
    parser.add_argument('--run_timeout_s', type=float, default=300)
    parser.add_argument('--throughput_models', default=','.join(THROUGHPUT_MODELS),
                        help='bench_throughput.py models of the throughput runs (comma-separated)')
    parser.add_argument('--throughput_infer_batch', type=int, default=None,
                        help='inference batch of the throughput runs (default: --batch_size; 0: training only)')
    parser.add_argument('--throughput_budget_s', type=float, default=None,
                        help='the throughput runs start only before this (default: --budget_s)')
    parser.add_argument('--gpu_pipeline', default='false', choices=['true', 'false'],
                        help='pass --gpu_pipeline true to main.py (and time that loader)')
    parser.add_argument('--cache_root', default='',
                        help='folder for the runs\' Inductor/Triton caches (kept); default: a temporary one, removed')
    args = parser.parse_args()
    t0 = time.time()
    import torch
    card = card_name()
    gpu_pipeline = args.gpu_pipeline == 'true'
    suffix = '_gpu_pipeline' if gpu_pipeline else ''
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        main_runs = main_run_order(args.runs)
    except ValueError as e:
        parser.error(str(e))
    wanted = set(args.runs.split(',')) if args.runs != 'all' else {
        'loader', *DEFAULT_MAIN_RUNS, 'throughput', 'throughput_graph'}
    report: Dict[str, object] = {'card': card, 'torch': torch.__version__, 'args': vars(args), 'runs': {}}

    data_path = args.data_path
    if not data_path:
        root = Path(args.data_root)
        if not (root / 'val').is_dir():
            report['data'] = write_jpeg_folder(root, args.train_images, args.val_images, args.classes,
                                               args.num_workers)
            print(f'data: {report["data"]}', flush=True)
        data_path = str(root)

    caches = Path(args.cache_root or tempfile.mkdtemp(prefix='bench_main_caches_'))
    records: List[dict] = []

    def env_with(cache: str, **extra) -> Dict[str, str]:
        env = dict(os.environ, PYTHONUNBUFFERED='1', TORCHINDUCTOR_CACHE_DIR=str(caches / cache / 'inductor'),
                   TRITON_CACHE_DIR=str(caches / cache / 'triton'))
        env.update(extra)
        return env

    def save() -> None:
        (out_dir / f'e2e_{card}{suffix}.json').write_text(json.dumps(records, indent=1))
        (out_dir / f'e2e_{card}{suffix}_runs.json').write_text(json.dumps(report, indent=1))

    def due(name: str) -> bool:
        """The run was asked for and the time budget allows it (else it is skipped, and said so)."""
        if name not in wanted:
            return False
        if time.time() - t0 > args.budget_s:
            print(f'{name}: skipped (time budget)', flush=True)
            return False
        return True

    def logged_run(name: str, cmd: List[str], env: Dict[str, str], parse, skip=(), tail: int = 30) -> Dict:
        """Run ``cmd``, keep ``parse(lines)`` with the command and the log's last ``tail`` lines (less those
        starting with ``skip``) as run ``name`` of the report, print the figures and save."""
        lines = run_logged(cmd, env, args.run_timeout_s)
        parsed = parse(lines)
        parsed['command'] = ' '.join(cmd[1:])
        parsed['log_tail'] = [f'{t:7.1f} {line}' for t, line in lines if not line.startswith(skip)][-tail:]
        report['runs'][name] = parsed
        print(f'{name}: ' + ', '.join(f'{k}={v:.1f}' if isinstance(v, float) else f'{k}={v}'
                                      for k, v in parsed.items() if k not in ('log_tail', 'command')), flush=True)
        save()
        return parsed

    def main_run(name: str, flags: List[str], cache: str, **env) -> Optional[Dict]:
        if not due(name):
            return None
        out = tempfile.mkdtemp(prefix=f'bench_{name}_')
        cmd = [sys.executable, 'main.py', *flags, *COMMON_FLAGS, '--batch_size', str(args.batch_size),
               '--epochs', str(args.epochs), '--data_path', data_path, '--num_workers', str(args.num_workers),
               '--output_dir', out, '--gpu_pipeline', args.gpu_pipeline]
        try:
            return logged_run(name, cmd, env_with(cache, **env), lambda lines: parse_main_log(lines, args.val_images),
                              skip=('Test:', '  '), tail=60)
        finally:
            shutil.rmtree(out, ignore_errors=True)

    loader_img_s = None
    if 'loader' in wanted:
        loader_img_s = loader_speed(data_path, args.batch_size, args.num_workers, gpu_pipeline=gpu_pipeline)
        report['loader_img_s'] = loader_img_s
        print(f'loader alone: {loader_img_s:.0f} img/s', flush=True)

    # the main.py runs, in --runs' order (most wanted first, should the time budget cut the list short)
    results = {}
    for name in main_runs:
        flags, cache, env = MAIN_RUNS[name]
        results[name] = main_run(name, flags, cache, **env)

    # optional (issue 20): main.py --eval true with the README's evaluation command on a 12,800-image view, as
    # written (fp32, batch 64 -> 96 per evaluation batch) and in bf16 at batch 128 (192), SLaK-T folded by default
    # (--eval_folded), a main.py-format checkpoint with 40 % zeros, the caches of the SLaK-T runs; and the
    # evaluation loader alone at the bf16 run's batch
    if {*EVAL_RUNS, 'eval_loader', 'eval_loader_gpu'} & wanted:
        view = eval_view(data_path, Path(tempfile.mkdtemp(prefix='bench_eval_view_')))
        for key, gpu, share in (('eval_loader', False, 0.0), ('eval_loader_gpu', True, 0.0),
                                ('eval_loader_mix', True, args.eval_cpu_share)):
            if key in wanted:
                report[f'{key}_img_s'] = loader_speed(view, int(1.5 * args.batch_size), args.num_workers,
                                                      gpu_pipeline=gpu, is_train=False, cpu_share=share)
                how = f' (--gpu_pipeline true --gpu_pipeline_cpu_share {share:g})' if gpu else ''
                print(f'evaluation loader alone{how}: {report[f"{key}_img_s"]:.0f} img/s', flush=True)
        checkpoint = Path(tempfile.mkdtemp(prefix='bench_eval_ckpt_')) / 'SLaK-T.pth'
        report['eval_checkpoint'] = write_classification_checkpoint(
            checkpoint, SLAK_T_FLAGS[2:] + ['--nb_classes', str(args.classes)], 0.4)
        for name in EVAL_RUNS:
            if due(name):
                logged_run(name, [sys.executable, 'main.py', *EVAL_FLAGS, '--resume', str(checkpoint), '--data_path',
                                  view, '--num_workers', str(args.num_workers),
                                  *eval_run_flags(name, args.batch_size, args.eval_cpu_share)], env_with('slak'),
                           parse_eval_log)

    bench = {}
    names = args.throughput_models + (
        ',SLaK-T ours torch.compile' if {'slak_compile', 'slak_compile_ro'} & wanted else '')
    throughput_budget_s = args.budget_s if args.throughput_budget_s is None else args.throughput_budget_s
    for key, graph in (('throughput', False), ('throughput_graph', True)):
        if key in wanted and time.time() - t0 < throughput_budget_s:
            bench[key] = throughput(names, args.batch_size, graph, env_with('slak'), args.run_timeout_s,
                                    args.throughput_infer_batch)
            report[key] = bench[key]
            print(f'{key}: {bench[key]["rows"]}', flush=True)
            save()

    def bare(model: str, graph: bool) -> Optional[float]:
        rows = bench.get('throughput_graph' if graph else 'throughput', {}).get('rows', {})
        return rows.get(model, {}).get('train_img_s')

    def record(model: str, compiled: bool, run: Optional[Dict], warm: Optional[Dict], bench_name: str,
               compile_mode: Optional[str] = None) -> None:
        if run is None and warm is None:
            return
        steady = warm or run
        records.append({
            'model': model, 'data': 'jpeg', 'compile': compiled, 'compile_mode': compile_mode if compiled else None,
            'cuda_graph': steady.get('graph_capture_s') is not None,  # main.py said it captured the step
            'batch': args.batch_size,
            'img_s': steady.get('img_s'), 'graph_img_s': bare(bench_name, True),
            'eager_bench_img_s': bare(bench_name, False), 'loader_img_s': loader_img_s,
            'first_step_s_cold': run.get('first_step_s') if run else None,
            'first_step_s_warm': warm.get('first_step_s') if warm else None,
            'first_eval_s_warm': steady.get('first_eval_s') if warm else None,
            'peak_mem_gb': steady.get('peak_mem_gb'), 'startup_peak_mem_gb': steady.get('startup_peak_mem_gb'),
            'peak_reserved_gb': steady.get('peak_reserved_gb'),
            'eval_img_s': steady.get('eval_img_s'), 'gpu_pipeline': gpu_pipeline, 'card': card})

    record('SLaK-T', False, results.get('slak_cold'), results.get('slak_warm'), 'SLaK-T ours')
    record('convnext_tiny', False, results.get('convnext'), None, 'convnext_tiny (timm)')
    record('convnext_tiny', True, results.get('convnext_compile'), None, 'convnext_tiny (timm) torch.compile')
    record('convnext_tiny', False, results.get('convnext_graph'), None, 'convnext_tiny (timm)')
    record('SLaK-T', True, results.get('slak_compile'), None, 'SLaK-T ours torch.compile')
    record('SLaK-T', True, results.get('slak_compile_ro'), None, 'SLaK-T ours torch.compile', 'reduce-overhead')
    record('SLaK-T', False, None, results.get('slak_graph'), 'SLaK-T ours')  # (caches warm)
    record('SLaK-T', False, None, results.get('slak_eager'), 'SLaK-T ours')  # (caches warm)
    save()
    if not args.cache_root:
        shutil.rmtree(caches, ignore_errors=True)

    print(f'\n{"model":16s} {"compile":7s} {"img/s":>7s} {"graph":>7s} {"eager":>7s} {"1st step cold/warm":>19s} '
          f'{"1st eval":>8s} {"peak GiB":>8s} {"start GiB":>9s}')
    for r in records:
        def f(v, fmt='{:.0f}'):
            return fmt.format(v) if isinstance(v, (int, float)) and not math.isnan(v) else '-'
        variant = 'graph' if r['cuda_graph'] else 'ro' if r['compile_mode'] else str(r['compile'])
        print(f'{r["model"]:16s} {variant:7s} {f(r["img_s"]):>7s} {f(r["graph_img_s"]):>7s} '
              f'{f(r["eager_bench_img_s"]):>7s} {f(r["first_step_s_cold"]):>9s}/{f(r["first_step_s_warm"]):<9s} '
              f'{f(r["first_eval_s_warm"], "{:.1f}"):>8s} {f(r["peak_mem_gb"], "{:.1f}"):>8s} '
              f'{f(r["startup_peak_mem_gb"], "{:.1f}"):>9s}')
    if loader_img_s:
        print(f'loader alone: {loader_img_s:.0f} img/s ({args.num_workers} workers'
              f'{", decoded and augmented on the GPU" if gpu_pipeline else ""})')
    print(f'total {time.time() - t0:.0f} s')


if __name__ == '__main__':
    main()
