"""Check and time the Triton depthwise conv (cutlass/) against cuDNN on every SLaK-T/S/B large-kernel layer.

Run on a CUDA machine from the repository root::

    python benchmarks/bench_dwconv.py [--sweep [--sweep-maps 56,28,14,7]] [--old FILE] [--json results.json]
    python benchmarks/bench_dwconv.py --detection_shapes   # detection's map sizes: correctness, then twins' cost
    python benchmarks/bench_dwconv.py --skip-check --rotate_mb 256 --layers_json layers.json   # issue 20's check

Prints (1) a GPU correctness table (relative Frobenius error against float64 ``F.conv2d``, poisoned outputs), then
(2) for each layer at batch 64 in bf16: forward and forward+backward time of ours and of cuDNN (``F.conv2d`` with
per-axis padding, ``cudnn.benchmark`` on, same run), TFLOP/s, speed-ups, and the floor
max(bytes / 3 TB/s, FLOPs / CUDA-core rate). ``--sweep`` also times every kernel path and alternative tile
configurations per layer (forward and weight-gradient kernels alone); ``--old FILE`` adds an earlier copy of
``dwconv_triton.py`` to that table (its launchers only; its op registration is skipped) for before/after numbers.
Compare with ``benchmarks/RESULTS.md`` (section "dwconv (cutlass/)").

``--rotate_mb M`` (issue 20) replaces (2): each SLaK-T/S layer cycles through as many independent (x, weight, dy)
sets as its bytes need to fill M MiB, so a set has left the L2 cache (50 MiB on H100) before its turn comes again, as
a layer's tensors have inside a model; one input set alone keeps stage 4's layers (6 MB) in L2 across replays.
``--layers_json PATH`` writes issue 20's record of the SLaK-T layers (per-layer times and speed-ups over cuDNN).
"""
import argparse
import importlib.util
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench, do_bench_cudagraph

from bench_main import card_name

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("depthwise_conv2d_implicit_gemm",
                                               ROOT / "cutlass" / "depthwise_conv2d_implicit_gemm.py")
dw = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dw)
kern = dw._kernels
# Every check and table here is about our kernels: the fp32 small kernels that users' runs send to cuDNN
# (dw.routes_to_cudnn) stay on ours; detection_twin_timing times cuDNN beside them.
dw.CUDNN_FP32_MAX_TAPS = 0

BATCH = 64
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: smoke test of check() under TRITON_INTERPRET=1
HBM_BYTES_PER_S = 3.0e12  # device-to-device copy measured on this H100 kind (KINDS.md)
CUDA_CORE_FLOPS = 67e12   # H100 SXM fp32 FMA peak (datasheet); a direct CUDA-core kernel cannot beat this
# (channels at width 1.3 for SLaK-T/S, SLaK-B) per stage: map size and (large kernel) per the SLaK configs
STAGES = [(56, 51, (124, 166)), (28, 49, (249, 332)), (14, 47, (499, 665)), (7, 13, (998, 1331))]


def layers():
    for hw, k, chans in STAGES:
        for c, model in zip(chans, ("T/S", "B")):
            for kh, kw in ((k, 5), (5, k), (5, 5)):
                yield model, c, hw, kh, kw


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check(c, h, w, kh, kw, dtype, channels_last=False, n=2):
    x = torch.randn(n, c, h, w, device=DEV, dtype=torch.float64)
    wt = torch.randn(c, 1, kh, kw, device=DEV, dtype=torch.float64) / (kh * kw) ** 0.5
    g = torch.randn(n, c, h, w, device=DEV, dtype=torch.float64)
    xr, wr = x.clone().requires_grad_(), wt.clone().requires_grad_()
    ref = F.conv2d(xr, wr, padding=(kh // 2, kw // 2), groups=c)
    ref.backward(g)
    xo = x.to(dtype)
    if channels_last:
        xo = xo.contiguous(memory_format=torch.channels_last)
    xo.requires_grad_()
    wo = wt.to(dtype).requires_grad_()
    out = dw.depthwise_conv2d(xo, wo)
    out.backward(g.to(dtype))
    poisoned = torch.full((n, c, h, w), float("nan"), device=DEV, dtype=dtype)
    kern.launch_forward(x.to(dtype).contiguous(), wt.to(dtype).contiguous(), out=poisoned)
    if DEV == "cuda":
        torch.cuda.synchronize()
    return (rel(out, ref), rel(xo.grad, xr.grad), rel(wo.grad, wr.grad), bool(torch.isfinite(poisoned).all()),
            out.is_contiguous(memory_format=torch.channels_last) == channels_last)


def correctness():
    print("== GPU correctness (relative Frobenius error vs float64; poison = every output element written)")
    cases = [(124, 56, 56, 51, 5), (124, 56, 56, 5, 51), (499, 14, 14, 47, 5), (998, 7, 7, 5, 13), (37, 23, 17, 13, 9),
             (5, 65, 70, 31, 31), (3, 130, 40, 61, 3), (7, 9, 11, 63, 63), (124, 56, 56, 5, 5), (249, 28, 28, 5, 5),
             (998, 7, 7, 13, 5), (998, 7, 7, 5, 5), (9, 8, 8, 51, 5), (6, 5, 3, 3, 3)]
    ok = True
    for c, h, w, kh, kw in cases:
        for dtype, tol in ((torch.bfloat16, 1e-2), (torch.float16, 3e-3), (torch.float32, 1e-3)):
            for cl in (False, True):
                e_out, e_dx, e_dw, written, fmt = check(c, h, w, kh, kw, dtype, cl)
                good = max(e_out, e_dx, e_dw) < tol and written and fmt
                ok &= good
                print(f"{c:5d}x{h:3d}x{w:3d} k{kh}x{kw} {str(dtype)[6:]:9s} cl={int(cl)} out {e_out:.1e} dx {e_dx:.1e}"
                      f" dw {e_dw:.1e} written={written} {'OK' if good else 'FAIL'}")
    torch.backends.cudnn.allow_tf32 = False
    e = check(124, 56, 56, 51, 5, torch.float32)
    torch.backends.cudnn.allow_tf32 = True
    print(f"fp32 exact (allow_tf32=False): out {e[0]:.1e} dx {e[1]:.1e} dw {e[2]:.1e}")
    ok &= max(e[:3]) < 1e-5
    print("correctness:", "ALL OK" if ok else "FAILURES")
    return ok


# Cascade Mask R-CNN's inputs (multi-scale short side 480-800, long side <= 1333, both orientations; padded to 32 by
# the data preprocessor) -> SLaK-T stage maps at strides 4..32, e.g. 800x1344 -> 200x336, 100x168, 50x84, 25x42.
DETECTION_INPUTS = [(800, 1344), (736, 1120), (480, 640), (608, 1088), (800, 1216), (1088, 800)]
SLAK_T_STAGES = [(124, 51), (249, 49), (499, 47), (998, 13)]  # (channels at width 1.3, large kernel)


def detection_layers(inputs=DETECTION_INPUTS):
    """(index of the input, channels, map height, map width, kh, kw) of every SLaK-T depthwise layer on each of
    ``inputs`` (padded input sizes)."""
    for i, (ih, iw) in enumerate(inputs):
        for stage, (c, k) in enumerate(SLAK_T_STAGES):
            for kh, kw in ((k, 5), (5, k), (5, 5)):
                yield i, c, ih // (4 * 2 ** stage), iw // (4 * 2 ** stage), kh, kw


def detection_correctness():
    """Ours vs float64 ``F.conv2d`` (forward, input and weight gradients) on every SLaK-T layer shape that detection
    produces: odd maps, maps smaller than the kernel, sizes that are not multiples of the tiles; batch 1 and 2."""
    print("== detection map sizes (relative Frobenius error vs float64; fp32 runs tf32 as in training)")
    worst, ok = {}, True
    for i, c, h, w, kh, kw in detection_layers():
        n = 1 + i % 2
        for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 1e-2)):
            e_out, e_dx, e_dw, written, _ = check(c, h, w, kh, kw, dtype, n=n)
            err = max(e_out, e_dx, e_dw)
            good = err < tol and written
            ok &= good
            worst[dtype] = max(worst.get(dtype, 0.), err)
            print(f"n={n} {c:4d}x{h:3d}x{w:3d} k{kh}x{kw} {str(dtype)[6:]:9s} out {e_out:.1e} dx {e_dx:.1e} "
                  f"dw {e_dw:.1e} written={written} {'OK' if good else 'FAIL'}")
    print("max errors: " + ", ".join(f"{str(d)[6:]} {e:.1e}" for d, e in worst.items()))
    print("detection shapes:", "ALL OK" if ok else "FAILURES")
    return ok


def detection_twin_timing(inputs=((800, 1344), (736, 1120)), n=2, dtype=torch.float32):
    """GPU ms of a layer's forward + input gradient + weight gradient on detection's maps, with the fully
    specialised kernels and with their size-agnostic twins (``dwconv_triton._pick``: what map sizes after the
    first ``SPECIALISED_SIZES`` of a process run), and cuDNN's. fp32 (tf32) at batch 2, as the cascade config
    trains. Returns {layer: {"specialised": ms, "twin": ms, "cudnn": ms}}."""
    print("== detection maps: specialised kernels vs their size-agnostic twins (fwd + dx + dw, ms, do_bench median)")
    saved = kern.SPECIALISED_SIZES
    out, totals = {}, {"specialised": 0., "twin": 0., "cudnn": 0.}
    try:
        for _, c, h, w, kh, kw in detection_layers(inputs):
            x = torch.randn(n, c, h, w, device=DEV, dtype=dtype)
            g = torch.randn_like(x)
            wt = torch.randn(c, 1, kh, kw, device=DEV, dtype=dtype)
            wf = wt.flip(2, 3).contiguous()
            xr = x.clone().requires_grad_()
            wr = wt.clone().requires_grad_()

            def ours():
                kern.launch_forward(x, wt)
                kern.launch_forward(g, wf)
                kern.launch_weight_grad(g, x, wt)

            def cudnn():
                torch.autograd.backward(F.conv2d(xr, wr, padding=(kh // 2, kw // 2), groups=c), g)

            r = {}
            for label, sizes in (("specialised", 10 ** 9), ("twin", 0)):
                kern.SPECIALISED_SIZES = sizes
                kern.reset_specialised_sizes()
                r[label] = bench(ours)
            r["cudnn"] = bench(cudnn)
            name = f"{c}@{h}x{w} {kh}x{kw}"
            out[name] = r
            for key in totals:
                totals[key] += r[key]
            print(f"{name:22s} specialised {r['specialised']:.3f} twin {r['twin']:.3f} "
                  f"(x{r['twin'] / r['specialised']:.2f}) cudnn {r['cudnn']:.3f}", flush=True)
    finally:
        kern.SPECIALISED_SIZES = saved
        kern.reset_specialised_sizes()
    print("total ms: " + ", ".join(f"{k} {v:.2f}" for k, v in totals.items())
          + f"; twin / specialised x{totals['twin'] / max(totals['specialised'], 1e-9):.3f}")
    return out


def bench(fn):
    return do_bench(fn, warmup=10, rep=60, return_mode="median")


def bench_graph(fn):
    """Median ms of CUDA-graph replays (no CPU launch overhead): the GPU time of the layer."""
    try:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        return do_bench_cudagraph(fn, rep=60, return_mode="median")
    except Exception as exc:  # noqa: BLE001 - report, keep timing the rest
        print(f"graph capture failed: {exc!r}")
        return float("nan")


def time_layer(c, hw, kh, kw, dtype=torch.bfloat16):
    x = torch.randn(BATCH, c, hw, hw, device=DEV, dtype=dtype, requires_grad=True)
    w = (torch.randn(c, 1, kh, kw, device=DEV, dtype=dtype) / (kh * kw) ** 0.5).requires_grad_()
    g = torch.randn_like(x)
    pad = (kh // 2, kw // 2)

    def ours():
        return dw.depthwise_conv2d(x, w)

    def cudnn():
        return F.conv2d(x, w, padding=pad, groups=c)

    res = {}
    for name, f in (("ours", ours), ("cudnn", cudnn)):
        with torch.no_grad():
            res[name + "_fwd"] = bench_graph(f)
            res[name + "_fwd_eager"] = bench(f)
        res[name + "_fb"] = bench_graph(lambda: torch.autograd.backward(f(), g))
        res[name + "_fb_eager"] = bench(lambda: torch.autograd.backward(f(), g))
    return res


def rotation_sets(set_bytes: int, rotate_mb: float) -> int:
    """Number of input sets of ``set_bytes`` each that together hold at least ``rotate_mb`` MiB; 1 for 0 MiB."""
    return max(1, math.ceil(rotate_mb * 2 ** 20 / set_bytes))


def layer_set_bytes(c: int, hw: int, kh: int, kw: int, itemsize: int = 2) -> int:
    """Bytes of one layer input set at batch BATCH: x, weight and the output gradient dy."""
    return (2 * BATCH * c * hw * hw + c * kh * kw) * itemsize


def over_sets(conv, sets, backward: bool):
    """One call runs ``conv`` on every (x, weight, dy) set in turn, and its backward if asked.

    The backward returns dx and dw (``autograd.grad``) instead of accumulating them into the leaves' ``.grad``: a
    layer inside a model hands dx on, and the extra add kernel would weigh on both sides of the comparison.
    """
    def run():
        for x, w, dy in sets:
            y = conv(x, w)
            if backward:
                torch.autograd.grad(y, (x, w), dy)
    return run


def time_layer_rotating(c, hw, kh, kw, rotate_mb, dtype=torch.bfloat16):
    """Median ms per input set of CUDA-graph replays that cycle through ``rotation_sets`` independent input sets.

    Ours and cuDNN run on the same sets. The graph holds the R sets back to back (``bench_graph`` unrolls its
    function), so between two uses of a set the other sets move at least ``rotate_mb`` MiB through the cache.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    n_sets = rotation_sets(layer_set_bytes(c, hw, kh, kw, itemsize), rotate_mb)
    sets = [(torch.randn(BATCH, c, hw, hw, device=DEV, dtype=dtype, requires_grad=True),
             (torch.randn(c, 1, kh, kw, device=DEV, dtype=dtype) / (kh * kw) ** 0.5).requires_grad_(),
             torch.randn(BATCH, c, hw, hw, device=DEV, dtype=dtype)) for _ in range(n_sets)]
    pad = (kh // 2, kw // 2)
    convs = {"ours": dw.depthwise_conv2d, "cudnn": lambda x, w: F.conv2d(x, w, padding=pad, groups=c)}
    res = {"sets": n_sets}
    for name, conv in convs.items():
        with torch.no_grad():
            res[name + "_fwd"] = bench_graph(over_sets(conv, sets, backward=False)) / n_sets
        res[name + "_fb"] = bench_graph(over_sets(conv, sets, backward=True)) / n_sets
    return res


def layer_entry(r: dict) -> dict:
    """One layer of issue 20's record from a layer-table row (``time_layer`` or ``time_layer_rotating`` times)."""
    kh, kw = r["kernel"]

    def finite(v, digits):
        return round(v, digits) if math.isfinite(v) else None
    return {"layer": f"{r['C']}@{r['map']} {kh}x{kw}", "large_kernel": max(kh, kw) > 5, "sets": r.get("sets", 1),
            **{f"{k}_ms": finite(r[k], 5) for k in ("ours_fb", "cudnn_fb", "ours_fwd", "cudnn_fwd")},
            "speedup_fb": finite(r["cudnn_fb"] / r["ours_fb"], 3),
            "speedup_fwd": finite(r["cudnn_fwd"] / r["ours_fwd"], 3)}


def layers_record(rows, card: str, rotate_mb: float) -> dict:
    """Issue 20's record: ms per layer of ours and cuDNN, forward and forward+backward, for the SLaK-T ('T/S') rows.

    A minimum is None when a timing failed (NaN), so a layer that was not measured can never pass the check.
    """
    entries = [layer_entry(r) for r in rows if r["model"] == "T/S"]

    def worst(items):
        ups = [e["speedup_fb"] for e in items]
        return None if not ups or None in ups else min(ups)
    return {"card": card, "batch": BATCH, "rotate_mb": rotate_mb, "layers": entries, "min_speedup_fb": worst(entries),
            "min_speedup_fb_large_kernel": worst([e for e in entries if e["large_kernel"]])}


def print_speedup_header(rotate_mb: float):
    print(f"== SLaK-T layers, batch {BATCH}, bf16, inputs rotating through {rotate_mb:g} MiB (0: one input set); "
          "median ms per set of CUDA-graph replays; x = cuDNN / ours")
    print(f"{'layer':14s} {'sets':>4s} | {'ours fwd':>8s} {'cudnn':>7s} {'x':>6s} | {'ours f+b':>8s} {'cudnn':>7s} "
          f"{'x':>6s}")


def speedup_line(e: dict) -> str:
    cells = [f"{v:{width}.{digits}f}" if v is not None else f"{'nan':>{width}s}" for v, width, digits in (
        (e["ours_fwd_ms"], 8, 4), (e["cudnn_fwd_ms"], 7, 4), (e["speedup_fwd"], 6, 2),
        (e["ours_fb_ms"], 8, 4), (e["cudnn_fb_ms"], 7, 4), (e["speedup_fb"], 6, 2))]
    return f"{e['layer']:14s} {e['sets']:4d} | {' '.join(cells[:3])} | {' '.join(cells[3:])}"


def load_old(path):
    """Launchers of an earlier dwconv_triton.py, without its torch.library registrations (names would clash)."""
    src = Path(path).read_text()
    src = src[:src.index('@torch.library.custom_op("slak::dwconv2d"')]
    ns = {"__name__": "old_dwconv_triton"}
    exec(compile(src, str(path), "exec"), ns)  # noqa: S102 - our own earlier file, benchmark only
    return ns


def sweep(c, hw, kh, kw, old=None, dtype=torch.bfloat16, passes=("fwd", "wgrad")):
    """Forward and weight-gradient kernel times (CUDA graphs) per path and tile config for one layer, for the passes
    named. Each candidate's result is first compared with the default launch's: one that disagrees by more than
    bf16 rounding (relative 2e-2) is reported as ``"wrong <error>"`` instead of a time, so a fast but wrong tile
    can never win the table."""
    x = torch.randn(BATCH, c, hw, hw, device=DEV, dtype=dtype)
    w = torch.randn(c, 1, kh, kw, device=DEV, dtype=dtype)
    shape = tuple(w.shape)
    fwd, wg = {}, {}
    cand_f = {"default": lambda: kern.launch_forward(x, w)}
    cand_w = {"default": lambda: kern._WGRAD_LAUNCH[kern.kernel_path(hw, hw, kh, kw, True)](x, x, shape)}
    if hw * hw <= kern.PLANE_MAX_PIXELS:
        cand_f["plane"] = lambda: kern._launch_plane_fwd(x, w)
        cand_w["plane"] = lambda: kern._launch_plane_wgrad(x, x, shape)
    if max(kh, kw) <= 7:
        cand_f["direct"] = lambda: kern._launch_direct_fwd(x, w)
        cand_w["direct"] = lambda: kern._launch_direct_wgrad(x, x, shape)
        for cfg in ((1, 8, 64, 4), (4, 8, 32, 4), (2, 16, 32, 4), (8, 8, 8, 4), (4, 16, 16, 4), (2, 8, 64, 8)):
            cand_f[f"direct{cfg}"] = lambda cfg=cfg: kern._launch_direct_fwd(x, w, config=cfg)
        for cfg in ((1, 64, 4), (2, 32, 4), (4, 16, 4), (8, 8, 4), (2, 64, 8)):
            cand_w[f"direct{cfg}"] = lambda cfg=cfg: kern._launch_direct_wgrad(x, x, shape, config=cfg)
    cand_f["banded"] = lambda: kern._launch_fwd(x, w)
    cand_w["banded"] = lambda: kern._launch_wgrad(x, x, shape)
    # the same default tiles without the alignment hints of _flat_index (round 9: they cost on some layers)
    fwd_cfg = kern._fwd_config(hw, max(kh, kw), BATCH * hw, kh >= kw)
    wgrad_cfg = kern._wgrad_plan(BATCH, c, hw, hw, max(kh, kw), min(kh, kw), kh >= kw).config(max_vec=1)
    cand_f["banded nohint"] = lambda: kern._launch_fwd(x, w, config=fwd_cfg + (1,))
    cand_w["banded nohint"] = lambda: kern._launch_wgrad(x, x, shape, config=wgrad_cfg)
    for cfg in ((64, 64, 32, 4), (64, 128, 32, 4), (32, 64, 16, 4), (32, 128, 32, 4), (64, 64, 64, 4),
                (128, 64, 32, 8)):
        cand_f[f"banded{cfg}"] = lambda cfg=cfg: kern._launch_fwd(x, w, config=cfg)
    for cfg in ((64, 64, 4), (32, 64, 4), (16, 64, 4), (32, 128, 4), (16, 128, 4)):
        cand_w[f"banded{cfg}"] = lambda cfg=cfg: kern._launch_wgrad(x, x, shape, config=cfg)
    if min(kh, kw) <= kern.WGRAD_ALLJ_MAX_COLUMNS:  # the opt-in all-columns kernel (WGRAD_ALLJ), default and tiles
        for cfg in (("allj",), ("allj", 32, 16, 64, 8), ("allj", 16, 16, 64, 4), ("allj", 32, 16, 32, 4),
                    ("allj", 64, 16, 32, 8), ("allj", 32, 32, 64, 8)):
            cand_w["banded" + "".join(f" {v}" for v in cfg)] = \
                lambda cfg=cfg: kern._launch_wgrad(x, x, shape, config=cfg)
    if old is not None:  # the earlier file's launchers for the path its own kernel_path picks
        path = old["kernel_path"](hw, hw, kh, kw) if "kernel_path" in old else (
            "direct" if max(kh, kw) <= 7 or hw * hw <= 64 else "banded")
        suffix = "" if path == "banded" else f"_{path}"
        cand_f["old"] = lambda: old[f"_launch{suffix}_fwd"](x, w)
        cand_w["old"] = lambda: old[f"_launch{suffix}_wgrad"](x, x, shape)
    for pass_, cands, res in (("fwd", cand_f, fwd), ("wgrad", cand_w, wg)):
        if pass_ not in passes:
            continue
        ref = cands["default"]().double()
        for name, f in cands.items():
            try:
                err = ((f().double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
                res[name] = bench_graph(f) if err <= 2e-2 else f"wrong {err:.2e}"
            except Exception as exc:  # noqa: BLE001 - a config the compiler rejects is reported, not fatal
                res[name] = f"error {type(exc).__name__}"
    return fwd, wg


def get_args_parser():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--skip-table", action="store_true")
    parser.add_argument("--old", default=None, help="earlier dwconv_triton.py to time in the --sweep table")
    parser.add_argument("--sweep-maps", default="56,28,14,7", help="map sizes the --sweep visits")
    parser.add_argument("--sweep-pass", default="fwd,wgrad", help="the passes --sweep times: fwd, wgrad or both")
    parser.add_argument("--detection_shapes", action="store_true",
                        help="only the map sizes Cascade Mask R-CNN produces (batch 1-2): correctness, then the "
                             "specialised kernels vs their size-agnostic twins vs cuDNN")
    parser.add_argument("--rotate_mb", type=float, default=0.,
                        help="time the SLaK-T layers on input sets rotating through this many MiB, more than L2 "
                             "(issue 20; 256 suggested); 0: the full table on one input set")
    parser.add_argument("--layers_json", default=None, help="write issue 20's record of the SLaK-T layers here")
    return parser


def main():
    parser = get_args_parser()
    args = parser.parse_args()
    if args.rotate_mb < 0:
        parser.error(f"--rotate_mb must be >= 0; got {args.rotate_mb!r}")
    if not args.sweep_pass or not set(args.sweep_pass.split(",")) <= {"fwd", "wgrad"}:
        parser.error(f"--sweep-pass is fwd, wgrad or fwd,wgrad; got {args.sweep_pass!r}")
    import triton
    print(f"device {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__} "
          f"cudnn {torch.backends.cudnn.version()}")
    torch.manual_seed(0)
    if args.detection_shapes:  # as detection runs: the first map sizes specialised, later ones the twins
        if not detection_correctness():
            raise SystemExit("GPU correctness check on detection shapes failed")
        detection_twin_timing()
        return
    # The tables time the kernels a classifier gets at these sizes: fully specialised (the twins that
    # dwconv_triton._pick gives map sizes after a process's first SPECIALISED_SIZES are for detection's varying maps).
    if kern is not None:
        kern.SPECIALISED_SIZES = 10 ** 9
    ok = True if args.skip_check else correctness()
    torch.backends.cudnn.benchmark = True
    rows, out = [], {"device": torch.cuda.get_device_name(), "layers": []}
    if args.rotate_mb > 0:  # issue 20: the SLaK-T layers only, on rotating input sets
        print_speedup_header(args.rotate_mb)
        for model, c, hw, kh, kw in ([] if args.skip_table else layers()):
            if model != "T/S":
                continue
            r = time_layer_rotating(c, hw, kh, kw, args.rotate_mb)
            r.update(model=model, C=c, map=hw, kernel=[kh, kw])
            out["layers"].append(r)
            rows.append(r)
            print(speedup_line(layer_entry(r)))
            torch.cuda.empty_cache()  # this layer's sets and graph pools, before the next layer's
    else:
        print(f"== batch {BATCH}, bf16, median ms of CUDA-graph replays (eager: do_bench, CPU launch cost included); "
              "TFLOP/s on 2*N*C*H*W*kh*kw (fwd) and 3x that (fwd+bwd)")
        hdr = (f"{'model':5s} {'C':>5s} {'map':>4s} {'kernel':>6s} | {'ours fwd':>8s} {'cudnn':>7s} {'x':>5s} "
               f"{'TF/s':>5s} | {'ours f+b':>8s} {'cudnn':>7s} {'x':>5s} {'TF/s':>5s} | {'floor f+b':>9s}")
        print(hdr)
        for model, c, hw, kh, kw in ([] if args.skip_table else layers()):
            r = time_layer(c, hw, kh, kw)
            flops = 2 * BATCH * c * hw * hw * kh * kw
            nbytes_fb = 12 * BATCH * c * hw * hw  # bf16: fwd x,y; dx: dy,dx; dw: dy,x
            floor = max(nbytes_fb / HBM_BYTES_PER_S, 3 * flops / CUDA_CORE_FLOPS) * 1e3
            r.update(model=model, C=c, map=hw, kernel=[kh, kw], gflop_fwd=flops / 1e9, floor_fb_ms=floor)
            out["layers"].append(r)
            print(f"{model:5s} {c:5d} {hw:4d} {kh:2d}x{kw:<3d} | {r['ours_fwd']:8.3f} {r['cudnn_fwd']:7.3f} "
                  f"{r['cudnn_fwd'] / r['ours_fwd']:5.1f} {flops / r['ours_fwd'] / 1e9:5.1f} | {r['ours_fb']:8.3f} "
                  f"{r['cudnn_fb']:7.3f} {r['cudnn_fb'] / r['ours_fb']:5.1f} {3 * flops / r['ours_fb'] / 1e9:5.1f} | "
                  f"{floor:9.3f} | {r['ours_fb_eager']:7.3f} {r['cudnn_fb_eager']:7.3f}")
            rows.append(r)
    tot = {k: sum(r[k] for r in rows) for k in ("ours_fwd", "cudnn_fwd", "ours_fb", "cudnn_fb")}
    rows and print(f"sum over layers: fwd {tot['ours_fwd']:.2f} vs {tot['cudnn_fwd']:.2f} ms "
          f"({tot['cudnn_fwd'] / tot['ours_fwd']:.1f}x); fwd+bwd {tot['ours_fb']:.2f} vs {tot['cudnn_fb']:.2f} ms "
          f"({tot['cudnn_fb'] / tot['ours_fb']:.1f}x); min f+b speed-up "
          f"{min(r['cudnn_fb'] / r['ours_fb'] for r in rows):.1f}x")
    if rows and (args.rotate_mb > 0 or args.layers_json):
        record = layers_record(rows, card_name(), args.rotate_mb)
        if args.rotate_mb == 0:
            print_speedup_header(0)
            for e in record["layers"]:
                print(speedup_line(e))
        print(f"min f+b speed-up over the SLaK-T layers: {record['min_speedup_fb']}, over its large-kernel ones: "
              f"{record['min_speedup_fb_large_kernel']} (issue 20 asks >= 8)")
        if args.layers_json:
            Path(args.layers_json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.layers_json).write_text(json.dumps(record, indent=1))
    if args.sweep:
        old = load_old(args.old) if args.old else None
        out["sweep"] = {}
        for model, c, hw, kh, kw in layers():
            if model != "T/S" or str(hw) not in args.sweep_maps.split(","):
                continue
            fwd, wg = sweep(c, hw, kh, kw, old, passes=tuple(args.sweep_pass.split(",")))
            out["sweep"][f"{c}@{hw} {kh}x{kw}"] = {"fwd": fwd, "wgrad": wg}
            for tag, d in (("fwd", fwd), ("wgrad", wg)):
                if not d:
                    continue
                timed = sorted((v, k) for k, v in d.items() if isinstance(v, float))
                keep = [k for k in ("default", "old", "plane", "direct", "banded", "banded nohint")
                        if isinstance(d.get(k), float)]
                print(f"sweep {c}@{hw} {kh}x{kw} {tag}: " + " ".join(f"{k}={d[k]:.4f}" for k in keep)
                      + " | best " + " ".join(f"{k}={v:.4f}" for v, k in timed[:3]))
                bad = {k: v for k, v in d.items() if isinstance(v, str)}
                bad and print(f"    not timed: {bad}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    if not ok:
        raise SystemExit("GPU correctness check failed")


if __name__ == "__main__":
    main()
