"""Two CPU processes (gloo, DDP): masks and weights stay identical across ranks through SNIP init and prune/grow."""
import os
import sys
import tempfile
from argparse import Namespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from _gloo import finish_worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from sparse_core import CosineDecay, Masking  # noqa: E402

WORLD_SIZE = 2


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.conv1(x)))
        x = F.relu(self.conv2(x)).mean(dim=(2, 3))
        return self.head(x)


def gathered(value: torch.Tensor) -> list:
    out = [torch.zeros_like(value) for _ in range(WORLD_SIZE)]
    dist.all_gather(out, value)
    return out


def checksums(mask: Masking) -> torch.Tensor:
    """Position-sensitive checksums of every mask and every sparse weight, in float64."""
    rows = []
    for name, m in mask.masks.items():
        positions = torch.arange(1, m.numel() + 1, dtype=torch.float64)
        rows.append((m.flatten().double() * positions).sum())
        rows.append((mask.params[name].detach().flatten().double() * positions).sum())
    return torch.stack(rows)


def worker(rank: int, init_file: str, result_dir: str) -> None:
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=WORLD_SIZE)
    torch.manual_seed(0)
    model = TinyNet()
    torch.manual_seed(100 + rank)  # rank-dependent global RNG, as main.py seeds it: masks must not depend on it
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2, weight_decay=0.05)
    gen = torch.Generator().manual_seed(rank)  # each rank sees different data
    data = [(torch.randn(4, 3, 16, 16, generator=gen), torch.randint(0, 10, (4,), generator=gen)) for _ in range(7)]
    args = Namespace(sparse_init='snip', sparsity=0.6, update_frequency=2, fix=False, only_L=False, seed=0)
    broadcasts = []
    broadcast = dist.broadcast
    dist.broadcast = lambda tensor, *a, **k: (broadcasts.append(tensor.numel()), broadcast(tensor, *a, **k))[1]
    mask = Masking(opt, data[:1], CosineDecay(0.5, T_max=10), growth_mode='random', redistribution_mode='none',
                   args=args)
    mask.add_module(ddp)
    if sorted(mask.masks) != ['conv1.weight', 'conv2.weight', 'head.weight']:
        raise AssertionError(f'unexpected mask names {sorted(mask.masks)}')
    history = [checksums(mask)]
    for x, y in data[1:]:
        F.cross_entropy(ddp(x), y).backward()
        mask.step()
        opt.zero_grad()
        history.append(checksums(mask))
    if mask.mask_version != 4:  # init + prune/grow at steps 2, 4, 6
        raise AssertionError(f'expected 3 prune/grow updates, mask_version={mask.mask_version}')
    masked = sum(m.numel() for m in mask.masks.values())
    if len(broadcasts) != 4 or broadcasts[1:] != [masked] * 3:  # one at init, one per prune/grow, none per step
        raise AssertionError(f'expected 4 mask broadcasts in 6 steps, got sizes {broadcasts}')
    for step, sums in enumerate(history):
        ranks = gathered(sums)
        if not torch.equal(ranks[0], ranks[1]):
            raise AssertionError(f'ranks differ after step {step}: {ranks}')
    if rank == 0:
        torch.save({'model': model.state_dict(), 'mask': mask.state_dict()}, os.path.join(result_dir, 'ckpt.pth'))
    finish_worker()


def test_masks_identical_across_two_gloo_ranks():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(os.path.join(tmp, 'init'), tmp), nprocs=WORLD_SIZE, join=True)
        checkpoint = torch.load(os.path.join(tmp, 'ckpt.pth'), weights_only=True)
    # The DDP run's masks load into a plain (non-DDP) model: names carry no `module.` prefix.
    model = TinyNet()
    model.load_state_dict(checkpoint['model'])
    opt = torch.optim.AdamW(model.parameters())
    args = Namespace(sparse_init='snip', sparsity=0.6, update_frequency=2, fix=False, only_L=False, seed=0)
    mask = Masking(opt, None, CosineDecay(0.5, T_max=10), args=args, redistribution_mode='none')
    mask.add_module(model, mask_state=checkpoint['mask'])
    assert mask.steps == 6
    for name, m in mask.masks.items():
        assert torch.equal(m, checkpoint['mask']['masks'][name])
        assert torch.all(dict(model.named_parameters())[name][~m] == 0)
    assert mask.overall_density() == pytest.approx(
        sum(int(m.sum()) for m in checkpoint['mask']['masks'].values()) /
        sum(m.numel() for m in checkpoint['mask']['masks'].values()))
