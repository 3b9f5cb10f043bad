"""Where a training step's *host* time goes: cProfile over a few steps, grouped by who spends it.

At batch 64 SLaK-T's step is host-bound on the H100/H200 machines (wall above the summed GPU kernel time by 10-30
ms, benchmarks/RESULTS.md round 5), so the next speed-ups are on the CPU side. Run on a CUDA machine from the
repository root (needs timm)::

    python benchmarks/profile_host.py [--models "SLaK-T ours,SLaK-T ours per-branch BN"] [--batch 64] [--steps 10]

Prints per model: wall ms per step with and without cProfile, and the profiled host time split into groups
(Triton's launcher, our Python in SLaK.py / cutlass/, PyTorch's Python layers, the autograd engine's C++ call,
built-in tensor ops), then the 20 functions with the most own time. cProfile itself slows Python-heavy code, so
compare groups between models of the same run rather than reading absolute numbers. ``--device cpu --size 32``
runs the same accounting on CPU (smoke test; the Triton groups are then empty).
"""
import argparse
import cProfile
import pstats
import sys
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_throughput as bt  # noqa: E402

GROUPS = [  # (group, predicate on (file, function name)); first match wins
    ("triton launcher", lambda f, n: "/triton/" in f),
    ("ours: cutlass/", lambda f, n: "/cutlass/" in f),
    ("ours: SLaK.py", lambda f, n: f.endswith("SLaK.py")),
    ("autograd engine (backward call)", lambda f, n: "run_backward" in n or "_engine_run_backward" in n),
    ("torch python (nn, autograd, optim)", lambda f, n: "/torch/" in f),
    ("tensor ops and other built-ins", lambda f, n: f == "~"),
]


def group_of(file: str, name: str) -> str:
    for group, match in GROUPS:
        if match(file, name):
            return group
    return "other python"


def host_profile(name: str, batch: int, size: int, steps: int, device: str) -> None:
    torch.manual_seed(0)
    step = bt.make_train_step(bt.make(name).to(device), batch, size=size, device=device)
    wall = bt.seconds_per_call(step, steps, warmup=5) * 1e3
    profiler = cProfile.Profile()
    if device == "cuda":
        torch.cuda.synchronize()
    profiler.enable()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    profiler.disable()
    stats = pstats.Stats(profiler)
    groups, total = defaultdict(float), 0.0
    rows = []
    for (file, _, func), (_, _, own, _, _) in stats.stats.items():
        groups[group_of(file, func)] += own
        total += own
        rows.append((own, f"{Path(file).name}:{func}" if file != "~" else func))
    print(f"== {name}, batch {batch}, {size} px, {device}: wall {wall:.2f} ms/step; under cProfile "
          f"{total / steps * 1e3:.2f} ms/step of profiled time")
    for g, v in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"   {g:36s} {v / steps * 1e3:8.2f} ms/step")
    print("   most own time (ms/step):")
    for own, label in sorted(rows, reverse=True)[:20]:
        print(f"     {own / steps * 1e3:7.3f}  {label[:100]}")
    print(f"PROFILE_HOST model={name!r} wall_ms={wall:.3f} profiled_ms={total / steps * 1e3:.3f} "
          + " ".join(f"{g.split()[0]}={v / steps * 1e3:.3f}" for g, v in sorted(groups.items())))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="SLaK-T ours,SLaK-T ours per-branch BN")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="cuda")
    a = p.parse_args()
    if a.device == "cuda":
        torch.backends.cudnn.benchmark = True
        print(f"device {torch.cuda.get_device_name()} torch {torch.__version__}")
    for name in a.models.split(","):
        host_profile(name, a.batch, a.size, a.steps, a.device)


if __name__ == "__main__":
    main()
