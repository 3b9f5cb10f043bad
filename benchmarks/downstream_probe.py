"""What ``bench_downstream.py`` measures inside a framework training process that the frameworks do not log.

The benchmark's configs (the shipped ones plus a few lines, see ``bench_downstream.probe_config``) import this module
through ``custom_imports`` and add ``dict(type='DownstreamProbeHook', ...)`` to ``custom_hooks``. Before the run
the hook wraps the functions every NMS / RoIAlign of mmdet and mmcv ends in, to count their calls by the device of
their input (in the training process only: importing this module changes nothing):

* ``torchvision.ops.nms`` (also as ``torchvision.ops.boxes.nms``, which torchvision's ``batched_nms`` calls) and
  ``torchvision.ops.roi_align``, which ``segmentation/mmcv_ext_fallback.py`` and ``RoIAlign(use_torchvision=True)``
  import at every call;
* ``mmcv._ext.{nms, softnms, nms_match, roi_align_forward, roi_align_backward}`` (the stand-in or a compiled mmcv:
  ``mmcv.ops`` looks these up on the module at every call).

The registered ops themselves (``torch.ops.torchvision.*``) are left alone (replacing them breaks code that walks
the op namespaces, such as the ONNX exporter); the profiler table below shows them with their GPU time.

The hook records, after every training iteration, how many SLaK block-tail graphs are compiled so far
(``SLaK._TAIL_STATE['keys']``) and the seconds torch.compile has spent (dynamo's ``_compile.compile_inner``
timings: tracing plus Inductor's forward code generation; plus ``bw_compiler``'s: AOTAutograd compiles the backward
graph later, at its first backward call, outside those) and the ``@triton.jit`` kernels compiled so far with
their seconds (``count_triton_compiles``: our depthwise kernels specialise on map sizes); it runs ``torch.profiler``
over the training iterations ``profile_iters`` = [first, stop) and keeps the rows of box ops (with their GPU time:
a GPU kernel ran under the op) plus the top rows by GPU time. Everything is written as JSON to ``out_file`` after
the run (and at exit, should the run fail).
"""
from __future__ import annotations

import atexit
import collections
import json
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

__all__ = ['DownstreamProbeHook', 'box_op_calls', 'box_ops_on_gpu', 'tail_state']

MMCV_EXT_BOX_OPS = ('nms', 'softnms', 'nms_match', 'roi_align_forward', 'roi_align_backward')
_CALLS: Dict[str, int] = collections.Counter()  # 'op@device type' -> calls
_WRAPPED = set()


def _count_calls(name: str, fn):
    def counted(*args, **kwargs):
        tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
        _CALLS[f'{name}@{tensor.device.type if tensor is not None else "none"}'] += 1
        return fn(*args, **kwargs)
    counted.__name__ = getattr(fn, '__name__', name)
    return counted


def wrap_box_ops() -> List[str]:
    """Count calls of the box ops named in the module docstring from now on (idempotent); returns the wrapped names."""
    import torchvision.ops
    import torchvision.ops.boxes
    targets = [((torchvision.ops, torchvision.ops.boxes), 'torchvision.ops.nms', 'nms'),
               ((torchvision.ops,), 'torchvision.ops.roi_align', 'roi_align')]
    ext = sys.modules.get('mmcv._ext')
    if ext is not None:
        targets += [((ext,), f'mmcv._ext.{op}', op) for op in MMCV_EXT_BOX_OPS]
    for owners, name, attr in targets:
        if name in _WRAPPED or not hasattr(owners[0], attr):
            continue
        counted = _count_calls(name, getattr(owners[0], attr))
        for owner in owners:
            setattr(owner, attr, counted)
        _WRAPPED.add(name)
    return sorted(_WRAPPED)


def box_op_calls() -> Dict[str, int]:
    """Calls so far, keyed ``op@device type`` (e.g. ``torchvision.ops.nms@cuda``)."""
    return dict(_CALLS)


def box_ops_on_gpu(calls: Dict[str, int], expect_calls: bool) -> bool:
    """No box op ran off the GPU (and, with ``expect_calls``, some ran at all)."""
    off_gpu = sum(n for key, n in calls.items() if not key.endswith('@cuda'))
    return off_gpu == 0 and (sum(calls.values()) > 0 or not expect_calls)


def tail_state() -> Dict[str, object]:
    """The SLaK block tail's compile state: graphs compiled (signatures), whether the cap was hit or compiling broke."""
    state = getattr(sys.modules.get('SLaK'), '_TAIL_STATE', None)
    if state is None:
        return {'graphs': None}
    return {'graphs': len(state.get('keys', ())), 'cap_reached': bool(state.get('full_warned')),
            'broken': bool(state.get('broken'))}


def compile_seconds() -> Optional[float]:
    """Seconds torch.compile spent in this process so far (dynamo frames, including Inductor's code generation);
    None if this torch keeps no such timings."""
    try:
        from torch._dynamo.utils import compilation_time_metrics
    except ImportError:
        return None
    if '_compile.compile_inner' in compilation_time_metrics:  # (the backward graphs are compiled lazily, apart)
        return round(sum(float(sum(compilation_time_metrics.get(key, ())))
                         for key in ('_compile.compile_inner', 'compile_fx.<locals>.bw_compiler')), 3)
    return 0.0 if not compilation_time_metrics else None  # nothing compiled yet, or timings under another name


_TRITON = {'compiles': 0, 'seconds': 0.0}


def count_triton_compiles() -> bool:
    """From now on count the ``@triton.jit`` kernels compiled in this process (our depthwise / branch-BN kernels:
    a new map size can mean a new specialisation) and the seconds spent compiling them (idempotent; False if this
    Triton has no ``JITFunction._do_compile``). Inductor's own kernels compile elsewhere and are not counted."""
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        return False
    compile_fn = getattr(JITFunction, '_do_compile', None)
    if compile_fn is None:
        return False
    if getattr(compile_fn, '__slak_counted__', False):
        return True

    def counted(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return compile_fn(self, *args, **kwargs)
        finally:
            _TRITON['compiles'] += 1
            _TRITON['seconds'] += time.perf_counter() - start
    counted.__slak_counted__ = True
    JITFunction._do_compile = counted
    return True


def triton_compiles() -> Dict[str, float]:
    """``{'compiles', 'seconds'}`` counted by :func:`count_triton_compiles` so far."""
    return {'compiles': _TRITON['compiles'], 'seconds': round(_TRITON['seconds'], 3)}


def _profile_rows(prof, row_limit: int) -> Dict[str, object]:
    from torch.autograd.profiler_util import EventList

    def gpu_us(e) -> float:
        return float(getattr(e, 'device_time_total', None) or getattr(e, 'cuda_time_total', 0.) or 0.)

    averages = prof.key_averages()
    box = [e for e in averages if any(op in e.key.lower() for op in ('nms', 'roi_align', 'roi_pool'))]
    top = sorted(averages, key=gpu_us, reverse=True)[:row_limit]
    sort_by = 'device_time_total' if torch.cuda.is_available() else 'cpu_time_total'
    return {
        'box_ops': [{'name': e.key, 'calls': int(e.count), 'cpu_ms': e.cpu_time_total / 1e3, 'gpu_ms': gpu_us(e) / 1e3}
                    for e in box],
        'box_table': EventList(box).table(sort_by=sort_by, row_limit=-1) if box else '',
        'top_table': EventList(top).table(sort_by=sort_by, row_limit=row_limit) if top else '',
    }


@HOOKS.register_module()
class DownstreamProbeHook(Hook):
    """Records the figures of the module docstring; writes them to ``out_file`` (JSON) after the run.

    Args:
        out_file: where to write the JSON.
        profile_iters: ``[first, stop)`` training iterations (0-based) to run under ``torch.profiler``; empty: none.
        expect_box_ops: the model calls NMS / RoIAlign (detection): ``box_ops_on_gpu`` is False if none ran.
        row_limit: rows of the profiler's top table.
    """

    priority = 'LOW'  # after IterTimerHook and LoggerHook: the profiler's own cost lands outside timed iterations

    def __init__(self, out_file: str, profile_iters: Sequence[int] = (), expect_box_ops: bool = False,
                 row_limit: int = 15):
        if profile_iters and (len(profile_iters) != 2 or not 0 <= profile_iters[0] < profile_iters[1]):
            raise ValueError(f'profile_iters must be [first, stop) with 0 <= first < stop; got {profile_iters!r}')
        self.out_file = out_file
        self.profile_iters = tuple(profile_iters)
        self.expect_box_ops = expect_box_ops
        self.row_limit = row_limit
        self.record: Dict[str, object] = {'tail_graphs_by_iter': [], 'compile_s_by_iter': [], 'profile': None}
        self._profiler = None
        self._start = time.time()
        atexit.register(self.write)

    def before_run(self, runner) -> None:
        self.record['wrapped_ops'] = wrap_box_ops()  # mmcv._ext exists by now (the configs' custom_imports)
        self.record['triton_counted'] = count_triton_compiles()
        self.record['triton_by_iter'] = []
        fallback = sys.modules.get('mmcv._ext')
        self.record['mmcv_ext'] = 'stand-in' if getattr(fallback, '__slak_fallback__', False) else 'compiled'

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        if self.profile_iters and runner.iter == self.profile_iters[0]:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profiler = torch.profiler.profile(activities=activities)
            self._profiler.__enter__()

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        self.record['tail_graphs_by_iter'].append(tail_state()['graphs'])
        self.record['compile_s_by_iter'].append(compile_seconds())
        self.record.setdefault('triton_by_iter', []).append(triton_compiles())
        if self._profiler is not None and runner.iter + 1 >= self.profile_iters[1]:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._profiler.__exit__(None, None, None)
            self.record['profile'] = dict(_profile_rows(self._profiler, self.row_limit),
                                          iters=list(self.profile_iters))
            self._profiler = None
        self.write()  # every iteration: a run cut off by its time limit still leaves what it measured

    def after_run(self, runner) -> None:
        self.write()

    def write(self) -> None:
        calls = box_op_calls()
        self.record.update(box_op_calls=calls, box_ops_on_gpu=box_ops_on_gpu(calls, self.expect_box_ops),
                           tail=tail_state(), compile_s=compile_seconds(), triton=triton_compiles(),
                           seconds=round(time.time() - self._start, 1))
        os.makedirs(os.path.dirname(os.path.abspath(self.out_file)), exist_ok=True)
        with open(self.out_file, 'w') as f:
            json.dump(self.record, f, indent=1)
