"""Where ``main.py``'s start-up goes: launch to the first training steps and the first evaluation, phase by phase,
cold (empty Inductor/Triton caches, a fresh machine) and warm (the caches of the cold run).

Issue 18 asks for the first training step <= 60 s after launch on a fresh machine and <= 15 s with warm caches.
This script runs ``main.py``'s own set-up functions in a child process per run (``--runs cold,warm``), with

* a wall-clock mark at every set-up phase (imports, ``init_run``, data, model, EMA, optimizer, masks (SNIP), MACs)
  and at every one of the first ``--steps`` training steps (the step's GPU work synchronised), then the first
  ``--eval_batches`` evaluation batches through ``main.inference_model`` (what every evaluation runs);
* a sampling profiler (a thread reading the main thread's stack every ``--interval_ms``) whose samples are grouped
  per phase: the functions with the most inclusive samples, and what share of the phase ran inside Dynamo, Inductor,
  Triton's compiler, our ``cutlass/`` kernels' Python, the data loader, cuDNN-calling modules, ...;
* counts and seconds of in-process Triton compiles (our kernels; Inductor compiles its own in worker processes) and
  Dynamo's compile-time table.

Run on a CUDA machine from the repository root, with main.py's flags after ``--``::

    python benchmarks/profile_startup.py --out /tmp/prof --cache_root /tmp/prof_caches -- \\
        --model SLaK_tiny --Decom true --sparse --width_factor 1.3 --kernel_size 51 49 47 13 5 ... \\
        --data_path /path/to/imagenet-like --batch_size 128 --use_amp true --amp_dtype bfloat16

Writes ``startup_<run>.json`` and prints a report per run. On CPU it runs too (the plain path; for its own test).
"""
from __future__ import annotations

import time

T_LAUNCH = time.time()  # before the heavy imports: "launch" is (nearly) the interpreter's start

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from collections import Counter, defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Dict, List, Optional  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# (category, predicate on a frame's file name and function name); a sample counts once per category on its stack
CATEGORIES = [
    ('imports', lambda f, n: n == '<module>' and not f.endswith('profile_startup.py')),
    ('dynamo', lambda f, n: '/torch/_dynamo/' in f),
    ('inductor', lambda f, n: '/torch/_inductor/' in f),
    ('aot_autograd', lambda f, n: '/torch/_functorch/' in f),
    ('triton compiler', lambda f, n: '/triton/compiler/' in f or '/triton/backends/' in f),
    ('triton runtime', lambda f, n: '/triton/runtime/' in f),
    ('cutlass/ (our kernels)', lambda f, n: '/cutlass/' in f),
    ('data loader', lambda f, n: '/torch/utils/data/' in f),
    ('autograd backward', lambda f, n: n in ('_engine_run_backward', 'backward') and '/torch/' in f),
    ('SNIP (sparse_core)', lambda f, n: f.endswith('sparse_core.py') and n in ('_snip_scores', 'init')),
    ('count_macs', lambda f, n: n == 'count_macs'),
    ('cuda init', lambda f, n: n == '_lazy_init' and '/torch/cuda/' in f),
]


class Sampler(threading.Thread):
    """Reads the main thread's Python stack every ``interval`` seconds; samples are filed under the current phase."""

    def __init__(self, interval: float):
        super().__init__(daemon=True)
        self.interval = interval
        self.main_id = threading.main_thread().ident
        self.phase = 'imports'
        self.samples: Dict[str, List[tuple]] = defaultdict(list)
        self.running = True

    def run(self) -> None:
        while self.running:
            frame = sys._current_frames().get(self.main_id)
            stack = []
            while frame is not None:
                stack.append((frame.f_code.co_filename, frame.f_code.co_name, frame.f_code.co_firstlineno))
                frame = frame.f_back
            self.samples[self.phase].append(tuple(stack))
            time.sleep(self.interval)

    def report(self, phase: str, top: int = 12) -> dict:
        samples = self.samples.get(phase, [])
        functions, leaves, categories = Counter(), Counter(), Counter()

        def label(frame: tuple) -> str:
            return f'{Path(frame[0]).parent.name}/{Path(frame[0]).name}:{frame[1]}'
        for stack in samples:
            functions.update({label(frame) for frame in stack})
            if stack:
                leaves[label(stack[0])] += 1
            categories.update({c for c, match in CATEGORIES for f, n, _ in stack if match(f, n)})
        n = max(len(samples), 1)
        # inclusive: the functions under which most of the phase ran, leaving out the frames above the phase
        # itself (in ~every sample)
        return {'samples': len(samples),
                'categories': {c: round(k / n, 3) for c, k in categories.most_common()},
                'top': [(name, round(k / n, 3)) for name, k in functions.most_common() if k < 0.97 * n][:top],
                'leaves': [(name, round(k / n, 3)) for name, k in leaves.most_common(top)]}


def child(args: argparse.Namespace, main_argv: List[str]) -> None:
    sampler = Sampler(args.interval_ms / 1000)
    sampler.start()
    marks: List[tuple] = [('imports', 0.0)]

    def mark(name: str) -> None:
        marks.append((name, time.time() - T_LAUNCH))
        sampler.phase = name

    sys.path.insert(0, str(ROOT))
    import torch
    import main as main_py
    import engine
    mark('parse args')

    triton_compiles = {'count': 0, 'seconds': 0.0}
    try:  # our kernels compile in this process; count them
        import triton.compiler.compiler as tcc
        original_compile = tcc.compile

        def counted_compile(*a, **k):
            start = time.time()
            try:
                return original_compile(*a, **k)
            finally:
                triton_compiles['count'] += 1
                triton_compiles['seconds'] += time.time() - start
        tcc.compile = counted_compile
        import triton.runtime.jit as tjit
        if getattr(tjit, 'compile', None) is original_compile:
            tjit.compile = counted_compile
    except ImportError:
        pass

    args_main = main_py.get_args_parser().parse_args(main_argv)
    main_py.check_args(args_main)
    mark('init_run')
    device, amp_dtype = main_py.init_run(args_main)
    if device.type == 'cuda':
        torch.cuda.init()
    mark('build_data')
    data = main_py.build_data(args_main)
    mark('build_model')
    model = main_py.build_model(args_main, args_main.model)
    mark('prepare_model')
    model = main_py.prepare_model(args_main, model, device)
    main_py.prefetch_snip_batch(args_main, data)
    warmer = main_py.start_cache_warming(args_main, model, device, amp_dtype)
    precompiler = main_py.start_kernel_precompile(args_main, model, device, amp_dtype)
    graph_warm_up = main_py.start_graph_warm_up(args_main, model, device, amp_dtype, precompiler)
    mark('build_ema')
    model_ema = main_py.build_ema(args_main, model)
    num_steps = main_py.steps_per_epoch(args_main, data)
    mark('optimizer')
    optimizer, loss_scaler, lr_values, wd_values = main_py.build_training_objects(args_main, model, max(num_steps, 1))
    criterion = main_py.build_criterion(args_main, data.mixup_fn)
    mark('masks (SNIP)')
    mask = main_py.build_mask(args_main, model, optimizer, data, num_steps, None, None, model_ema)
    mark('MACs')
    main_py.print_model_size(model, sum(p.numel() for p in model.parameters()), args_main.input_size,
                             sparse=mask is not None)
    if args_main.compile:
        model.compile()
    cache_warming = precompile = None
    if warmer is not None:
        mark('wait for cache warming')
        cache_warming = warmer.wait()
    if precompiler is not None:
        mark('wait for kernel precompile')
        precompile = precompiler.wait()
    graphs_ahead = None
    if graph_warm_up is not None:
        mark('wait for graph warm-up')
        graphs_ahead = graph_warm_up.wait()
    mark('CUDA-graph capture')  # (main.py's default for SLaK on one GPU; nothing where it does not apply)
    train_forward = main_py.graph_training_forward(args_main, model, device, amp_dtype)

    class Steps:
        """The training loader's first ``args.steps`` batches, a mark (GPU synchronised) before each."""

        def __init__(self, loader, n: int, label: str):
            self.loader, self.n, self.label = loader, n, label

        def __len__(self) -> int:
            return min(self.n, len(self.loader))

        def __iter__(self):
            for i, batch in enumerate(self.loader):
                if i >= self.n:
                    break
                if device.type == 'cuda':
                    torch.cuda.synchronize()
                mark(f'{self.label} {i}')
                yield batch
            if device.type == 'cuda':
                torch.cuda.synchronize()

    data.sampler_train.set_epoch(0)
    mark('train 0: loader start')
    engine.train_one_epoch(model, criterion, Steps(data.data_loader_train, args.steps, 'train'), optimizer, device,
                           0, loss_scaler, args_main.clip_grad, model_ema, data.mixup_fn, start_steps=0,
                           lr_schedule_values=lr_values, wd_schedule_values=wd_values,
                           num_training_steps_per_epoch=num_steps, update_freq=args_main.update_freq,
                           use_amp=args_main.use_amp, mask=mask, amp_dtype=amp_dtype, print_freq=10 ** 6,
                           train_forward=train_forward)
    mark('eval: folded copy')
    eval_model = main_py.inference_model(args_main, model_ema.ema if model_ema is not None else model)
    if data.data_loader_val is not None and args.eval_batches:
        mark('eval 0: loader start')
        engine.evaluate(Steps(data.data_loader_val, args.eval_batches, 'eval'), eval_model, device,
                        use_amp=args_main.use_amp, amp_dtype=amp_dtype)
    mark('end')
    sampler.running = False

    phases = [name for name, _ in marks]
    times = dict(marks)
    durations = {name: round(times[nxt] - times[name], 3) for name, nxt in zip(phases, phases[1:])}
    result = {'marks': [(name, round(t, 3)) for name, t in marks], 'durations': durations,
              'first_step_s': times.get('train 1', times.get('end')),  # the first step done = the second begins
              'triton_compiles_in_process': triton_compiles, 'cache_warming': cache_warming,
              'kernel_precompile': precompile, 'graph_warm_up': graphs_ahead,
              'profile': {name: sampler.report(name) for name in phases if name in sampler.samples}}
    try:
        import SLaK
        result['tail_graphs'] = len(SLaK._TAIL_STATE['keys'])
        result['dynamo_compile_times'] = torch._dynamo.utils.compile_times(repr='str', aggregate=True)
    except Exception as e:  # noqa: BLE001  (diagnostics only)
        result['dynamo_compile_times'] = f'unavailable: {e}'
    Path(args.result).write_text(json.dumps(result, indent=1))


def print_report(name: str, result: dict) -> None:
    print(f'\n==== {name}: first training step done {result["first_step_s"]:.1f} s after launch; tail graphs '
          f'{result.get("tail_graphs")}; Triton compiles in-process {result["triton_compiles_in_process"]}; '
          f'cache warming {result.get("cache_warming")}; kernel precompile {result.get("kernel_precompile")}; '
          f'graph warm-up {result.get("graph_warm_up")}')
    for phase, seconds in result['durations'].items():
        prof = result['profile'].get(phase, {})
        cats = ', '.join(f'{c} {share:.0%}' for c, share in list(prof.get('categories', {}).items())[:6])
        print(f'  {phase:24s} {seconds:7.2f} s   {cats}')
        if seconds >= 1.0:
            for fn, share in prof.get('top', [])[:8]:
                print(f'      {share:5.0%}  {fn}')
            print('      leaves: ' + ', '.join(f'{fn} {share:.0%}' for fn, share in prof.get('leaves', [])[:5]))
    if isinstance(result.get('dynamo_compile_times'), str):
        print(result['dynamo_compile_times'][:3000])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default='.', help='folder for startup_<run>.json')
    parser.add_argument('--runs', default='cold,warm',
                        help='cold (fresh caches), warm (reusing them); suffixes: _warmers (SLAK_WARM_CACHES=1: the '
                             'per-stage compile helpers, off by default), _graphs / _nowg (SLAK_WARM_GRAPHS=1 / 0: '
                             'the training tail graphs traced ahead in a background thread, on by default on CUDA '
                             'since session 14), _noprecompile '
                             '(SLAK_PRECOMPILE=0: without the parallel compile of the step\'s Triton kernels ahead '
                             'of it, on by default), e.g. cold_noprecompile, cold_graphs, warm_graphs')
    parser.add_argument('--cache_root', default='', help='Inductor/Triton caches (default: a temporary folder)')
    parser.add_argument('--steps', type=int, default=3, help='training steps to time')
    parser.add_argument('--eval_batches', type=int, default=2)
    parser.add_argument('--interval_ms', type=float, default=5.0)
    parser.add_argument('--timeout_s', type=float, default=300)
    parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--result', default='', help=argparse.SUPPRESS)
    argv = sys.argv[1:]
    main_argv = argv[argv.index('--') + 1:] if '--' in argv else []
    args = parser.parse_args(argv[:argv.index('--')] if '--' in argv else argv)
    if args.child:
        child(args, main_argv)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    caches = Path(args.cache_root) if args.cache_root else Path(
        __import__('tempfile').mkdtemp(prefix='profile_startup_'))
    for run in args.runs.split(','):
        if run.startswith('cold'):
            shutil.rmtree(caches, ignore_errors=True)
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(caches / 'inductor'),
                   TRITON_CACHE_DIR=str(caches / 'triton'), PYTHONUNBUFFERED='1')
        if '_graphs' in run or '_nowg' in run:
            env['SLAK_WARM_GRAPHS'] = '1' if '_graphs' in run else '0'
        env['SLAK_WARM_CACHES'] = '1' if '_warmers' in run else '0'
        env['SLAK_PRECOMPILE'] = '0' if '_noprecompile' in run else '1'
        result_path = out / f'startup_{run}.json'
        cmd = [sys.executable, __file__, '--child', '--result', str(result_path), '--steps', str(args.steps),
               '--eval_batches', str(args.eval_batches), '--interval_ms', str(args.interval_ms), '--', *main_argv]
        start = time.time()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=args.timeout_s, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        except subprocess.TimeoutExpired as e:  # report it and go on with the next run
            tail = (e.stdout or b'')[-4000:]
            print(f'==== {run}: still running after {args.timeout_s:.0f} s, stopped\n'
                  f'{tail.decode(errors="replace") if isinstance(tail, bytes) else tail}')
            continue
        if proc.returncode != 0 or not result_path.exists():
            print(f'==== {run}: exit code {proc.returncode} after {time.time() - start:.0f} s\n{proc.stdout[-4000:]}')
            continue
        print_report(run, json.loads(result_path.read_text()))
    if not args.cache_root:
        shutil.rmtree(caches, ignore_errors=True)


if __name__ == '__main__':
    main()
