"""CPU cost per call of our depthwise conv (eager autograd.Function vs the registered torch.library op) vs cuDNN,
and whether whole-model training is CPU-bound.

Run on a CUDA machine from the repository root (needs timm)::

    python benchmarks/bench_launch_overhead.py [--profile] [--batches 32,64,128] [--repeats 3]

Per layer (batch 64, bf16): ``cpu`` = host time to issue one call (100 calls issued back to back, then one sync;
100 forward+backward calls stay under the launch queue's depth, so the host never waits for the GPU) and ``wall``
= time per call including the GPU. A call is CPU-bound when cpu >= the GPU time in ``bench_dwconv.py``'s table.
Whole model: training img/s of SLaK-T with each route and of ConvNeXt-T at several batch sizes; img/s that grows
with the batch at fixed per-image work means the step was CPU-bound.
"""
import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import SLaK  # noqa: E402

SLaK._load_fast_dwconv()  # registers the module under the name SLaK's layers use
dw = sys.modules[SLaK._DWCONV_MODULE_NAME]

LAYERS = [(124, 56, 51, 5), (249, 28, 5, 5), (499, 14, 47, 5), (998, 7, 13, 5)]


def host_and_wall(fn, n=100):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return (t1 - t0) / n * 1e6, (t2 - t0) / n * 1e6


def layer_calls(c, hw, kh, kw):
    x = torch.randn(64, c, hw, hw, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(c, 1, kh, kw, device="cuda") / (kh * kw) ** 0.5).requires_grad_()
    g = torch.randn_like(x)

    def route(registered, backward):
        def call():
            dw.ALWAYS_REGISTERED_OP = registered
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = dw.depthwise_conv2d(x, w)
            if backward:
                torch.autograd.backward(y, g)
        return call

    def cudnn(backward):
        def call():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = F.conv2d(x, w, padding=(kh // 2, kw // 2), groups=c)
            if backward:
                torch.autograd.backward(y, g)
        return call

    return {"fwd eager": route(False, False), "fwd op": route(True, False), "fwd cudnn": cudnn(False),
            "f+b eager": route(False, True), "f+b op": route(True, True), "f+b cudnn": cudnn(True)}


def profile(fn, n=50, top=18):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile", action="store_true", help="cProfile 50 f+b calls of 47x5@14 per route")
    parser.add_argument("--batches", default="32,64,128")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--skip-model", action="store_true")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    print(f"device {torch.cuda.get_device_name()} torch {torch.__version__}")
    print("== per call, batch 64 bf16 autocast: host us / wall us")
    for c, hw, kh, kw in LAYERS:
        res = {name: host_and_wall(fn) for name, fn in layer_calls(c, hw, kh, kw).items()}
        print(f"{c:4d}@{hw:<2d} {kh}x{kw}: " + "  ".join(f"{k} {h:6.0f}/{wl:6.0f}" for k, (h, wl) in res.items()),
              flush=True)
    dw.ALWAYS_REGISTERED_OP = False
    if args.profile:
        calls = layer_calls(499, 14, 47, 5)
        for name in ("f+b op", "f+b eager"):
            print(f"== cProfile, 50 x {name} on 499@14 47x5\n" + profile(calls[name]))
    if args.skip_model:
        return
    import bench_throughput as bt
    print("== training img/s (AdamW, bf16 autocast, 224 px), interleaved rounds; median [min, max]")
    names = ["convnext_tiny (timm)", "SLaK-T ours eager", "SLaK-T ours op"]
    samples = {(n, b): [] for n in names for b in args.batches.split(",")}
    for _ in range(args.repeats):
        for batch in (int(b) for b in args.batches.split(",")):
            for name in names:
                dw.ALWAYS_REGISTERED_OP = name.endswith(" op")
                torch.manual_seed(0)
                model = bt.make(name.replace(" eager", "").replace(" op", "")).cuda()
                samples[(name, str(batch))].append(bt.train_speed(model, batch, args.steps)[0])
                del model
                torch.cuda.empty_cache()
    dw.ALWAYS_REGISTERED_OP = False
    for (name, batch), v in samples.items():
        v = sorted(v)
        print(f"{name:24s} batch {batch:>4s}: {v[len(v) // 2]:8.1f} img/s [{v[0]:.1f}, {v[-1]:.1f}]")


if __name__ == "__main__":
    main()
