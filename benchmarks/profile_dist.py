"""Where a distributed (DDP) training step's time goes: wall ms per step vs summed GPU kernel time, NCCL included.

Run under torchrun on a CUDA machine from the repository root (needs timm)::

    torchrun --nproc_per_node=4 benchmarks/profile_dist.py [--sync_bn fused|per_bn|off] [--batch 64]

Each rank trains SLaK-T (``bench_throughput``'s "SLaK-T ours": 51 49 47 13 5, width 1.3, Decom) under DDP with
AdamW and bf16 autocast on a fixed random batch (no data loading, EMA or sparse masks: the bare step). Prints, for
rank 0: wall ms per step, GPU kernel ms per step split into groups (NCCL separately: its kernels include the time
spent waiting for other ranks) and img/s over all ranks. (A host-only time per step cannot be had by queueing steps
behind a long sleep kernel: a step launches ~2,900 kernels and CUDA's launch queue blocks the host after ~1,000.)
``--sync_bn per_bn`` sets ``SLAK_SYNCBN_FUSE_BRANCHES=0`` semantics (one collective per BN) for comparison. Under
SyncBN the branch BNs run in our Triton kernels (model "SLaK-T ours") or in PyTorch's ("SLaK-T ours per-branch BN").
With one process, ``fused`` takes the same branch-sum path without collectives and ``off`` the model's own BNs.
"""
import argparse
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_throughput as bt  # noqa: E402
import profile_step  # noqa: E402
import utils  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sync_bn", default="fused", choices=["fused", "per_bn", "off"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--model", default="SLaK-T ours")
    p.add_argument("--ddp", default="main", choices=["main", "default"],
                   help="main: main.wrap_ddp's options (bucket views; no buffer broadcast under SyncBN); default: "
                        "DDP's defaults")
    p.add_argument("--sync_debug", action="store_true",
                   help="run one step under torch.cuda.set_sync_debug_mode('warn') and print where it syncs")
    a = p.parse_args()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = bt.make(a.model).cuda()
    if a.sync_bn != "off":  # with N=1: the fused branch sum without collectives (PyTorch's fused BN kernels)
        model = utils.convert_sync_batchnorm(model)
        utils.SyncBatchNormWithoutHostSync.FUSE_BRANCHES = a.sync_bn == "fused"
        utils.SyncBatchNormWithoutHostSync.FUSE_SINGLE_PROCESS = world == 1
    ddp_options = {} if a.ddp == "default" else dict(gradient_as_bucket_view=True,
                                                       broadcast_buffers=a.sync_bn == "off")
    model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[torch.cuda.current_device()],
                                                      **ddp_options)
    step = bt.make_train_step(model, a.batch)
    wall = bt.seconds_per_call(step, a.steps, warmup=5) * 1e3
    if a.sync_debug and rank == 0:
        import traceback
        import warnings
        seen = set()

        def show(message, category, filename, lineno, file=None, line=None):
            stack = "".join(traceback.format_stack(limit=8)[:-1])
            if stack not in seen:
                seen.add(stack)
                print(f"SYNC: {message}\n{stack}")
        warnings.showwarning = show
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        step()
        torch.cuda.set_sync_debug_mode(0)
        print(f"SYNC_POINTS {len(seen)}")
    torch.cuda.synchronize()
    walls = [torch.zeros(1, device="cuda") for _ in range(world)]
    dist.all_gather(walls, torch.tensor([wall], device="cuda"))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    groups, total, launches = defaultdict(float), 0.0, 0
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            ms = evt.device_time_total / 1e3 / 3
            name = evt.name.lower()
            groups["nccl (incl. waiting)" if "nccl" in name else profile_step.group_of(evt.name)] += ms
            total += ms
            launches += 1
    if rank == 0:
        w = [x.item() for x in walls]
        print(f"== {a.model}, N={world}, sync_bn={a.sync_bn}, ddp={a.ddp}, batch {a.batch}/GPU: "
              f"wall {wall:.2f} ms/step (ranks {min(w):.2f}-{max(w):.2f}), GPU kernels {total:.2f} ms/step, "
              f"{launches / 3:.0f} kernels/step, {world * a.batch / wall * 1e3:.1f} img/s")
        for g, v in sorted(groups.items(), key=lambda kv: -kv[1]):
            print(f"   {g:28s} {v:8.3f} ms")
        print(f"PROFILE_DIST N={world} sync_bn={a.sync_bn} ddp={a.ddp} wall_ms={wall:.3f} "
              f"kernel_ms={total:.3f} nccl_ms={groups['nccl (incl. waiting)']:.3f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
