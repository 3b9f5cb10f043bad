"""Check utils.SyncBatchNormWithoutHostSync against torch.nn.SyncBatchNorm on several GPUs (NCCL).

    torchrun --nproc_per_node=2 benchmarks/check_syncbn.py

Each rank draws its own input; both modules start from the same parameters and running statistics. Compares the
output, the input/weight/bias gradients and the running statistics after two training steps, in float32 and under
bf16 autocast, NCHW and channels_last; prints the largest relative error per case (rank 0).
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import utils  # noqa: E402


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
    if rank == 0:
        print('SYNCBN_CHECK', 'OK' if worst < (2e-2) else 'FAIL', f'{worst:.2e}')
    dist.destroy_process_group()


if __name__ == '__main__':
    main()
