"""How many Triton compilations of our depthwise kernels a detection run asks for (CPU only, nothing launched).

Triton compiles a ``@triton.jit`` kernel once per *specialisation key*: the values of its constexpr arguments and
num_warps, and for every integer argument whether it equals 1 or is a multiple of 16 (and whether it needs 64
bits). Classification feeds four fixed map sizes, so the key set is small and fixed. Detection's multi-scale
training (``detection/configs/cascade_mask_rcnn_slak_tiny_mstrain_*``: short side 480-800, long side <= 1333, the
crop branch, batch of 2 padded to a multiple of 32) changes the map sizes every iteration, and every new
combination of sizes, strides and launch plans that lands on a new key is a new compile (1-3 s each on the device
machine, in the training loop).

This script replays that pipeline's sizes through the launchers of ``cutlass/dwconv_triton.py`` on meta tensors,
with the kernels replaced by recorders, and counts the distinct keys per iteration, per kernel and in all::

    python benchmarks/triton_variants.py [--iters 50] [--seed 0] [--json out.json]

It counts keys, not seconds: the probe of ``bench_downstream.py`` measures the compiles on the GPU.
"""
import argparse
import importlib.util
import inspect
import json
import pathlib
import random
import sys
from collections import Counter

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
# SLaK-T in the cascade config: widths (1.3x ConvNeXt-T) and the (K, 5), (5, K), (5, 5) branches of each stage.
STAGES = [(124, 51), (249, 49), (499, 47), (998, 13)]
SMALL = 5
# Image sizes of COCO's train set, most common first (width, height); the synthetic downstream data varies likewise.
COCO_SIZES = [(640, 480), (640, 427), (480, 640), (427, 640), (640, 640), (640, 424), (500, 375), (640, 360),
              (612, 612), (640, 512), (375, 500), (640, 478), (333, 500), (640, 383)]
MULTI_SCALE = [(short, 1333) for short in range(480, 801, 32)]


def load_kernels():
    spec = importlib.util.spec_from_file_location("dwconv_triton_variants", ROOT / "cutlass" / "dwconv_triton.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rescale(w, h, scale):
    """mmcv's keep-ratio rescale to fit (long, short) = scale: the largest factor keeping both sides inside."""
    long_edge, short_edge = max(scale), min(scale)
    f = min(long_edge / max(w, h), short_edge / min(w, h))
    return int(w * f + 0.5), int(h * f + 0.5)


def pipeline_size(rng):
    """One training image's size after the cascade config's RandomChoice of resizes (and crop)."""
    w, h = rng.choice(COCO_SIZES)
    if rng.random() < 0.5:
        return rescale(w, h, rng.choice(MULTI_SCALE))
    w, h = rescale(w, h, rng.choice([(400, 1333), (500, 1333), (600, 1333)]))
    ch = rng.randint(384, max(384, min(h, 600)))  # RandomCrop 'absolute_range' (384, 600), clipped to the image
    cw = rng.randint(384, max(384, min(w, 600)))
    w, h = min(w, cw), min(h, ch)
    return rescale(w, h, rng.choice(MULTI_SCALE))


def batch_size_padded(rng, batch=2, divisor=32):
    sizes = [pipeline_size(rng) for _ in range(batch)]
    w = max(s[0] for s in sizes)
    h = max(s[1] for s in sizes)
    return -(-h // divisor) * divisor, -(-w // divisor) * divisor


def int_key(v, align=True, value=True):
    """Triton's specialisation of an int argument: the value 1, divisible by 16 (unless ``align`` is off), or
    neither (always neither unless ``value``); 64-bit when large. The kernels' size-agnostic twins specialise no
    size (``value`` off) and no stride's divisibility (``align`` off)."""
    tag = "" if not value else "1" if v == 1 else ("D" if align and v % 16 == 0 else "")
    return tag + ("L" if abs(v) >= 2 ** 31 else "")


class Recorder:
    """Stands in for a ``@triton.jit`` kernel: records the specialisation key of every launch. ``sizes``: record as
    the size-agnostic twin whose unspecialised size parameters these are (``dwconv_triton._int_params``); None: the
    fully specialised kernel."""

    def __init__(self, name, keys, fn, sizes=None):
        self.name, self.keys, self.fn = name, keys, fn
        self.twin, self.sizes = sizes is not None, set(sizes or ())
        self.params = list(inspect.signature(fn).parameters)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            sig = []
            for name, a in zip(self.params, args):
                if isinstance(a, torch.Tensor):
                    sig.append(str(a.dtype))
                elif isinstance(a, int):
                    sig.append(int_key(a, align=not self.twin, value=name not in self.sizes))
                else:
                    sig.append(repr(a))
            self.keys.add((self.name, tuple(sig), tuple(sorted(kwargs.items()))))
        return launch


def cudnn_rule():
    """``routes_to_cudnn(dtype, device_type, kh, kw)`` of ``cutlass/depthwise_conv2d_implicit_gemm.py``: the layers
    it sends to cuDNN (fp32 small kernels) never reach our launchers."""
    sys.path.insert(0, str(ROOT))
    try:
        import SLaK
    finally:
        sys.path.pop(0)
    fast = SLaK._load_fast_dwconv()
    return getattr(sys.modules[fast.__module__], "routes_to_cudnn", None) if fast is not None else None


def slak_t_layers(h, w, dtype=None, routes=None):
    """(channels, map height, map width, kh, kw) of SLaK-T's depthwise layers for an h x w (padded) input; with
    ``dtype`` and ``routes`` (:func:`cudnn_rule`), only those that run our kernels on CUDA in that dtype."""
    for stage, (c, k) in enumerate(STAGES):
        s = 4 * 2 ** stage
        for kh, kw in ((k, SMALL), (SMALL, k), (SMALL, SMALL)):
            if routes is None or dtype is None or not routes(dtype, "cuda", kh, kw):
                yield c, h // s, w // s, kh, kw


def count(iters=50, seed=0, batch=2, dtype=torch.float32, specialised_sizes=None, eval_images=0, cudnn_routing=True):
    """Distinct keys after each training iteration, then after ``eval_images`` test images (batch 1, the test
    pipeline's resize to 1333 x 800, forward only), with the module's SPECIALISED_SIZES or ``specialised_sizes``;
    ``key_set`` holds the keys themselves (twins' kernel names end in " (twin)"). ``cudnn_routing``: leave out the
    layers that run on cuDNN in ``dtype`` (fp32: the 5x5 branches and stage 4)."""
    routes = cudnn_rule() if cudnn_routing else None
    kern = load_kernels()
    keys = set()
    for name in [k for k in dir(kern) if k.startswith("dwconv_") and k.endswith("_kernel")]:
        setattr(kern, name, Recorder(name, keys, getattr(kern, name).fn))
    kern._size_agnostic_twin = lambda rec: Recorder(rec.name + " (twin)", keys, rec.fn, kern._int_params(rec.fn)[0])
    if specialised_sizes is not None:
        kern.SPECIALISED_SIZES = specialised_sizes
    rng = random.Random(seed)
    per_iter, sizes = [], []
    for _ in range(iters):
        h, w = batch_size_padded(rng, batch)
        sizes.append((h, w))
        for c, mh, mw, kh, kw in slak_t_layers(h, w, dtype, routes):
            kern.launch_layer_on_meta(batch, c, mh, mw, kh, kw, dtype)
        per_iter.append(len(keys))
    for _ in range(eval_images):
        w, h = rescale(*rng.choice(COCO_SIZES), (1333, 800))
        h, w = -(-h // 32) * 32, -(-w // 32) * 32
        for c, mh, mw, kh, kw in slak_t_layers(h, w, dtype, routes):
            kern.launch_forward(torch.empty(1, c, mh, mw, device="meta", dtype=dtype),
                                torch.empty(c, 1, kh, kw, device="meta", dtype=dtype))
    by_kernel = Counter(k[0] for k in keys)
    return {"iters": iters, "distinct_inputs": len(set(sizes)), "keys_after_iter": per_iter,
            "keys": len(keys), "keys_after_eval": len(keys) if eval_images else None, "by_kernel": dict(by_kernel),
            "key_set": keys}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval_images", type=int, default=50, help="test images after training (batch 1, forward)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    out = {}
    for label, sizes, routing in (("first 8 sizes specialised (the default)", None, True),
                                  ("every size specialised (before)", 10 ** 9, False),
                                  ("4 specialised sizes", 4, True),
                                  ("every size through the twins, no cuDNN routing", 0, False),
                                  ("every size through the twins (detection.slak)", 0, True)):
        r = out[label] = count(args.iters, args.seed, specialised_sizes=sizes, eval_images=args.eval_images,
                               cudnn_routing=routing)
        print(f"{label}: {args.iters} iterations, {r['distinct_inputs']} distinct padded input sizes, {r['keys']} "
              f"kernel specialisations ({', '.join(f'{k} {v}' for k, v in sorted(r['by_kernel'].items()))})")
        marks = [0, 1, 2, 4, 9, 19, 29, 49, 99, 199]
        print("  after iteration " + ", ".join(f"{i + 1}: {r['keys_after_iter'][i]}" for i in marks if i < args.iters)
              + (f"; after {args.eval_images} test images: {r['keys_after_eval']}" if args.eval_images else ""))
    if args.json:
        counts = {label: {k: v for k, v in r.items() if k != "key_set"} for label, r in out.items()}
        pathlib.Path(args.json).write_text(json.dumps(counts, indent=1))
    return out


if __name__ == "__main__":
    sys.exit(main() and 0)
