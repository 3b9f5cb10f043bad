"""utils.SyncBatchNormWithoutHostSync and the fused branch sum (utils.sync_batch_norm_sum) against plain BatchNorm
over the whole (all-rank) batch, in float64: one process, and two CPU processes over gloo with unequal batches."""
import copy
import os
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from _gloo import finish_worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import utils  # noqa: E402
from SLaK import ReparamLargeKernelConv  # noqa: E402

CHANNELS = 6
BATCHES = (3, 5)  # rank 0 and rank 1: unequal, so the per-rank counts must weight the statistics


def make_block(seed: int = 0, Decom: bool = True, momentum=0.1) -> ReparamLargeKernelConv:
    """A block's large-kernel conv (tall, wide and small branches, each conv -> BN) with random BN state."""
    torch.manual_seed(seed)
    block = ReparamLargeKernelConv(CHANNELS, CHANNELS, 7, 1, CHANNELS, 3, Decom=Decom, conv_impl='torch')
    for m in block.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = momentum
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
    return block.double().train()


def data(seed: int, batch: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, CHANNELS, 9, 8, generator=gen, dtype=torch.float64) * 2 + 0.5
    return x, torch.randn(batch, CHANNELS, 9, 8, generator=gen, dtype=torch.float64)


def run(block, x, g):
    """Output, input gradient and every parameter gradient of sum(block(x) * g); gradients cleared after."""
    x = x.clone().requires_grad_(True)
    out = block(x)
    (out * g).sum().backward()
    grads = {n: p.grad.clone() for n, p in block.named_parameters()}
    block.zero_grad()
    return out.detach(), x.grad, grads


def bn_state(block):
    return {k: v for k, v in block.state_dict().items() if 'running' in k or 'num_batches' in k}


@pytest.mark.parametrize('Decom', [True, False])
@pytest.mark.parametrize('momentum', [0.1, None])
def test_fused_branch_sum_single_process_matches_plain_batchnorm(monkeypatch, Decom, momentum):
    """One process with the fused path forced on: same output, gradients and running statistics as the branches'
    own BatchNorms (momentum None = cumulative average), over two steps."""
    monkeypatch.setattr(utils.SyncBatchNormWithoutHostSync, 'FUSE_SINGLE_PROCESS', True)
    reference = make_block(Decom=Decom, momentum=momentum)
    fused = utils.convert_sync_batchnorm(copy.deepcopy(reference))
    calls = []
    original = utils._SyncBatchNormSumFunction.apply
    monkeypatch.setattr(utils._SyncBatchNormSumFunction, 'apply', lambda *a: calls.append(a[4]) or original(*a))
    for step in range(2):
        x, g = data(step, 4)
        for a, b in zip(run(fused, x, g)[:2], run(reference, x, g)[:2]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        grads_fused, grads_ref = run(fused, x, g)[2], run(reference, x, g)[2]
        assert grads_fused.keys() == grads_ref.keys()
        for name in grads_ref:
            torch.testing.assert_close(grads_fused[name], grads_ref[name], rtol=1e-10, atol=1e-10, msg=name)
    assert calls and set(calls) == {3 if Decom else 2}  # all branches in one call
    for k, v in bn_state(reference).items():
        torch.testing.assert_close(bn_state(fused)[k], v, rtol=1e-10, atol=1e-12, msg=k)


def test_fused_path_is_off_outside_training_and_without_process_group():
    """Eval mode and a single process without the benchmark switch keep the parent's (plain BatchNorm) forward."""
    block = utils.convert_sync_batchnorm(make_block())
    bn = block.LoRA1.bn
    x = torch.randn(2, CHANNELS, 5, 5, dtype=torch.float64)
    assert bn.sum_of_branches(x, [block.LoRA1, block.LoRA2]) is None
    block.eval()
    assert bn.sum_of_branches(x, [block.LoRA1, block.LoRA2]) is None


def _worker(rank, init_file, result_file, reference_file):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    try:
        block = utils.convert_sync_batchnorm(make_block())
        gathers, reduces = [], []
        original_gather, original_reduce = utils._all_gather_single, dist.all_reduce
        utils._all_gather_single = lambda *a, **k: gathers.append(1) or original_gather(*a, **k)
        dist.all_reduce = lambda *a, **k: reduces.append(1) or original_reduce(*a, **k)
        x, g = data(10 + rank, BATCHES[rank])
        out, grad_x, grads = run(block, x, g)
        dist.all_reduce = original_reduce
        for v in grads.values():  # summed over ranks = gradient of the sum of both ranks' losses
            dist.all_reduce(v)
        torch.save(dict(out=out, grad_x=grad_x, grads=grads, state=bn_state(block), gathers=len(gathers),
                        reduces=len(reduces)), result_file.format(rank))
        finish_worker()
    finally:
        dist.destroy_process_group()


def test_two_ranks_gloo_fused_sum_equals_batchnorm_over_the_whole_batch():
    """Two processes with 3 and 5 images: each rank's output and input gradient, the summed parameter gradients and
    the running statistics equal plain BatchNorm over all 8 images; one all-gather in the forward and one
    all-reduce in the backward for the block's three BNs."""
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, 'rank{}.pt')
        mp.spawn(_worker, args=(os.path.join(tmp, 'init'), result, None), nprocs=2, join=True)
        ranks = [torch.load(result.format(r)) for r in range(2)]
    reference = make_block()
    xs, gs = zip(*(data(10 + r, BATCHES[r]) for r in range(2)))
    out, grad_x, grads = run(reference, torch.cat(xs), torch.cat(gs))
    for r, start in ((0, 0), (1, BATCHES[0])):
        rows = slice(start, start + BATCHES[r])
        torch.testing.assert_close(ranks[r]['out'], out[rows], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ranks[r]['grad_x'], grad_x[rows], rtol=1e-10, atol=1e-10)
        assert ranks[r]['gathers'] == 1 and ranks[r]['reduces'] == 1
        for name, v in grads.items():
            torch.testing.assert_close(ranks[r]['grads'][name], v, rtol=1e-10, atol=1e-10, msg=name)
        for k, v in bn_state(reference).items():
            torch.testing.assert_close(ranks[r]['state'][k], v, rtol=1e-10, atol=1e-12, msg=k)



def _ddp_worker(rank, init_file, result_file):
    import argparse
    import main
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    try:
        model = make_block()
        ddp = main.wrap_ddp(argparse.Namespace(distributed=True, gpu=None), model, torch.device('cpu'))
        x, g = data(20 + rank, 2)
        (ddp(x) * g).sum().backward()
        grad = model.LoRA1.conv.weight.grad
        torch.save(dict(bucket_view=ddp.gradient_as_bucket_view, grad=grad.clone(),
                        # a bucket view shares its storage with the other gradients of its bucket
                        shares_storage=grad.untyped_storage().nbytes() > grad.numel() * grad.element_size()),
                   result_file.format(rank))
        finish_worker()
    finally:
        dist.destroy_process_group()


def test_wrap_ddp_uses_bucket_views_and_still_averages_gradients():
    """main.wrap_ddp on two gloo ranks: gradients are views of DDP's buckets and equal on both ranks."""
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, 'rank{}.pt')
        mp.spawn(_ddp_worker, args=(os.path.join(tmp, 'init'), result), nprocs=2, join=True)
        ranks = [torch.load(result.format(r)) for r in range(2)]
    assert all(r['bucket_view'] and r['shares_storage'] for r in ranks)
    torch.testing.assert_close(ranks[0]['grad'], ranks[1]['grad'], rtol=0, atol=0)


def test_ddp_options_skip_the_per_forward_buffer_broadcast_only_under_syncbn():
    """(DDP accepts SyncBatchNorm on GPU modules only, so this checks the options main.wrap_ddp passes.)"""
    import inspect
    import main
    plain, synced = main.ddp_options(make_block()), main.ddp_options(utils.convert_sync_batchnorm(make_block()))
    key = ('forward_sync_buffers' if 'forward_sync_buffers' in
           inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters else 'broadcast_buffers')
    assert plain == {'gradient_as_bucket_view': True, key: True}
    assert synced == {'gradient_as_bucket_view': True, key: False}
