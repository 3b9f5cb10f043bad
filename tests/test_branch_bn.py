"""cutlass/branch_bn_triton.py: a block's branch BatchNorms and their sum in fused Triton kernels, against
nn.BatchNorm2d in float64 (output, input/weight/bias gradients, running statistics), on CPU through Triton's
interpreter (a subprocess: TRITON_INTERPRET must be set before Triton is imported), and through SLaK's
ReparamLargeKernelConv. The same checks run on a GPU with ``python tests/test_branch_bn.py cuda``."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r'''
import copy, json, os, sys
import torch, torch.nn as nn
sys.path.insert(0, sys.argv[1])
import SLaK
fast = SLaK._load_fast_dwconv() and sys.modules[SLaK._DWCONV_MODULE_NAME]
K = fast._bn_kernels
device = sys.argv[2]
# exact fp32 convolutions on both sides (cuDNN and our kernels follow this switch), so the block comparison below
# measures the BatchNorm path and not TF32 rounding
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
results = {}

def bns_like(nb, C, seed):
    torch.manual_seed(seed)
    bns = [nn.BatchNorm2d(C) for _ in range(nb)]
    for bn in bns:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5); bn.bias.normal_(); bn.running_mean.normal_(); bn.running_var.uniform_(0.5, 2)
    return [bn.to(device) for bn in bns]

# 1. the Function against nn.BatchNorm2d in float64: 2 and 3 branches, fp32/bf16/fp16, means far from zero
for nb, dtype, shape in ((2, 'float32', (3, 5, 7, 6)), (3, 'float32', (2, 4, 9, 9)), (3, 'bfloat16', (3, 5, 7, 6)),
                         (2, 'float16', (2, 3, 5, 11)), (3, 'float32', (33, 2, 1, 3))):
    dt = getattr(torch, dtype)
    torch.manual_seed(1)
    ys = [(torch.randn(*shape, dtype=torch.float64) * (i + 1) + 3 * i + 10).to(device, dt).requires_grad_(True)
          for i in range(nb)]
    bns = bns_like(nb, shape[1], 2)
    ref_bns = [copy.deepcopy(bn).double() for bn in bns]
    g = torch.randn(*shape, dtype=torch.float64, device=device)
    out = K.BranchBatchNormSum.apply(1e-5, 0.1, nb, None, 1, *ys, *[b.weight for b in bns], *[b.bias for b in bns],
                                     *[b.running_mean for b in bns], *[b.running_var for b in bns])
    (out.double() * g).sum().backward()
    yr = [y.detach().double().requires_grad_(True) for y in ys]
    ref = sum(bn(y) for bn, y in zip(ref_bns, yr))
    (ref * g.to(dt).double()).sum().backward()  # the fused backward sees dy rounded to the output dtype
    errs = dict(out=rel(out, ref), dx=max(rel(a.grad, b.grad) for a, b in zip(ys, yr)),
                dw=max(rel(a.weight.grad, b.weight.grad) for a, b in zip(bns, ref_bns)),
                db=max(rel(a.bias.grad, b.bias.grad) for a, b in zip(bns, ref_bns)),
                running=max(max(rel(a.running_mean, b.running_mean), rel(a.running_var, b.running_var))
                            for a, b in zip(bns, ref_bns)))
    results[f'{nb}-{dtype}-{shape}'] = dict(errs, dtype=str(out.dtype))

# 2. through SLaK: the fast block (fused BN) against the nn.Conv2d block (plain BNs), two steps, NCHW and channels_last
for channels_last in (False, True):
    torch.manual_seed(0)
    fast_block = SLaK.ReparamLargeKernelConv(6, 6, 9, 1, 6, 3, Decom=True, conv_impl='cutlass').to(device)
    ref_block = SLaK.ReparamLargeKernelConv(6, 6, 9, 1, 6, 3, Decom=True, conv_impl='torch').to(device)
    ref_block.load_state_dict(fast_block.state_dict())
    calls = []
    original = K.BranchBatchNormSum.apply
    K.BranchBatchNormSum.apply = lambda *a: calls.append(a[2]) or original(*a)
    errs = []
    for step in range(2):
        x = torch.randn(2, 6, 11, 10, device=device) * 2 + 1
        g = torch.randn(2, 6, 11, 10, device=device)
        if channels_last:
            x, g = x.contiguous(memory_format=torch.channels_last), g.contiguous(memory_format=torch.channels_last)
        outs = []
        for block in (fast_block, ref_block):
            xi = x.clone().requires_grad_(True)
            y = block(xi)
            (y * g).sum().backward()
            outs.append([y, xi.grad] + [p.grad.clone() for p in block.parameters()])
            block.zero_grad()
        errs += [rel(a, b) for a, b in zip(*outs)]
        layout_kept = outs[0][0].is_contiguous(memory_format=torch.channels_last) == channels_last
    K.BranchBatchNormSum.apply = original
    state = [rel(a, b) for (k, a), b in zip(fast_block.state_dict().items(), ref_block.state_dict().values())
             if 'running' in k]
    tracked = [int(v) for k, v in fast_block.state_dict().items() if 'num_batches' in k]
    fast_block.eval(); ref_block.eval()
    x = torch.randn(2, 6, 11, 10, device=device)
    results[f'block-cl{channels_last}'] = dict(err=max(errs), running=max(state), tracked=tracked, calls=calls,
                                                layout_kept=layout_kept, eval=rel(fast_block(x), ref_block(x)))

# 3. cases the fused path declines (None, nothing computed)
block = SLaK.ReparamLargeKernelConv(4, 4, 7, 1, 4, 3, Decom=True, conv_impl='cutlass').to(device)
x = torch.randn(2, 4, 8, 8, device=device)
branches = [block.LoRA1, block.LoRA2, block.small_conv]
declined = {}
block.LoRA2.bn.momentum = None
declined['momentum None'] = fast.branch_bn_sum(x, branches) is None
block.LoRA2.bn.momentum = 0.1
block.eval()
declined['eval'] = fast.branch_bn_sum(x, branches) is None
block.train()
fast.FUSED_BRANCH_BN = False
declined['switched off'] = fast.branch_bn_sum(x, branches) is None
fast.FUSED_BRANCH_BN = True
declined['one value per channel'] = fast.branch_bn_sum(x[:1, :, :1, :1], branches) is None
from torch.utils.flop_counter import FlopCounterMode
with FlopCounterMode(display=False):  # the FLOP counter must see the plain BatchNorm modules
    declined['under a dispatch mode'] = fast.branch_bn_sum(x, branches) is None
declined['applies otherwise'] = fast.branch_bn_sum(x, branches) is not None
results['declined'] = declined

# 4. the launches block_launches finds on meta tensors (to compile them ahead) are those a real pass makes
def norm(launches):
    return [(getattr(k, 'fn', k).__name__, [str(a) if isinstance(a, torch.dtype) else a for a in args],
             sorted(kw.items())) for k, args, kw in launches]
seen = []
class Recorder:
    def __init__(self, kernel):
        self.kernel = kernel
    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            seen.append((self.kernel, tuple(a.dtype if isinstance(a, torch.Tensor) else a for a in args), kwargs))
            return self.kernel[grid](*args, **kwargs)
        return launch
real = {name: getattr(K, name) for name in K._KERNEL_NAMES}
for name, kernel in real.items():
    setattr(K, name, Recorder(kernel))
shape, nb, dt = (3, 5, 7, 6), 3, torch.bfloat16
ys = [torch.randn(*shape, device=device).to(dt).requires_grad_(True) for _ in range(nb)]
bns = bns_like(nb, shape[1], 3)
out = K.BranchBatchNormSum.apply(1e-5, 0.1, nb, None, 1, *ys, *[b.weight for b in bns], *[b.bias for b in bns],
                                 *[b.running_mean for b in bns], *[b.running_var for b in bns])
out.float().sum().backward()
for name, kernel in real.items():
    setattr(K, name, kernel)
sms = torch.cuda.get_device_properties(device).multi_processor_count if device == 'cuda' else None
planned = K.block_launches(fast._kernels._LaunchCapture, *shape, nb, dt, sms)
results['launches'] = dict(real=norm(seen), planned=norm(planned),
                           same_kernel_objects=[a[0] for a in seen] == [b[0] for b in planned])

# 5. the fan-in of a block input's gradients (fast.fan_in_sum, SLaK._FanOutCast): the same bits as PyTorch's ops
fan = {}
torch.manual_seed(5)
for nb in (1, 2, 3):
    for gdtype in (torch.bfloat16, torch.float16, torch.float32):
        for with_s in (False, True):
            gs = [torch.randn(3, 5, 7, 6, device=device).to(gdtype) for _ in range(nb)]
            short = torch.randn(3, 5, 7, 6, device=device) if with_s else None
            ref = gs[0].to(torch.float32, copy=True)
            for g in gs[1:]:
                ref.add_(g)
            if short is not None:
                ref.add_(short)
            got = fast.fan_in_sum(gs, short, torch.float32)
            fan[f'{nb}-{gdtype}-{with_s}'] = got is not None and got.dtype == torch.float32 and torch.equal(got, ref)
g3 = [torch.randn(2, 3, 4, 5, device=device).to(torch.bfloat16) for _ in range(3)]
fan['declines non-contiguous'] = fast.fan_in_sum([g3[0], g3[1].transpose(2, 3).contiguous().transpose(2, 3), g3[2]],
                                                 None, torch.float32) is None
fan['declines a missing gradient'] = fast.fan_in_sum([g3[0], None, g3[2]], None, torch.float32) is None
fast.FUSED_FAN_IN = False
fan['switched off'] = fast.fan_in_sum(g3, None, torch.float32) is None
fast.FUSED_FAN_IN = True
# through SLaK's blocks: training under bf16 autocast with the compiled tail (aot_eager), fused fan-in against
# PyTorch's ops: the same output, input gradient and parameter gradients, bit for bit; the kernel ran once per block
SLaK.Block.COMPILE_TAIL, SLaK.TAIL_BACKEND = True, 'aot_eager'
torch.manual_seed(6)
blocks = nn.Sequential(*[SLaK.Block(8, kernel_size=(7, 3), Decom=True, layer_scale_init_value=0.5,
                                    conv_impl='cutlass') for _ in range(2)]).to(device).train()
x = torch.randn(2, 8, 9, 8, device=device)
runs, fan_calls = {}, []
real_fan_in, real_fan_kernel = K.fan_in_sum, K.fan_in_kernel
K.fan_in_sum = lambda *a: fan_calls.append(1) or real_fan_in(*a)
seen = []  # (Recorder, section 4, appends here)
K.fan_in_kernel = Recorder(real_fan_kernel)
for fused in (True, False):
    fast.FUSED_FAN_IN = fused
    blocks.zero_grad()
    xi = x.clone().requires_grad_(True)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = blocks(xi)
    (y.float().square().sum() * 1e3).backward()
    runs[fused] = [y.detach(), xi.grad] + [p.grad.clone() for p in blocks.parameters()]
K.fan_in_sum, K.fan_in_kernel = real_fan_in, real_fan_kernel
fast.FUSED_FAN_IN = True
# what SLaK.precompile_step_kernels compiles ahead for these blocks is what the pass launched (once per block)
planned = K.fan_in_launches(fast._kernels._LaunchCapture, 2, 8, 9, 8, 3, torch.bfloat16)
fan['planned launch'] = len(seen) == 2 and norm(seen[:1]) == norm(seen[1:]) == norm(planned)
fan['blocks bit-identical'] = all(torch.equal(a, b) for a, b in zip(runs[True], runs[False]))
fan['kernel calls'] = len(fan_calls)
results['fan_in'] = fan
print(json.dumps(results))
'''

DIST_SCRIPT = r"""
import copy, json, os, sys
import torch, torch.nn as nn, torch.distributed as dist, torch.multiprocessing as mp
ROOT, TMP = sys.argv[1], sys.argv[2]
sys.path.insert(0, ROOT)
BATCHES = (3, 5)  # unequal per-rank batches: the per-rank counts must weight the statistics


def worker(rank):
    import SLaK, utils
    fast = SLaK._load_fast_dwconv() and sys.modules[SLaK._DWCONV_MODULE_NAME]
    K = fast._bn_kernels
    dist.init_process_group('gloo', init_method='file://' + os.path.join(TMP, 'rdzv'), rank=rank, world_size=2)
    rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
    lo, hi = sum(BATCHES[:rank]), sum(BATCHES[:rank + 1])
    res = {}
    # 1. the Function over two ranks against float64 BatchNorm over the whole batch of 8 images
    torch.manual_seed(0)
    shape = (sum(BATCHES), 5, 4, 6)
    full = [torch.randn(*shape, dtype=torch.float64) * (i + 1) + 3 * i + 10 for i in range(3)]
    g = torch.randn(*shape, dtype=torch.float64)
    bns = [nn.BatchNorm2d(5) for _ in range(3)]
    for bn in bns:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5); bn.bias.normal_(); bn.running_mean.normal_(); bn.running_var.uniform_(0.5, 2)
    ref_bns = [copy.deepcopy(bn).double() for bn in bns]
    ys = [f[lo:hi].float().requires_grad_(True) for f in full]
    out = K.BranchBatchNormSum.apply(1e-5, 0.1, 3, dist.group.WORLD, 2, *ys, *[b.weight for b in bns],
                                     *[b.bias for b in bns], *[b.running_mean for b in bns],
                                     *[b.running_var for b in bns])
    (out.double() * g[lo:hi]).sum().backward()
    yr = [f.clone().requires_grad_(True) for f in full]
    ref = sum(bn(y) for bn, y in zip(ref_bns, yr))
    (ref * g).sum().backward()
    gw = torch.stack([b.weight.grad for b in bns]); gb = torch.stack([b.bias.grad for b in bns])
    local_gw = gw.clone()
    dist.all_reduce(gw); dist.all_reduce(gb)  # each rank holds its own share, as nn.SyncBatchNorm's gradients
    res['function'] = dict(
        out=rel(out, ref[lo:hi]), dx=max(rel(a.grad, b.grad[lo:hi]) for a, b in zip(ys, yr)),
        dw=rel(gw, torch.stack([b.weight.grad for b in ref_bns])),
        db=rel(gb, torch.stack([b.bias.grad for b in ref_bns])),
        dw_local_share=rel(local_gw, gw) > 0.05,  # not the global sum: DDP averages it over ranks afterwards
        running=max(max(rel(a.running_mean, b.running_mean), rel(a.running_var, b.running_var))
                    for a, b in zip(bns, ref_bns)))
    # 2. a SLaK block with SyncBN over two ranks: the Triton path (one call per pass) against PyTorch's kernels
    outs = {}
    for use_fast in (True, False):
        fast.FUSED_BRANCH_BN = use_fast
        torch.manual_seed(1)
        block = SLaK.ReparamLargeKernelConv(6, 6, 9, 1, 6, 3, Decom=True, conv_impl='cutlass')
        block = utils.convert_sync_batchnorm(block).train()
        calls = []
        original = K.BranchBatchNormSum.apply
        K.BranchBatchNormSum.apply = lambda *a: calls.append(a[4]) or original(*a)
        torch.manual_seed(2)
        x = torch.randn(8, 6, 7, 8) * 2 + 1
        gy = torch.randn(8, 6, 7, 8)
        xi = x[lo:hi].clone().requires_grad_(True)
        y = block(xi)
        (y * gy[lo:hi]).sum().backward()
        K.BranchBatchNormSum.apply = original
        outs[use_fast] = [y.detach(), xi.grad] + [p.grad.clone() for p in block.parameters()] + [
            v.clone() for k, v in block.state_dict().items() if 'running' in k]
        res[f'block_calls_fast{use_fast}'] = calls
    res['block_err'] = max(rel(a, b) for a, b in zip(outs[True], outs[False]))
    # 3. what block_launches plans for a rank of a 2-rank group (to compile ahead) is what a real pass launches
    seen = []
    real = {name: getattr(K, name) for name in K._KERNEL_NAMES}

    def recorder(kernel):
        return type('Rec', (), {'__getitem__': lambda self, grid: lambda *a, **kw: seen.append(
            (kernel, tuple(x.dtype if isinstance(x, torch.Tensor) else x for x in a), kw)) or kernel[grid](*a, **kw)})()

    for name, kernel in real.items():
        setattr(K, name, recorder(kernel))
    ys = [torch.randn(BATCHES[rank], 5, 4, 6).requires_grad_(True) for _ in range(3)]
    out = K.BranchBatchNormSum.apply(1e-5, 0.1, 3, dist.group.WORLD, 2, *ys, *[b.weight for b in bns],
                                     *[b.bias for b in bns], *[b.running_mean for b in bns],
                                     *[b.running_var for b in bns])
    out.sum().backward()
    for name, kernel in real.items():
        setattr(K, name, kernel)
    planned = K.block_launches(fast._kernels._LaunchCapture, BATCHES[rank], 5, 4, 6, 3, torch.float32, None, 2)
    res['launches_match'] = len(seen) == 6 and [(k, a, sorted(kw.items())) for k, a, kw in seen] == \
        [(k, a, sorted(kw.items())) for k, a, kw in planned]
    with open(os.path.join(TMP, f'rank{rank}.json'), 'w') as f:
        json.dump(res, f)
    sys.path.insert(0, os.path.join(ROOT, 'tests'))
    from _gloo import finish_worker
    finish_worker()


if __name__ == '__main__':
    mp.spawn(worker, nprocs=2)
    print(json.dumps([json.load(open(os.path.join(TMP, f'rank{r}.json'))) for r in range(2)]))
"""


def test_fused_branch_bn_across_two_ranks_matches_batchnorm_over_the_whole_batch(tmp_path):
    """SyncBN through the Triton kernels (gloo, two CPU processes, interpreter, batches of 3 and 5 images): output,
    input gradients, summed weight/bias gradients and running statistics against float64 BatchNorm over all 8
    images; a SLaK block converted to SyncBN takes this path (one call per pass, group size 2) and agrees with
    PyTorch's SyncBN kernels."""
    if torch.cuda.is_available():
        pytest.skip('interpreter check; on GPUs benchmarks/check_syncbn.py covers the NCCL path')
    pytest.importorskip('triton')
    script = tmp_path / 'dist_bn.py'
    script.write_text(DIST_SCRIPT)
    env = dict(os.environ, TRITON_INTERPRET='1')
    proc = subprocess.run([sys.executable, str(script), ROOT, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = json.loads(proc.stdout.strip().splitlines()[-1])
    for r in ranks:
        f = r['function']
        assert max(f['out'], f['dx'], f['dw'], f['db']) < 2e-6 and f['running'] < 1e-6, f
        assert f['dw_local_share'], f
        assert r['block_calls_fastTrue'] == [2] and r['block_calls_fastFalse'] == [], r
        assert r['launches_match'], r
        assert r['block_err'] < 1e-5, r


TOL = {'float32': 2e-6, 'bfloat16': 1e-2, 'float16': 2e-3}


def run_checks(device: str) -> dict:
    env = dict(os.environ)
    if device == 'cpu':
        env['TRITON_INTERPRET'] = '1'
    proc = subprocess.run([sys.executable, '-c', SCRIPT, ROOT, device], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check(r: dict) -> None:
    for key, v in r.items():
        if key.startswith(('2-', '3-')):
            dtype = key.split('-')[1]
            assert v['dtype'] == f'torch.{dtype}', (key, v)
            assert max(v['out'], v['dx'], v['dw'], v['db']) < TOL[dtype], (key, v)
            assert v['running'] < 1e-6, (key, v)  # fp32 statistics whatever the input dtype
    for cl in ('False', 'True'):
        b = r[f'block-cl{cl}']
        assert b['err'] < 1e-5 and b['running'] < 1e-6 and b['eval'] < 1e-5, b
        assert b['calls'] == [3, 3] and b['tracked'] == [2, 2, 2] and b['layout_kept'], b
    assert all(r['declined'].values()), r['declined']
    launches = r['launches']  # what is compiled ahead (SLaK.precompile_step_kernels) is what a pass launches
    assert len(launches['real']) == 6 and launches['planned'] == launches['real'], launches
    assert launches['same_kernel_objects'], launches
    fan = dict(r['fan_in'])
    assert fan.pop('kernel calls') == 2, r['fan_in']  # one fused fan-in per block
    assert all(fan.values()), r['fan_in']


@pytest.fixture(scope='module')
def interpreted():
    if torch.cuda.is_available():
        pytest.skip('interpreter checks run on CPU-only machines; on GPUs run `python tests/test_branch_bn.py cuda`')
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.skip('triton is not installed')
    return run_checks('cpu')


def test_fused_branch_bn_matches_batchnorm_in_float64(interpreted):
    check({k: v for k, v in interpreted.items() if k.startswith(('2-', '3-'))} | {
        k: interpreted[k] for k in ('block-clFalse', 'block-clTrue', 'declined', 'launches', 'fan_in')})


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
def test_fused_branch_bn_on_gpu():
    check(run_checks('cuda'))


if __name__ == '__main__':
    result = run_checks(sys.argv[1] if len(sys.argv) > 1 else 'cpu')
    print(json.dumps(result, indent=1))
    check(result)
    print('BRANCH_BN_CHECK OK')


COMPILE_SCRIPT = r"""
import json, sys, warnings
sys.path.insert(0, sys.argv[1])
import torch, timm
import SLaK
assert SLaK._load_fast_dwconv() is not None
dw = sys.modules[SLaK._DWCONV_MODULE_NAME]
assert dw._bn_kernels.OP_UNAVAILABLE is None, dw._bn_kernels.OP_UNAVAILABLE
dw._kernels = None  # the convs through F.conv2d (the interpreter's conv kernels cost 10 s here; their op under
warnings.simplefilter('ignore')  # torch.compile is tested in test_dwconv.py), the branch BNs through ours
x0 = torch.randn(2, 3, 32, 32)


def make():
    torch.manual_seed(0)
    return timm.create_model('SLaK_tiny', num_classes=5, depths=[1, 1, 1, 1], width_factor=0.1, drop_path_rate=0.,
                             kernel_size=[7, 5, 5, 3, 3], Decom=True, conv_impl='cutlass').train()


def step(model):
    x = x0.clone().requires_grad_()
    y = model(x)
    y.square().sum().backward()
    return y.detach(), x.grad


from torch._dynamo.backends.debugging import aot_eager
graphs, out = {}, {}
for name, switch, compiled in (('eager', True, False), ('True', True, True), ('False', False, False)):
    dw.COMPILED_BRANCH_BN = switch
    torch._dynamo.reset()
    m, seen = make(), []
    if name == 'False':  # the graph only: Inductor's input with the switch off
        torch.compile(m, backend=lambda gm, ex: seen.append(str(gm.graph)) or gm.forward, fullgraph=True)(x0)
    else:
        y, dx = step(torch.compile(m, backend=lambda gm, ex: seen.append(str(gm.graph)) or aot_eager(gm, ex),
                                   fullgraph=True) if compiled else m)
        out[name] = [y, dx] + [p.grad for p in m.parameters()] + [b for b in m.buffers()]
    if name != 'eager':
        graphs[name] = dict(ops=sum(g.count('slak.branch_bn_sum') for g in seen),
                            batch_norms=sum(g.count('batch_norm') for g in seen), graphs=len(seen))
diffs = [(a.double() - b.double()).abs().max().item() for a, b in zip(out['eager'], out['True'])]
bn_modules = sum(isinstance(mod, torch.nn.BatchNorm2d) for mod in make().modules())
print(json.dumps(dict(diffs=diffs, n=len(diffs), graphs=graphs, bn_modules=bn_modules)))
"""


def test_compiled_model_runs_the_fused_branch_bn_as_one_op_with_the_same_bits(tmp_path):
    """A SLaK model compiled as a whole (fullgraph, through AOT autograd) with ``SLAK_COMPILED_BRANCH_BN``: each
    block's branch BatchNorms + sum are one ``slak::branch_bn_sum`` op in the graph (no BatchNorm left), and the
    output, the input and every parameter gradient, the running statistics and num_batches_tracked equal the eager
    fused kernels' bit for bit (interpreter, CPU); with the switch off Inductor gets the plain BatchNorms."""
    pytest.importorskip('triton')
    env = dict(os.environ, TRITON_INTERPRET='1')
    proc = subprocess.run([sys.executable, '-c', COMPILE_SCRIPT, ROOT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r['n'] > 40 and max(r['diffs']) == 0.0, r
    blocks = 4  # depths [1, 1, 1, 1]: 2-3 branches each (stage 4's 3 x 3 kernel has no separate small branch)
    assert r['graphs']['True'] == {'ops': blocks, 'batch_norms': 0, 'graphs': 1}, r
    assert r['graphs']['False'] == {'ops': 0, 'batch_norms': r['bn_modules'], 'graphs': 1} and r['bn_modules'] > 8, r


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
def test_gpu_compiled_model_with_the_branch_bn_op_matches_eager():
    """On the GPU, through Inductor: SLaK compiled as a whole with ``COMPILED_BRANCH_BN`` (the fused branch BNs as
    one op) against the eager model's fused kernels, fp32: outputs, gradients and running statistics agree within
    fp32 reordering (Inductor fuses the rest of the block differently)."""
    sys.path.insert(0, ROOT)
    import timm
    import SLaK
    assert SLaK._load_fast_dwconv() is not None
    dw = sys.modules[SLaK._DWCONV_MODULE_NAME]
    x0 = torch.randn(4, 3, 64, 64, device='cuda')
    out = {}
    try:
        for name in ('eager', 'op'):
            dw.COMPILED_BRANCH_BN = True
            torch.manual_seed(0)
            m = timm.create_model('SLaK_tiny', num_classes=5, depths=[1, 1, 2, 1], width_factor=0.5,
                                  kernel_size=[13, 13, 13, 13, 5], Decom=True).cuda().train()
            f = torch.compile(m, fullgraph=True) if name == 'op' else m
            x = x0.clone().requires_grad_()
            y = f(x)
            y.square().sum().backward()
            out[name] = [y.detach(), x.grad] + [p.grad for p in m.parameters()] + [b.float() for b in m.buffers()]
    finally:
        dw.COMPILED_BRANCH_BN = False
    for a, b in zip(out['op'], out['eager']):
        assert ((a - b).norm() / b.norm().clamp_min(1e-12)).item() < 1e-4
