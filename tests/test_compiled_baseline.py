"""benchmarks/compiled_baseline.py: issue 20's record composed from the device call's pieces, and its verdicts."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'benchmarks'))

import compiled_baseline as cb  # noqa: E402


@pytest.fixture
def make_switches(monkeypatch):
    """bench_throughput.make() sets process-wide switches (most names: to their defaults); they are put back after
    the test whatever they were. Returns the fast-kernel module (None without it)."""
    import SLaK
    for owner, name in ((SLaK.Block, 'PAD_POINTWISE'), (SLaK.Block, 'COMPILE_TAIL'), (SLaK, 'SHARE_AUTOCAST_CAST'),
                        (SLaK, 'POINTWISE_PAD_MULTIPLE'), (SLaK.LayerNorm, 'FUSED_CHANNELS_FIRST')):
        monkeypatch.setattr(owner, name, getattr(owner, name))
    fast = SLaK._load_fast_dwconv() and sys.modules[SLaK._DWCONV_MODULE_NAME]
    if fast:
        for name in ('FUSED_BRANCH_BN', 'FUSED_FAN_IN', 'COMPILED_BRANCH_BN'):
            monkeypatch.setattr(fast, name, getattr(fast, name))
        if fast._kernels is not None:
            monkeypatch.setattr(fast._kernels, 'WGRAD_ALLJ', fast._kernels.WGRAD_ALLJ)
    return fast or None


def throughput(device, train_batch, rows):
    return {'device': device, 'graph': True, 'train_batch': train_batch, 'infer_batch': 128,
            'rows': {name: {'train_img_s': t, 'train_mem_gb': 1.0, 'infer_img_s': i, 'infer_mem_gb': 1.0}
                     for name, (t, i) in rows.items()}}


def test_record_ratios_and_verdicts(tmp_path):
    nan = float('nan')
    b64 = throughput('NVIDIA H100 80GB HBM3', 64, {cb.COMPILED: (3000.0, 14000.0), cb.SLAK: (1500.0, 4000.0)})
    b128 = throughput('NVIDIA H100 80GB HBM3', 128, {cb.COMPILED: (3700.0, 14700.0), cb.SLAK: (1300.0, 4500.0),
                                                      cb.FOLDED: (nan, 7500.0)})
    layers = {'card': 'H100_80GB_HBM3', 'layers': [{'layer': '124@56 51x5', 'ours_fb_ms': 1.0, 'cudnn_fb_ms': 9.0}],
              'min_speedup_fb_large_kernel': 9.0}
    paths = []
    for name, data in (('b64', b64), ('b128', b128), ('layers', layers)):
        paths.append(tmp_path / f'{name}.json')
        paths[-1].write_text(json.dumps(data))
    out = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'compiled_baseline.py'), '--b64', str(paths[0]),
                          '--b128', str(paths[1]), '--layers', str(paths[2]), '--out', str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout
    record = json.loads((tmp_path / 'compiled_baseline_H100_80GB_HBM3.json').read_text())
    assert record['train']['64'] == {'convnext_tiny_compiled': 3000.0, 'slak_t': 1500.0, 'ratio': 0.5,
                                     'slak_t_path': 'eager + compiled tails',
                                     'slak_t_paths': {'eager + compiled tails': 1500.0}}
    assert abs(record['train']['128']['ratio'] - 1300 / 3700) < 1e-12
    assert abs(record['infer_128']['ratio'] - 7500 / 14700) < 1e-12
    assert record['layers'][0]['layer'] == '124@56 51x5'
    lines = out.splitlines()
    assert lines[0].endswith('(target 0.45) met') and lines[1].endswith('(target 0.45) NOT met')
    assert lines[2].endswith('(target 0.5) met') and lines[3].endswith('(target 8.0) met')


def test_the_faster_of_slak_ts_paths_is_recorded_and_named():
    """Training: the whole-model compile where it is faster than eager + compiled tails (and the other way round);
    folded inference likewise; an unmeasured (NaN) path never wins."""
    nan = float('nan')
    compiled_slak, compiled_folded = cb.TRAIN_PATHS['whole-model torch.compile'], cb.FOLDED_PATHS[
        'whole-model torch.compile']
    b64 = throughput('NVIDIA H100 80GB HBM3', 64, {cb.COMPILED: (3300.0, nan), cb.SLAK: (1400.0, nan),
                                                    compiled_slak: (1540.0, nan)})
    b128 = throughput('NVIDIA H100 80GB HBM3', 128, {cb.COMPILED: (3700.0, 14000.0), cb.SLAK: (1500.0, 4400.0),
                                                      compiled_slak: (nan, 6100.0), cb.FOLDED: (nan, 5600.0),
                                                      compiled_folded: (nan, 7700.0)})
    record = cb.compose(b64, b128, {})
    assert record['train']['64']['slak_t'] == 1540.0 and record['train']['64']['ratio'] == 1540.0 / 3300.0
    assert record['train']['64']['slak_t_path'] == 'whole-model torch.compile'
    assert record['train']['64']['slak_t_paths'] == {'eager + compiled tails': 1400.0,
                                                     'whole-model torch.compile': 1540.0}
    assert record['train']['128']['slak_t'] == 1500.0 and record['train']['128']['slak_t_path'] == (
        'eager + compiled tails')
    assert record['infer_128']['slak_t_folded'] == 7700.0 and record['infer_128']['ratio'] == 0.55
    assert record['infer_128']['slak_t_folded_path'] == 'whole-model torch.compile'
    assert cb.TRAIN_PATHS['whole-model torch.compile'] == 'SLaK-T ours torch.compile'


def test_missing_pieces_are_not_measured_never_met():
    record = cb.compose({}, {'rows': {cb.COMPILED: {'train_img_s': float('nan')}}}, {})
    assert record['train']['128']['ratio'] is None and record['infer_128']['ratio'] is None
    assert all(line.endswith('NOT met') and 'not measured' in line for line in cb.verdicts(record))


def test_large_kernel_identity_ceiling_runs_through_the_compiled_tail(make_switches, monkeypatch):
    """Issue 20's "large_kernel=identity" ceiling (bench_throughput.make): its stand-in module gives the compiled
    tail the one part it asks for (it failed with AttributeError on the H100), and the block's output through the
    tail equals the plain path's: x + layer scale * MLP(LayerNorm(x))."""
    import torch

    import bench_throughput
    import SLaK
    model = bench_throughput.make('SLaK-T large_kernel=identity').eval()
    block = model.stages[3][0]
    assert type(block.large_kernel) is bench_throughput.IdentityLargeKernel
    torch.nn.init.normal_(block.gamma)  # (1e-6 would hide the MLP)
    x = torch.randn(2, block.pwconv1.in_features, 7, 7)
    monkeypatch.setattr(SLaK, 'TAIL_BACKEND', 'aot_eager')
    monkeypatch.setattr(SLaK.Block, 'COMPILE_TAIL', True)
    with torch.no_grad():
        through_tail = block(x)
        monkeypatch.setattr(SLaK.Block, 'COMPILE_TAIL', False)
        plain = block(x)
        y = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), block.norm.weight, block.norm.bias,
                                           block.norm.eps)
        mlp = block.pwconv2(torch.nn.functional.gelu(block.pwconv1(y)))
        expected = x + (block.gamma * mlp).permute(0, 3, 1, 2)
    assert torch.allclose(through_tail, plain, rtol=1e-5, atol=1e-5)
    assert torch.allclose(plain, expected, rtol=1e-5, atol=1e-5)


def test_dwconv_identity_ceiling_keeps_the_fused_branch_batch_norms(make_switches):
    """Issue 20's "dwconv=identity" ceiling: each branch conv is replaced by one that returns its input but is still
    of our conv class, so the block takes the fused branch-BN path (SLaK's class check before branch_bn_sum) as the
    real step does; the branch BNs then see x itself: the large-kernel module's output is the sum of the three BNs
    of x (checked in float64 against nn.BatchNorm2d's own forward)."""
    import torch

    import bench_throughput
    fast = make_switches
    model = bench_throughput.make('SLaK-T dwconv=identity')
    lk = model.stages[3][0].large_kernel
    convs = [getattr(lk, b).conv for b in ('LoRA1', 'LoRA2', 'small_conv')]
    if fast:
        assert all(isinstance(c, fast.DepthWiseConv2dImplicitGEMM) for c in convs)
    x = torch.randn(2, convs[0].in_channels, 7, 7, dtype=torch.float64)
    assert all(torch.equal(c(x), x) for c in convs)
    lk = lk.double().train()
    expected = sum(torch.nn.functional.batch_norm(x, None, None, getattr(lk, b).bn.weight, getattr(lk, b).bn.bias,
                                                  training=True, eps=getattr(lk, b).bn.eps)
                   for b in ('LoRA1', 'LoRA2', 'small_conv'))
    with torch.no_grad():
        assert torch.allclose(lk(x), expected, rtol=1e-10, atol=1e-10)


def test_profile_step_counts_kernels_not_the_spans_of_annotated_regions():
    """profile_step's split (issue 20): the GPU-side span of a ``record_function`` region (the optimizer's
    ``Optimizer.step#AdamW.step``) covers kernels that are counted on their own; it must not be added again, whether
    the profiler flags it as a user annotation or (older torch) only its name says so."""
    from types import SimpleNamespace
    import torch
    import profile_step
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [SimpleNamespace(name='Optimizer.step#AdamW.step', device_type=cuda, is_user_annotation=True),
              SimpleNamespace(name='Optimizer.zero_grad#AdamW.zero_grad', device_type=cuda),
              SimpleNamespace(name='my_region', device_type=cuda, is_user_annotation=True),
              SimpleNamespace(name='multi_tensor_apply_kernel', device_type=cuda, is_user_annotation=False),
              SimpleNamespace(name='dwconv_fwd_kernel', device_type=cuda),
              SimpleNamespace(name='aten::add', device_type=cpu, is_user_annotation=False)]
    assert [e.name for e in profile_step.device_kernels(events)] == ['multi_tensor_apply_kernel', 'dwconv_fwd_kernel']


def test_profile_step_names_the_host_ops_that_launched_each_kernel():
    """profile_step (issue 20: which op makes the step's 11 ms of elementwise kernels): each kernel's time is summed
    per chain of launching op and enclosing ops, from the profiler's CPU-op -> kernels link, up to ``depth`` ops."""
    from types import SimpleNamespace as NS
    import profile_step
    backward = NS(name='autograd::engine::evaluate_function: NativeLayerNormBackward0', cpu_parent=None, kernels=[])
    norm = NS(name='aten::native_layer_norm_backward', cpu_parent=backward, kernels=[])
    contiguous = NS(name='aten::contiguous', cpu_parent=norm, kernels=[])
    copy = NS(name='aten::copy_', cpu_parent=contiguous, kernels=[NS(name='direct_copy', duration=30.0)])
    copy2 = NS(name='aten::copy_', cpu_parent=contiguous, kernels=[NS(name='direct_copy', duration=12.0)])
    add = NS(name='aten::add_', cpu_parent=None, kernels=[NS(name='add_kernel', duration=5.0),
                                                         NS(name='direct_copy', duration=1.0)])
    got = profile_step.launchers([backward, norm, contiguous, copy, copy2, add], depth=3)
    assert {k: dict(v) for k, v in got.items()} == {
        'direct_copy': {'aten::copy_ < aten::contiguous < aten::native_layer_norm_backward': 42.0, 'aten::add_': 1.0},
        'add_kernel': {'aten::add_': 5.0}}


def test_profile_step_groups_kernels_by_what_they_do():
    """benchmarks/profile_step.py (issue 20's split of a step's GPU time): Inductor's generated kernels (the block
    tails; all of a compiled ConvNeXt-T but its GEMMs) form their own group ahead of the name patterns that would
    otherwise claim them (a fused layer norm is Inductor's, not ATen's), split by what their names say they fused;
    ours, cuBLAS and ATen's keep theirs."""
    import profile_step
    inductor = 'inductor-generated (tails; all of compiled ConvNeXt-T\'s)'
    expected = {
        'triton_per_fused_native_layer_norm_permute_0': f'{inductor}: with layer norm',
        'triton_red_fused__native_batch_norm_legit_functional_add_7': f'{inductor}: with batch norm',
        'triton_tem_fused_addmm_gelu_2': f'{inductor}: GEMM template',
        'triton_poi_fused_add_mul_3': f'{inductor}: other fused',
        'dwconv_fwd_banded_kernel': 'ours: dwconv',
        'bn_bwd_reduce_kernel': 'batch norm',
        'sm90_xmma_gemm_bf16bf16_bf16f32': 'gemm (pointwise/linear)',
        'void at::native::vectorized_elementwise_kernel<4>': 'elementwise/reduce',
        'void at::native::(anonymous namespace)::layer_norm_kernel': 'layer norm',
        'something_else': 'other',
    }
    assert {name: profile_step.group_of(name) for name in expected} == expected


NCU_CSV = '''==PROF== Connected to process 745 (/usr/bin/python3.12)
==PROF== Profiling "dwconv_fwd_kernel": 0%....50%....100% - 2 passes
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","dram__bytes_read.sum","dram__bytes_write.sum","gpu__time_duration.sum","launch__registers_per_thread","sm__warps_active.avg.pct_of_peak_sustained_active"
"","","","","","","","","","","","byte","byte","nsecond","register/thread","%"
"0","745","python3.12","127.0.0.1","dwconv_fwd_kernel","1","7","(128, 1, 1)","(56, 2, 124)","0","9.0","100,000,000","50,000,000","100,000","128","31.5"
"1","745","python3.12","127.0.0.1","void at::native::(anonymous namespace)::layer_norm_kernel<float, float>(int, float, const float *)","1","7","(256, 1, 1)","(4096, 1, 1)","0","9.0","30,000,000","30,000,000","30,000","40","80.0"
"2","745","python3.12","127.0.0.1","dwconv_wgrad_kernel","1","7","(128, 1, 1)","(124, 1, 1)","0","9.0","50,000,000","0","300,000","168","12.5"
'''


def test_ncu_step_parses_the_csv_and_finds_each_groups_memory_floor(tmp_path):
    """benchmarks/ncu_step.py report (issue 20's ncu evidence): ncu's raw CSV (its own and the program's lines
    before the header skipped, thousands separators and the units row read) gives per group the summed time, DRAM
    bytes, achieved bandwidth, the time those bytes take at the card's peak, and the time-weighted occupancy."""
    import ncu_step
    kernels = ncu_step.parse_csv(NCU_CSV)
    assert [k['name'][:12] for k in kernels] == ['dwconv_fwd_k', 'void at::nat', 'dwconv_wgrad']
    assert kernels[0][ncu_step.TIME] == 100e-6 and kernels[0][ncu_step.READ] == 1e8
    assert kernels[0]['grid'] == '(56, 2, 124)' and kernels[2][ncu_step.REGISTERS] == 168
    groups = ncu_step.summarise(kernels, peak_bytes_s=3e12)
    ours = groups['ours: dwconv']
    assert ours['kernels'] == 2 and abs(ours['seconds'] - 400e-6) < 1e-12 and ours['bytes'] == 2e8
    assert abs(ours['bytes_per_s'] - 2e8 / 400e-6) < 1 and abs(ours['floor_seconds'] - 2e8 / 3e12) < 1e-15
    assert abs(ours['occupancy_pct'] - (31.5 * 100 + 12.5 * 300) / 400) < 1e-9
    assert groups['layer norm']['bytes'] == 6e7
    assert ncu_step.short_name(kernels[1]['name']) == 'at::native::anon::layer_norm_kernel'
    path = tmp_path / 'ncu.csv'
    path.write_text(NCU_CSV)
    out = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'ncu_step.py'), 'report', str(path),
                          '--peak_tb_s', '3'], capture_output=True, text=True, check=True).stdout
    assert out.startswith('3 kernels, 0.43 ms serialised, 0.26 GB from/to DRAM (at 3.00 TB/s: 0.09 ms)')
    for bad, message in (('no header', 'no ncu CSV header'), (NCU_CSV.replace('"nsecond"', '"furlong"'), 'unit')):
        try:
            ncu_step.parse_csv(bad)
        except ValueError as e:
            assert message in str(e)
        else:
            raise AssertionError(f'{bad[:20]!r} was accepted')


def test_session_11_switches_follow_the_model_name(make_switches):
    """bench_throughput's A/B rows for session 11's changes: "original LN" runs the original's channels_first
    LayerNorm ops, "torch fan-in" PyTorch's ops for the block input's gradient; every other row has both new paths."""
    import bench_throughput
    import SLaK
    fast = make_switches
    for name, new_paths in (('SLaK-T ours original LN torch fan-in', False), ('SLaK-T ours', True)):
        bench_throughput.make(name)
        assert SLaK.LayerNorm.FUSED_CHANNELS_FIRST is new_paths
        if fast:
            assert fast.FUSED_FAN_IN is new_paths and fast.FUSED_BRANCH_BN is True
    # session 12: "per-column wgrad" the per-column weight-gradient kernel, for the whole-compiled model too
    for name, allj in (('SLaK-T ours per-column wgrad', False), ('SLaK-T ours torch.compile', True),
                       ('SLaK-T ours torch.compile per-column wgrad', False), ('SLaK-T ours', True)):
        bench_throughput.make(name)
        if fast and fast._kernels is not None:
            assert fast._kernels.WGRAD_ALLJ is allj
    # session 12: "op BN" runs the fused branch BNs as the registered op inside the whole-model compile
    for name, op in (('SLaK-T ours torch.compile op BN', True), ('SLaK-T ours torch.compile', False)):
        bench_throughput.make(name)
        if fast:
            assert fast.COMPILED_BRANCH_BN is op


def test_folded_compiled_row_folds_the_model_inside_the_compiled_wrapper(make_switches):
    """bench_throughput's "SLaK-T ours folded decomposed torch.compile" (issue 20's inference row for users who
    compile): make() wraps the model in torch.compile, and the benchmark's eval() + reparameterize() must reach the
    wrapped model, so that what gets compiled at the first call is the folded form (two convs per block, no BN)."""
    import bench_throughput
    model = bench_throughput.make('SLaK-T ours folded decomposed torch.compile')
    assert model is not model._orig_mod  # the torch.compile wrapper
    model.eval()
    model.reparameterize(decomposed=True)
    lk = model._orig_mod.stages[0][0].large_kernel
    assert hasattr(lk, 'lkb_decomposed') and not hasattr(lk, 'LoRA1') and not lk.training


def test_models_run_in_the_asked_order_and_unknown_names_are_refused():
    """--models sets the order (a device call cut short by its time limit loses the last names, so the script that
    calls it decides what comes first); a misspelt name is an error, not a silently missing row."""
    import argparse

    import bench_throughput
    parser = argparse.ArgumentParser()
    names = ['a', 'b torch.compile', 'c', 'd']
    assert bench_throughput.select_models(names, 'all', parser) == names
    assert bench_throughput.select_models(names, 'd,a,b torch.compile,a', parser) == ['d', 'a', 'b torch.compile']
    for bad in ('a,e', ''):
        with pytest.raises(SystemExit):
            bench_throughput.select_models(names, bad, parser)


def test_throughput_record_is_rewritten_whole_after_every_model(tmp_path, monkeypatch):
    """The JSON holds the medians of the models measured so far, and is replaced atomically (no temp file left)."""
    import argparse
    import json
    import math

    import torch

    import bench_throughput
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda *a: 'fake card')
    args = argparse.Namespace(graph=True, train_batch=64, infer_batch=0, repeats=3)
    samples = {'x': [(3.0, 1.0, float('nan'), float('nan')), (1.0, 2.0, float('nan'), float('nan')),
                     (2.0, 3.0, float('nan'), float('nan'))], 'y': []}
    path = tmp_path / 'throughput.json'
    bench_throughput.write_json(str(path), args, bench_throughput.medians(samples))
    record = json.loads(path.read_text())
    assert record['device'] == 'fake card' and record['train_batch'] == 64 and list(record['rows']) == ['x']
    row = record['rows']['x']
    assert (row['train_img_s'], row['train_mem_gb']) == (2.0, 2.0) and math.isnan(row['infer_img_s'])
    samples['y'].append((5.0, 1.0, 7.0, 1.0))
    bench_throughput.write_json(str(path), args, bench_throughput.medians(samples))
    assert list(json.loads(path.read_text())['rows']) == ['x', 'y']
    assert [p.name for p in tmp_path.iterdir()] == ['throughput.json']


def test_profile_step_inference_forward_is_an_evaluation_without_gradients_under_bf16_autocast():
    """profile_step --infer (issue 20: where folded inference's time goes) times what bench_throughput's inference
    rows time: the model in evaluation mode, no autograd graph, bf16 autocast (of the input's device), one forward
    of the batch."""
    import torch
    import profile_step
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append((self.training, torch.is_grad_enabled(), torch.is_autocast_enabled(x.device.type),
                         torch.get_autocast_dtype(x.device.type), tuple(x.shape)))
            return x

    model = Probe().train()
    step = profile_step.make_infer_step(model, 3, size=8, device='cpu')
    step()
    step()
    assert seen == [(False, False, True, torch.bfloat16, (3, 3, 8, 8))] * 2
