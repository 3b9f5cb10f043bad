"""Check utils.SyncBatchNormWithoutHostSync against torch.nn.SyncBatchNorm on several GPUs (NCCL).

    torchrun --nproc_per_node=2 benchmarks/check_syncbn.py

Each rank draws its own input; both modules start from the same parameters and running statistics. Compares the
output, the input/weight/bias gradients and the running statistics after two training steps, in float32 and under
bf16 autocast, NCHW and channels_last; prints the largest relative error per case (rank 0). Then the same for a
block's fused branch sum (``utils.sync_batch_norm_sum`` over three BNs, one collective per pass) against the sum of
three ``nn.SyncBatchNorm`` outputs. Last, a SLaK block with our convs, converted to SyncBN, which runs its branch
BNs through the Triton kernels of ``cutlass/branch_bn_triton.py`` (one all-gather forward, one all-reduce backward),
against the ``nn.Conv2d`` block with ``nn.SyncBatchNorm`` (unequal batches per rank; TF32 off on both sides).
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import utils  # noqa: E402
import SLaK  # noqa: E402


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def main():
    dist.init_process_group('nccl')
    rank = dist.get_rank()
    torch.cuda.set_device(rank)
    worst = 0.0
    for dtype in (torch.float32, torch.bfloat16):
        for channels_last in (False, True):
            torch.manual_seed(0)
            ref = torch.nn.SyncBatchNorm(24).cuda()
            with torch.no_grad():
                ref.weight.uniform_(0.5, 1.5)
                ref.bias.normal_()
            ours = utils.convert_sync_batchnorm(torch.nn.BatchNorm2d(24)).cuda()
            ours.load_state_dict(ref.state_dict())
            errors = []
            for step in range(2):
                torch.manual_seed(100 + 10 * rank + step)
                x = torch.randn(8, 24, 13, 11, device='cuda') * 3 + 1
                g = torch.randn(8, 24, 13, 11, device='cuda')
                if channels_last:
                    x, g = x.to(memory_format=torch.channels_last), g.to(memory_format=torch.channels_last)
                outs = []
                for module in (ref, ours):
                    xi = x.clone().requires_grad_(True)
                    with torch.autocast('cuda', dtype=dtype, enabled=dtype != torch.float32):
                        y = module(xi.to(dtype) if dtype != torch.float32 else xi)
                    (y.float() * g).sum().backward()
                    outs.append((y, xi.grad, module.weight.grad.clone(), module.bias.grad.clone()))
                    module.zero_grad()
                errors += [rel(a, b) for a, b in zip(outs[1], outs[0])]
            errors += [rel(ours.running_mean, ref.running_mean), rel(ours.running_var, ref.running_var)]
            assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 2
            worst = max(worst, max(errors))
            if rank == 0:
                print(f'{str(dtype):15s} channels_last={channels_last!s:5s} max rel error {max(errors):.2e}')
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        refs = [torch.nn.SyncBatchNorm(24).cuda() for _ in range(3)]
        for ref in refs:
            with torch.no_grad():
                ref.weight.uniform_(0.5, 1.5)
                ref.bias.normal_()
        ours = [utils.convert_sync_batchnorm(torch.nn.BatchNorm2d(24)).cuda() for _ in range(3)]
        for a, b in zip(ours, refs):
            a.load_state_dict(b.state_dict())
        errors = []
        for step in range(2):
            torch.manual_seed(100 + 10 * rank + step)
            xs = [torch.randn(8, 24, 13, 11, device='cuda') * (i + 1) + i for i in range(3)]
            g = torch.randn(8, 24, 13, 11, device='cuda')
            outs = []
            for fused, modules in ((False, refs), (True, ours)):
                xis = [x.clone().requires_grad_(True) for x in xs]
                with torch.autocast('cuda', dtype=dtype, enabled=dtype != torch.float32):
                    inputs = [xi.to(dtype) for xi in xis]
                    y = (utils.sync_batch_norm_sum(inputs, modules) if fused
                         else sum(m(xi) for m, xi in zip(modules, inputs)))
                (y.float() * g).sum().backward()
                outs.append([y] + [xi.grad for xi in xis] + [m.weight.grad.clone() for m in modules]
                            + [m.bias.grad.clone() for m in modules])
                for m in modules:
                    m.zero_grad()
            errors += [rel(a, b) for a, b in zip(outs[1], outs[0])]
        for a, b in zip(ours, refs):
            errors += [rel(a.running_mean, b.running_mean), rel(a.running_var, b.running_var)]
            assert int(a.num_batches_tracked) == int(b.num_batches_tracked) == 2
        worst = max(worst, max(errors))
        if rank == 0:
            print(f'fused sum of 3 {str(dtype):15s} max rel error {max(errors):.2e}')
    worst = max(worst, check_triton_block(rank))
    if rank == 0:
        print('SYNCBN_CHECK', 'OK' if worst < (2e-2) else 'FAIL', f'{worst:.2e}')
    dist.destroy_process_group()


def check_triton_block(rank):
    """The Triton branch-BN path under SyncBN against nn.Conv2d + nn.SyncBatchNorm; returns the largest error."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    fast = SLaK._load_fast_dwconv() and sys.modules[SLaK._DWCONV_MODULE_NAME]
    torch.manual_seed(0)
    ours = SLaK.ReparamLargeKernelConv(32, 32, 31, 1, 32, 5, Decom=True, conv_impl='cutlass').cuda()
    ref = SLaK.ReparamLargeKernelConv(32, 32, 31, 1, 32, 5, Decom=True, conv_impl='torch').cuda()
    ref.load_state_dict(ours.state_dict())
    ours = utils.convert_sync_batchnorm(ours).train()
    ref = torch.nn.SyncBatchNorm.convert_sync_batchnorm(ref).train()
    calls = []
    original = fast._bn_kernels.BranchBatchNormSum.apply
    fast._bn_kernels.BranchBatchNormSum.apply = lambda *a: calls.append(a[4]) or original(*a)
    errors = []
    for step in range(2):
        torch.manual_seed(200 + 10 * rank + step)
        batch = 6 if rank == 0 else 8
        x = torch.randn(batch, 32, 20, 18, device='cuda') * 2 + 1
        g = torch.randn(batch, 32, 20, 18, device='cuda')
        outs = []
        for module in (ours, ref):
            xi = x.clone().requires_grad_(True)
            y = module(xi)
            (y * g).sum().backward()
            outs.append([y, xi.grad] + [p.grad.clone() for p in module.parameters()])
            module.zero_grad()
        errors += [rel(a, b) for a, b in zip(*outs)]
    fast._bn_kernels.BranchBatchNormSum.apply = original
    for (k, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        if 'running' in k:
            errors.append(rel(a, b))
    assert calls == [dist.get_world_size()] * 2, calls
    if rank == 0:
        print(f'SLaK block, Triton branch BNs under SyncBN vs nn.SyncBatchNorm: max rel error {max(errors):.2e}')
    return max(errors)


if __name__ == '__main__':
    main()
