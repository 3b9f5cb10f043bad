"""Cold compile time of the SLaK block tail for SLaK-T's four stage shapes: one graph per stage ('static', the
default) against one graph for every stage (``SLAK_TAIL_SHAPES=dynamic``: symbolic channels and map sizes).

Each mode runs in its own process with fresh, empty Inductor and Triton caches (a fresh machine), through the
tail exactly as the blocks call it (``SLaK._run_tail``): a training forward and backward per stage, then one
evaluation forward per stage. Prints, per mode, the graphs compiled, the seconds of the training pass and of the
evaluation pass, and the largest difference of the outputs from the eager tail (the same maths).

    python benchmarks/tail_compile_time.py                               # CPU, Inductor's C++ backend, batch 2
    python benchmarks/tail_compile_time.py --device cuda --batch 128 --dtype bfloat16   # the training shapes
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLAK_T_WIDTHS = (124, 249, 499, 998)  # SLaK-T's stage widths (96 x 1.3 ...)
SLAK_T_SIDES = (56, 28, 14, 7)  # at 224 px


def one_mode(args: argparse.Namespace) -> dict:
    """Compile and run the tail for every stage in this process (the mode comes from SLAK_TAIL_SHAPES)."""
    sys.path.insert(0, ROOT)
    import torch
    import SLaK
    SLaK.Block.COMPILE_TAIL = True
    graphs = []
    if args.backend == 'count':
        def backend(gm, example_inputs):
            graphs.append(1)
            return gm.forward
        SLaK.TAIL_BACKEND = backend
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    autocast = dict(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)
    torch.manual_seed(0)
    scale = args.width_scale
    stages = []
    for width, side in zip(SLAK_T_WIDTHS, SLAK_T_SIDES):
        c, h = max(2, int(width * scale)), max(2, int(side * scale))
        params = [torch.randn(c, device=device), torch.randn(c, device=device),
                  torch.randn(4 * c, c, device=device) * c ** -0.5, torch.randn(4 * c, device=device),
                  torch.randn(c, 4 * c, device=device) * (4 * c) ** -0.5, torch.randn(c, device=device),
                  torch.full((c,), 0.5, device=device)]
        stages.append((c, h, [p.requires_grad_() for p in params]))

    def call(c, h, params, batch, train):
        part = torch.randn(batch, c, h, h, device=device).to(dtype if autocast['enabled'] else torch.float32)
        shortcut = torch.randn(batch, c, h, h, device=device)
        drop = torch.ones(batch, 1, 1, 1, device=device) if train else None
        if train:
            part.requires_grad_()
            shortcut.requires_grad_()
        args_ = ([part], None, shortcut, *params, drop, 1e-6)  # (params: ln_w, ln_b, w1, b1, w2, b2, gamma)
        with torch.autocast(**autocast):
            out = SLaK._run_tail(*args_)
            with torch.no_grad():
                ref = SLaK._block_tail(*args_)
        return out, ref

    report = {'mode': SLaK.TAIL_SHAPES, 'device': str(device), 'batch': args.batch, 'dtype': args.dtype}
    start, diff = time.time(), 0.0
    for c, h, params in stages:
        out, ref = call(c, h, params, args.batch, True)
        out.float().square().mean().backward()
        diff = max(diff, (out.detach().float() - ref.float()).abs().max().item())
    if device.type == 'cuda':
        torch.cuda.synchronize()
    report['train_s'], report['train_graphs'] = time.time() - start, len(SLaK._TAIL_STATE['keys'])
    start = time.time()
    with torch.no_grad():
        for c, h, params in stages:
            out, ref = call(c, h, params, max(2, args.batch // 2 * 3), False)
            diff = max(diff, (out.float() - ref.float()).abs().max().item())
    if device.type == 'cuda':
        torch.cuda.synchronize()
    report['eval_s'] = time.time() - start
    report['graphs'] = len(SLaK._TAIL_STATE['keys'])
    report['max_abs_diff'] = diff
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16', 'float16'])
    parser.add_argument('--width_scale', type=float, default=None,
                        help='scale the channels and map sides (default: 1 on CUDA, 0.15 on CPU)')
    parser.add_argument('--backend', default='inductor', choices=['inductor', 'count'],
                        help="'count' traces without generating code (graph counts only)")
    parser.add_argument('--modes', default='static,dynamic')
    parser.add_argument('--json', default='', help='also write the reports here')
    parser.add_argument('--one', action='store_true', help=argparse.SUPPRESS)  # (the child process)
    args = parser.parse_args()
    if args.width_scale is None:
        args.width_scale = 1.0 if args.device.startswith('cuda') else 0.15
    if args.one:
        print(json.dumps(one_mode(args)), flush=True)
        return
    reports = []
    for mode in args.modes.split(','):
        with tempfile.TemporaryDirectory(prefix='tail_compile_') as cache:
            env = dict(os.environ, SLAK_TAIL_SHAPES=mode, TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, 'inductor'),
                       TRITON_CACHE_DIR=os.path.join(cache, 'triton'))
            cmd = [sys.executable, os.path.abspath(__file__), '--one', '--device', args.device, '--batch',
                   str(args.batch), '--dtype', args.dtype, '--width_scale', str(args.width_scale), '--backend',
                   args.backend]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
            line = next((ln for ln in reversed(out.stdout.splitlines()) if ln.startswith('{')), None)
            if out.returncode or line is None:
                print(f'{mode}: failed (exit {out.returncode}): {out.stderr.strip().splitlines()[-1:]}')
                continue
            report = json.loads(line)
            reports.append(report)
            print(f'{mode:8s} graphs {report["graphs"]} (training {report["train_graphs"]}): training pass '
                  f'{report["train_s"]:.1f} s, evaluation pass {report["eval_s"]:.1f} s, max |compiled - eager| '
                  f'{report["max_abs_diff"]:.2e}', flush=True)
    if args.json:
        with open(args.json, 'w', encoding='utf-8') as f:
            json.dump(reports, f, indent=1)


if __name__ == '__main__':
    main()
