"""Where one training step's GPU time goes: torch.profiler over a few AdamW + bf16-autocast steps, kernels grouped.

Run on a CUDA machine from the repository root (needs timm)::

    python benchmarks/profile_step.py [--models "SLaK-T ours,convnext_tiny (timm)"] [--batch 64] [--out DIR]
    python benchmarks/profile_step.py --infer --batch 128 \
        --models "SLaK-T ours folded decomposed,convnext_tiny (timm) torch.compile"    # inference forwards instead

``--infer`` profiles bf16-autocast inference forwards (no gradients) instead: rows named "folded" are reparameterized
first, as ``bench_throughput.py`` does (issue 20: where folded SLaK-T's inference time goes against a compiled
ConvNeXt-T's).

Prints, per model: wall ms per step, summed GPU kernel ms per step (the two differ by host stalls and gaps), and the
kernel time split into groups (our depthwise kernels, cuDNN depthwise, BatchNorm, LayerNorm, GEMM, elementwise and
reductions, optimizer, other), plus the 25 most expensive kernels, each with the two host-op chains that launched
most of its time. ``--out`` also writes a Chrome trace per model.
Model names are those of ``bench_throughput.py``.
"""
import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_throughput as bt  # noqa: E402

GROUPS = [  # first match wins; patterns are matched against the kernel name, lower-cased
    ("ours: dwconv", r"dwconv_"),
    ("inductor-generated (tails; all of compiled ConvNeXt-T's)", r"^triton_(poi|red|per|tem)_"),
    ("cudnn depthwise conv", r"depthwise|conv2d_grouped|dgrad|wgrad|implicit_convolve|conv"),
    ("batch norm", r"batch_norm|batchnorm|bn_fw|bn_bw|welford|bn_stats_kernel|bn_fwd_|bn_bwd_"),
    ("layer norm", r"layer_norm|layernorm"),
    ("gemm (pointwise/linear)", r"gemm|sm90_xmma|cutlass|nvjet|matmul|s16816|wgmma"),
    ("optimizer", r"multi_tensor|adam|foreach"),
    ("elementwise/reduce", r"elementwise|vectorized|reduce|unrolled|copy|fill|cat|index"),
]


INDUCTOR = GROUPS[1][0]
INDUCTOR_PARTS = [  # what an Inductor kernel's name says it fused (first match wins): a whole-model-compiled model's
    ("GEMM template", r"^triton_tem_"),  # BatchNorms and LayerNorms are Inductor's too, not ATen's
    ("with batch norm", r"batch_norm"),
    ("with layer norm", r"layer_norm"),
]


def group_of(name: str) -> str:
    low = name.lower()
    for group, pattern in GROUPS:
        if re.search(pattern, low):
            if group == INDUCTOR:
                part = next((p for p, pat in INDUCTOR_PARTS if re.search(pat, low)), "other fused")
                return f"{group}: {part}"
            return group
    return "other"


def device_kernels(events):
    """The GPU kernels (and copies) among profiler events, without the GPU-side spans of annotated regions.

    ``record_function`` ranges, such as the ``Optimizer.step#AdamW.step`` that every ``optimizer.step()`` opens, also
    appear as CUDA events spanning all the kernels launched inside them, gaps included: counting them double-counted
    the optimizer (8.5 ms of a SLaK-T step on an H100 that were really ~1.8 ms of kernels and host-bound gaps)."""
    cuda = torch.autograd.DeviceType.CUDA
    return [e for e in events if e.device_type == cuda and not getattr(e, "is_user_annotation", False)
            and not re.match(r"^Optimizer\.\w+#", e.name)]


def launchers(events, depth=4):
    """{kernel name: {context: microseconds}}: which host ops launched each kernel, as the chain of the launching op
    and its ``depth - 1`` nearest enclosing ops (e.g. ``aten::copy_ < aten::contiguous < aten::layer_norm <
    autograd::engine::evaluate_function: ...``), summed over launches. Uses the profiler's link from each CPU op to
    the kernels it launched (``FunctionEvent.kernels``)."""
    out = defaultdict(lambda: defaultdict(float))
    for evt in events:
        kernels = getattr(evt, "kernels", None)
        if not kernels:
            continue
        chain, parent = [], evt
        while parent is not None and len(chain) < depth:
            chain.append(parent.name)
            parent = getattr(parent, "cpu_parent", None)
        context = " < ".join(chain)
        for k in kernels:
            out[k.name][context] += k.duration
    return out


def make_infer_step(model, batch, size=224, device="cuda"):
    """One bf16-autocast inference forward at ``batch`` (as ``bench_throughput.infer_speed`` times it, eagerly)."""
    model.eval()
    x = torch.randn(batch, 3, size, size, device=device)

    @torch.no_grad()
    def step():
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            model(x)
    return step


def profile_model(name, batch, steps, out_dir, infer=False):
    torch.manual_seed(0)
    model = bt.make(name).cuda()
    if infer:
        if "folded" in name:
            model.eval()
            model.reparameterize(decomposed="decomposed" in name)
        step = make_infer_step(model, batch)
    else:
        step = bt.make_train_step(model, batch)
    wall = bt.seconds_per_call(step, steps, warmup=5) * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernels = defaultdict(float)
    counts = defaultdict(int)
    for evt in device_kernels(prof.events()):
        kernels[evt.name] += evt.device_time_total / 1e3 / steps  # ms per step
        counts[evt.name] += 1
    total = sum(kernels.values())
    groups = defaultdict(float)
    for k, v in kernels.items():
        groups[group_of(k)] += v
    print(f"== {name}, {'inference' if infer else 'training'} batch {batch}: wall {wall:.2f} ms/step, GPU kernels "
          f"{total:.2f} ms/step "
          f"({sum(counts.values()) / steps:.0f} kernels/step)")
    for g, v in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"   {g:28s} {v:8.3f} ms  {100 * v / total:5.1f} %")
    print("   top kernels (ms/step, launches/step):")
    launched_by = launchers(prof.events())
    for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[:25]:
        print(f"     {v:7.3f}  {counts[k] / steps:5.0f}  {k[:110]}")
        for context, us in sorted(launched_by.get(k, {}).items(), key=lambda kv: -kv[1])[:2]:
            print(f"                   {us / 1e3 / steps:7.3f} ms from {context[:150]}")
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(Path(out_dir) / (re.sub(r"\W+", "_", name) + ".json")))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="SLaK-T ours,SLaK-T dwconv=identity,convnext_tiny (timm)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=None, help="folder for Chrome traces")
    parser.add_argument("--infer", action="store_true", help="inference forwards (bf16 autocast) instead of steps")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    print(f"device {torch.cuda.get_device_name()} torch {torch.__version__}")
    for name in args.models.split(","):
        profile_model(name, args.batch, args.steps, args.out, infer=args.infer)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
