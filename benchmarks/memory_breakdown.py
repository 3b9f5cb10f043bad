"""Where a training step's GPU memory goes: the tensors autograd keeps for backward, grouped by shape and dtype.

Run on a CUDA machine from the repository root::

    python benchmarks/memory_breakdown.py [--batch 128] [--models "SLaK-T,convnext_tiny"] [--modes train,snip,...]

For each model (bf16 autocast, training mode, 224 px, SLaK-T as in the README: 51 49 47 13 5, width 1.3, Decom)
one forward runs under ``torch.autograd.graph.saved_tensors_hooks``; every saved tensor is counted once per storage
(views of one tensor share it). Printed: GiB per (shape, dtype) with how many such tensors were saved,
the sum, memory held after the forward, and the peak of forward + backward + AdamW step, so the saved activations can
be set against the peak a user sees in ``main.py``'s ``max mem``.
"""
import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import timm  # noqa: E402
import SLaK  # noqa: E402,F401

SLAK_T = dict(kernel_size=[51, 49, 47, 13, 5], width_factor=1.3, Decom=True)


def build(name: str) -> torch.nn.Module:
    if name == 'SLaK-T':
        return timm.create_model('SLaK_tiny', **SLAK_T)
    return timm.create_model(name)


MODES = {  # what one forward stores for backward
    'train': 'a training step: bf16 autocast',
    'snip': "SNIP's scoring pass before this session: float32, no autocast, every activation stored",
    'snip_checkpointed': "SNIP's scoring pass now: float32, gradient checkpointing (block inputs stored; one block's "
                         'activations at a time are recomputed in backward)',
}


def breakdown(model: torch.nn.Module, batch: int, device: str, mode: str) -> dict:
    """Bytes of the tensors one forward of ``mode`` saves for backward (each storage once), by shape and dtype; on
    CUDA also the memory held after the forward and the peak of forward + backward + AdamW step."""
    cuda = device == 'cuda'
    model.to(device).train()
    model.set_grad_checkpointing(mode == 'snip_checkpointed')
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, 224, 224, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=mode == 'train')
    for _ in range(2 if cuda else 0):  # compile / autotune outside the measured step
        with autocast:
            torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    seen = set()
    groups, counts = defaultdict(int), defaultdict(int)

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in seen and t.device.type == device:
            seen.add(key)
            groups[(tuple(t.shape), str(t.dtype).replace('torch.', ''))] += storage.nbytes()
            counts[(tuple(t.shape), str(t.dtype).replace('torch.', ''))] += 1
        return t

    base = torch.cuda.memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(x), y)
    saved = sum(groups.values())
    held = torch.cuda.memory_allocated() - base if cuda else float('nan')
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    return {'groups': dict(groups), 'counts': dict(counts), 'saved': saved, 'held_after_forward': held,
            'peak_step': torch.cuda.max_memory_allocated() if cuda else float('nan'), 'weights_and_state': base}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--batch', type=int, default=128)
    parser.add_argument('--models', default='SLaK-T,convnext_tiny')
    parser.add_argument('--modes', default='train', help=f'comma-separated subset of {list(MODES)}')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = parser.parse_args()
    gib = 2 ** 30
    for name in args.models.split(','):
        for mode in args.modes.split(','):
            torch.manual_seed(0)
            r = breakdown(build(name), args.batch, args.device, mode)
            print(f'{name} {mode} ({MODES[mode]}; batch {args.batch}, {args.device}): saved for backward '
                  f'{r["saved"] / gib:.3f} GiB, held after forward {r["held_after_forward"] / gib:.2f} GiB, step '
                  f'peak {r["peak_step"] / gib:.2f} GiB, weights + optimizer state {r["weights_and_state"] / gib:.2f} '
                  f'GiB', flush=True)
            for (shape, dtype), nbytes in sorted(r['groups'].items(), key=lambda kv: -kv[1])[:8]:
                print(f'    {str(shape):28s} {dtype:9s} x{r["counts"][(shape, dtype)]:<3d} {nbytes / gib:7.3f} GiB')
            if args.device == 'cuda':
                torch.cuda.empty_cache()


if __name__ == '__main__':
    main()
