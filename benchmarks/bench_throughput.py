"""Whole-model training and inference throughput: SLaK-T with our Triton depthwise conv vs nn.Conv2d and ConvNeXt-T.

Run on a CUDA machine from the repository root (needs timm)::

    python benchmarks/bench_throughput.py [--train-batch 64] [--infer-batch 128] [--steps 10] [--graph]

Training: AdamW, bf16 autocast, 224x224 random images, batch 64; inference: bf16 autocast, no_grad, batch 128.
Prints img/s and peak memory per model, all in the same run on the same card. ``--graph`` replays each step as one
CUDA graph (every model alike): GPU time only, so the ratios no longer depend on how fast the host launches kernels.
Two ceilings bound what faster depthwise kernels can give: "dwconv=identity" replaces every depthwise conv by the
identity (BatchNorms and branch sums still run), "large_kernel=identity" the whole large-kernel module (convs, BNs
and sums). "folded decomposed" is ``reparameterize(decomposed=True)``, which adds the 5x5 kernel into the tall
K x 5 one (two depthwise convs instead of three). SLaK models run their blocks' compiled tails (``SLaK.Block``'s
``COMPILE_TAIL``, on by default on CUDA) unless the name says "eager tail"; "torch.compile" compiles a whole model
(timm's ConvNeXt-T too, for the compiled-vs-compiled ratio); "round-9 plans" restores the earlier depthwise launch
plans. Compare with ``benchmarks/RESULTS.md`` (section "dwconv (cutlass/)").
"""
import argparse
import copy
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import timm  # noqa: E402
import SLaK  # noqa: E402,F401  (registers SLaK_tiny & co. with timm)

SLAK_T = dict(kernel_size=[51, 49, 47, 13, 5], width_factor=1.3, Decom=True)
CONVNEXT_EMULATION = dict(kernel_size=[7, 7, 7, 7, 100])


_LAUNCH_PLAN = {}
_DEFAULT_PAD = SLaK.POINTWISE_PAD_MULTIPLE


def round9_launch_plans(on):
    """Switch the Triton kernels' launch plans back to round 9's (forward tiles (32, 64, 16) on every band, direct
    5x5 forward on large maps, alignment hints everywhere) for whole-model A/B runs in one process."""
    SLaK._load_fast_dwconv()
    kern = getattr(sys.modules.get(SLaK._DWCONV_MODULE_NAME), "_kernels", None)
    if kern is None:
        return
    if not _LAUNCH_PLAN:
        _LAUNCH_PLAN.update(_fwd_config=kern._fwd_config, _HINTS_OFF=kern._HINTS_OFF,
                            DIRECT_FWD_MAX_KERNEL=kern.DIRECT_FWD_MAX_KERNEL)
    if on:
        kern._fwd_config = lambda band, kband, cols, tall=True: (min(32, max(16, kern._next_pow2(band))), 64, 16, 4)
        kern._HINTS_OFF, kern.DIRECT_FWD_MAX_KERNEL = set(), 7
    else:
        for key, value in _LAUNCH_PLAN.items():
            setattr(kern, key, value)


def identity_dwconv(conv):
    """A stand-in for a branch's depthwise conv that returns its input, of our conv's class where ``conv`` is one, so
    that the branch BatchNorms still run through our fused kernels (``branch_bn_sum`` takes only our convs): the
    ``dwconv=identity`` ceiling is then the step with free convs and everything else as it runs. (Until session 11 a
    plain ``nn.Identity`` stood in, which sent the BNs to PyTorch's per-branch kernels: 14.1 instead of 3.5 ms of a
    SLaK-T step at batch 64 on an H100, which made the ceiling look 10 ms lower than it is.)"""
    base = type(conv) if isinstance(conv, torch.nn.Conv2d) else torch.nn.Identity

    class IdentityDwConv(base):
        def forward(self, x):
            return x.view_as(x)
    stand_in = copy.copy(conv) if base is not torch.nn.Identity else torch.nn.Identity()
    stand_in.__class__ = IdentityDwConv
    return stand_in


class IdentityLargeKernel(torch.nn.Identity):
    """The large-kernel module replaced by the identity, with the ``forward_parts`` that ``SLaK.Block``'s compiled
    tail asks for (one part, no bias)."""

    def forward_parts(self, x):
        return [x], None


def make(name):
    # "unpadded": the pointwise GEMMs on the raw odd widths (249, 499), as before SLaK.Block padded them on CUDA.
    SLaK.Block.PAD_POINTWISE = False if "unpadded" in name else "auto"
    # "pad64": the MLP's GEMM dimensions padded to multiples of 64 (whole tiles) instead of SLAK_POINTWISE_PAD's 8
    SLaK.POINTWISE_PAD_MULTIPLE = 64 if "pad64" in name else _DEFAULT_PAD
    SLaK.SHARE_AUTOCAST_CAST = "per-conv casts" not in name
    SLaK.LayerNorm.FUSED_CHANNELS_FIRST = "original LN" not in name  # session 11: F.layer_norm for channels_first
    # the blocks' compiled tails (SLaK.Block.COMPILE_TAIL, on CUDA by default) unless the name asks for eager ones
    SLaK.Block.COMPILE_TAIL = False if ("eager tail" in name or "unpadded" in name) else "auto"
    round9_launch_plans("round-9 plans" in name)
    # the fast module's switches are read at run time, so they are set here, right before each model is timed, for
    # every row (compiled ones included): our fused branch-BN kernels (cutlass/branch_bn_triton.py) unless the name
    # asks for one BN call per branch
    fast = sys.modules.get(SLaK._DWCONV_MODULE_NAME)
    if fast is not None:
        fast.FUSED_BRANCH_BN = "per-branch BN" not in name
        fast.FUSED_FAN_IN = "torch fan-in" not in name  # session 11: the block input's gradient in one pass
        fast.COMPILED_BRANCH_BN = "op BN" in name  # session 12: those kernels as one op inside a whole-model compile
    kernels = getattr(fast, "_kernels", None)
    if kernels is not None:  # session 12: the all-columns weight gradient (read at run time, compiled models too)
        kernels.WGRAD_ALLJ = "per-column wgrad" not in name
    # "max-autotune": Inductor's GEMM templates with fused epilogues (GELU, layer scale, residual), autotuned; without
    # its own CUDA graphs (the --graph rows capture theirs)
    compile_kwargs = {"mode": "max-autotune-no-cudagraphs"} if "max-autotune" in name else {}
    if name.startswith("convnext_tiny (timm)"):
        model = timm.create_model("convnext_tiny")
        return torch.compile(model, **compile_kwargs) if "torch.compile" in name else model
    impl = "cutlass" if "ours" in name or "identity" in name else "torch"
    kwargs = CONVNEXT_EMULATION if "emulation" in name else SLAK_T
    model = timm.create_model("SLaK_tiny", conv_impl=impl, **kwargs)
    if "torch.compile" in name:  # the whole model (the blocks' own compiled tails then stand aside)
        return torch.compile(model, **compile_kwargs)
    for block in (b for stage in model.stages for b in stage):
        if "large_kernel=identity" in name:
            block.large_kernel = IdentityLargeKernel()
        elif "dwconv=identity" in name:
            for branch in ("LoRA1", "LoRA2", "small_conv"):
                getattr(block.large_kernel, branch).conv = identity_dwconv(getattr(block.large_kernel, branch).conv)
    if "SyncBN sum" in name:  # the branch BNs + sum through utils.sync_batch_norm_sum (one process: no collective)
        import utils
        model = utils.convert_sync_batchnorm(model)
        utils.SyncBatchNormWithoutHostSync.FUSE_SINGLE_PROCESS = True
    return model


def make_train_step(model, batch, size=224, device="cuda", graph=False):
    """One AdamW step on a fixed random batch under bf16 autocast (``size`` px, 1000 classes).

    ``graph=True`` captures the whole step (forward, backward, AdamW with ``capturable=True``) in one CUDA graph and
    returns its replay: the step then costs its GPU time alone, with no per-kernel host launch cost.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, capturable=graph)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    model.train()

    def step():
        # grads start as None in every call, so under capture the backward allocates them in the graph's pool
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, cache_enabled=not graph):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    return cuda_graph(step) if graph else step


def cuda_graph(fn, warmup=3):
    """Run ``fn`` ``warmup`` times on a side stream (compiles kernels, allocates state), capture one call, and
    return the graph's ``replay``. ``fn`` must not synchronise with the host."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def seconds_per_call(fn, calls, warmup=3):
    """Wall seconds per call after ``warmup`` calls; peak-memory statistics restart after the warmup."""
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / calls


def train_speed(model, batch, steps, graph=False):
    seconds = seconds_per_call(make_train_step(model, batch, graph=graph), steps)
    return batch / seconds, torch.cuda.max_memory_allocated() / 2 ** 30


@torch.no_grad()
def infer_speed(model, batch, steps, graph=False):
    model.eval()
    x = torch.randn(batch, 3, 224, 224, device="cuda")

    def forward():
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not graph):
            model(x)
    fn = cuda_graph(forward) if graph else forward
    return batch / seconds_per_call(fn, steps), torch.cuda.max_memory_allocated() / 2 ** 30


def select_models(names, models: str, parser):
    """The names ``--models`` asks for, in its order (a device call that runs out of time loses the last ones, so
    the caller sets the priority); every name of ``names`` for "all". A name that is not a row is an error (it was
    silently skipped before)."""
    if models == "all":
        return list(names)
    asked = [m for m in models.split(",") if m]
    unknown = [m for m in asked if m not in names]
    if unknown or not asked:
        parser.error(f"--models: unknown name(s) {unknown!r}; the rows are: {', '.join(names)}")
    return list(dict.fromkeys(asked))


def medians(samples):
    """{name: (train img/s, train GiB, infer img/s, infer GiB)}, each the median over the rounds (models with at
    least one round)."""
    def median(values):
        values = sorted(values)
        return values[len(values) // 2]
    return {name: tuple(median([r[i] for r in runs]) for i in range(4)) for name, runs in samples.items() if runs}


def write_json(path, args, rows):
    """The medians so far, written atomically (temp file + rename): the file is always a whole record."""
    import json
    import os
    record = {"device": torch.cuda.get_device_name(), "graph": args.graph, "train_batch": args.train_batch,
              "infer_batch": args.infer_batch, "repeats": args.repeats,
              "rows": {name: {"train_img_s": r[0], "train_mem_gb": r[1], "infer_img_s": r[2], "infer_mem_gb": r[3]}
                       for name, r in rows.items()}}
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(record, indent=1, allow_nan=True))
    os.replace(tmp, path)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--train-batch", type=int, default=64)
    parser.add_argument("--infer-batch", type=int, default=128, help="0: training figures only")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds over all models (interleaved, so clock drift hits every model alike); "
                             "medians are reported")
    parser.add_argument("--models", default="all", help="comma-separated subset of the names printed")
    parser.add_argument("--graph", action="store_true",
                        help="time each step as one CUDA-graph replay (GPU time only, no launch overhead); "
                             "every model gets the same treatment, so the ratios are GPU-bound ones")
    parser.add_argument("--infer-models", default="all",
                        help="comma-separated rows that also get the inference figure (default every row; a device "
                             "call saves each skipped row's inference compile and capture)")
    parser.add_argument("--json", default=None, help="also write the medians to this JSON file")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    print(f"device {torch.cuda.get_device_name()} torch {torch.__version__} timm {timm.__version__}"
          + (" (CUDA-graph replays)" if args.graph else " (eager)"))
    names = ["convnext_tiny (timm)", "convnext_tiny (timm) torch.compile", "SLaK-T ours", "SLaK-T ours eager tail",
             "SLaK-T ours round-9 plans", "SLaK-T ours torch.compile",
             "SLaK-T ours per-conv casts", "SLaK-T ours per-branch BN", "SLaK-T ours torch fan-in",
             "SLaK-T ours original LN", "SLaK-T ours original LN torch fan-in", "SLaK-T ours per-column wgrad",
             "SLaK-T ours torch.compile per-column wgrad", "SLaK-T ours torch.compile op BN",
             "SLaK-T ours SyncBN sum (1 process)",
             "SLaK-T ours unpadded", "SLaK-T ours pad64", "SLaK-T nn.Conv2d", "SLaK-T ours folded",
             "SLaK-T ours folded decomposed", "SLaK-T ours folded decomposed torch.compile",
             "convnext_tiny (timm) torch.compile max-autotune",
             "SLaK-T ours folded decomposed torch.compile max-autotune",
             "SLaK-T dwconv=identity", "SLaK-T large_kernel=identity",
             "SLaK-T dwconv=identity eager tail", "SLaK-T ours folded decomposed eager tail",
             "emulation [7,7,7,7,100] ours", "emulation [7,7,7,7,100] nn.Conv2d"]
    names = select_models(names, args.models, parser)
    inferred = set(select_models(names, args.infer_models, parser))
    samples = {name: [] for name in names}
    for rep in range(args.repeats):
        for name in names:
            torch.manual_seed(0)
            start = time.perf_counter()
            try:
                model = make(name).cuda()
                if "folded" in name:
                    train, train_mem = float("nan"), float("nan")
                    model.eval()
                    model.reparameterize(decomposed="decomposed" in name)
                else:
                    train, train_mem = train_speed(model, args.train_batch, args.steps, args.graph)
                train_wall = time.perf_counter() - start
                infer, infer_mem = (infer_speed(model, args.infer_batch, args.steps, args.graph)
                                    if args.infer_batch and name in inferred else (float("nan"), float("nan")))
            except Exception as e:  # one model failing (e.g. a compiler error) must not cost the others' figures
                print(f"[{rep}] {name:36s} FAILED after {time.perf_counter() - start:.0f} s: "
                      f"{type(e).__name__}: {str(e).strip().splitlines()[-1:] or ''}", flush=True)
                model = None
                torch.cuda.empty_cache()
                continue
            samples[name].append((train, train_mem, infer, infer_mem))
            # wall seconds: building, compiling / capturing and timing (compile time shows here)
            print(f"[{rep}] {name:36s} train {train:8.1f} img/s ({train_mem:5.1f} GiB)  infer {infer:8.1f} img/s "
                  f"({infer_mem:5.1f} GiB)  wall train {train_wall:.0f} s, infer "
                  f"{time.perf_counter() - start - train_wall:.0f} s", flush=True)
            del model
            torch.cuda.empty_cache()
            if args.json:  # after every model: a call cut short by its time limit keeps what it measured
                write_json(args.json, args, medians(samples))

    rows = medians(samples)
    print(f"medians of {args.repeats} round(s):")
    for name, (train, train_mem, infer, infer_mem) in rows.items():
        spread = [r[0] for r in samples[name]]
        print(f"{name:36s} train {train:8.1f} img/s (min {min(spread):.1f}, max {max(spread):.1f}; "
              f"{train_mem:.1f} GiB)  infer {infer:8.1f} img/s ({infer_mem:.1f} GiB)")
    if args.json:
        write_json(args.json, args, rows)
    base = rows.get("convnext_tiny (timm)")
    if base:
        for name, (train, _, infer, _) in rows.items():
            print(f"{name:36s} vs ConvNeXt-T: train {train / base[0]:.3f}x  infer {infer / base[2]:.3f}x")


if __name__ == "__main__":
    main()
