"""Cost of dynamic sparse training: one SLaK training step (forward + backward + AdamW) dense vs with ``mask.step()``.

Dense and sparse steps run on the same model and optimizer, alternating step by step (medians reported) so clock
drift, warm-up and other load on the machine hit both equally; the sparse step is ``optimizer.step()`` +
``Masking.after_step`` (mask re-application and schedule), the dense step is ``optimizer.step()`` alone. The
convolutions are dense in both, so the difference is exactly the masking overhead. Also timed: one mask application
alone and one prune/grow update (``truncate_weights``).

CPU (default: a narrow SLaK with 13x13-class kernels, which the CPU convolution handles in reasonable time)::

    python benchmarks/bench_sparse_overhead.py

GPU, SLaK-T as published::

    python benchmarks/bench_sparse_overhead.py --device cuda --model SLaK_tiny --width_factor 1.3 --batch_size 64 \
        --input_size 224 --amp_dtype bfloat16 --kernel_size 51 49 47 13 5
"""
import argparse
import os
import platform
import statistics
import sys
import time
from argparse import Namespace
from typing import Callable

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import SLaK  # noqa: E402,F401  (registers the SLaK models with timm)
from sparse_core import CosineDecay, Masking  # noqa: E402


def get_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cpu', help='cpu or cuda')
    parser.add_argument('--model', default='SLaK_tiny')
    parser.add_argument('--kernel_size', type=int, nargs=5, default=None,
                        help='4 stage kernels + small kernel; default 51 49 47 13 5 on cuda, 13 13 13 13 5 on cpu')
    parser.add_argument('--width_factor', type=float, default=0.25)
    parser.add_argument('--batch_size', type=int, default=8)
    parser.add_argument('--input_size', type=int, default=64)
    parser.add_argument('--amp_dtype', default='none', choices=['none', 'bfloat16', 'float16'])
    parser.add_argument('--sparse_init', default='snip')
    parser.add_argument('--sparsity', type=float, default=0.4)
    parser.add_argument('--growth', default='random')
    parser.add_argument('--steps', type=int, default=10, help='timed steps per mode (alternating dense/sparse)')
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--truncates', type=int, default=3, help='timed prune/grow updates')
    return parser.parse_args()


def timed(device: torch.device, fn: Callable[[], None], repeats: int) -> float:
    """Milliseconds per call of ``fn``, averaged over ``repeats`` calls, with device synchronisation."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1000 / repeats


def main() -> None:
    args = get_args()
    device = torch.device(args.device)
    if args.kernel_size is None:
        args.kernel_size = [51, 49, 47, 13, 5] if device.type == 'cuda' else [13, 13, 13, 13, 5]
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=1000, kernel_size=args.kernel_size,
                              width_factor=args.width_factor, Decom=True).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    images = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device)
    targets = torch.randint(0, 1000, (args.batch_size,), device=device)
    amp_dtype = None if args.amp_dtype == 'none' else getattr(torch, args.amp_dtype)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None

    mask_args = Namespace(sparse_init=args.sparse_init, sparsity=args.sparsity, update_frequency=None, fix=False,
                          only_L=False, seed=0)
    mask = Masking(optimizer, [(images, targets)], CosineDecay(0.3, T_max=10000), growth_mode=args.growth,
                   redistribution_mode='none', args=mask_args)
    mask.add_module(model)

    def train_step(sparse: bool) -> None:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = F.cross_entropy(model(images), targets)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if sparse:
                mask.after_step(True)
        else:
            loss.backward()
            if sparse:
                mask.step()
            else:
                optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    timed(device, lambda: train_step(True), args.warmup)
    dense, sparse = [], []
    for _ in range(args.steps):
        dense.append(timed(device, lambda: train_step(False), 1))
        sparse.append(timed(device, lambda: train_step(True), 1))
    apply_ms = timed(device, mask.apply_mask, 20)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        loss = F.cross_entropy(model(images), targets)
    loss.backward()  # gradient/momentum growth read the gradient of the step that just happened
    truncate_ms = timed(device, mask.truncate_weights, args.truncates)
    optimizer.zero_grad(set_to_none=True)

    dense_ms, sparse_ms = statistics.median(dense), statistics.median(sparse)
    if device.type == 'cuda':
        where = torch.cuda.get_device_name(device)
    else:
        where = f'{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads'
    print(f'\n{args.model} width {args.width_factor} kernels {args.kernel_size} Decom, batch {args.batch_size}, '
          f'{args.input_size}px, amp {args.amp_dtype}, sparse_init {args.sparse_init}, sparsity {args.sparsity}, '
          f'growth {args.growth}; {len(mask.masks)} masked tensors; torch {torch.__version__}; {where}')
    print('| ms/step dense | ms/step sparse | overhead % | ms per mask apply | ms per truncate |')
    print('|---|---|---|---|---|')
    print(f'| {dense_ms:.1f} | {sparse_ms:.1f} | {100 * (sparse_ms - dense_ms) / dense_ms:+.2f} | {apply_ms:.2f} | '
          f'{truncate_ms:.1f} |')


if __name__ == '__main__':
    main()
