"""segmentation/: the SLaK backbone, the layer-decay optimizer constructor, the mmcv-lite stand-in, UperNet configs."""
from __future__ import annotations

import copy
import glob
import itertools
import os
import sys

import pytest
import torch

from mm_utils import TINY_BACKBONE, TINY_CHANNELS, config_path, require

require('mmseg')

import timm  # noqa: E402
from mmengine import Config, ConfigDict  # noqa: E402
from mmengine.model import revert_sync_batchnorm  # noqa: E402
from mmengine.optim import build_optim_wrapper  # noqa: E402
from mmengine.registry import PARAM_SCHEDULERS, init_default_scope  # noqa: E402
from mmengine.structures import PixelData  # noqa: E402

import segmentation.slak  # noqa: E402,F401  registers SLaK into mmseg
from mmseg.registry import MODELS  # noqa: E402
from mmseg.structures import SegDataSample  # noqa: E402
from optim_factory import get_num_layer_for_convnext  # noqa: E402
from segmentation import mmcv_ext_fallback  # noqa: E402
from segmentation.layer_decay_optimizer_constructor import LearningRateDecayOptimizerConstructor  # noqa: E402
from segmentation.slak_backbone import SLaK  # noqa: E402

SEG_CONFIGS = sorted(glob.glob(config_path('segmentation', 'configs', '*.py')))
NUM_CLASSES = 5


def _backbone(**kwargs) -> SLaK:
    cfg = dict(TINY_BACKBONE, Decom=True)
    cfg.update(kwargs)
    return SLaK(**cfg)


def _classification_state_dict(**kwargs) -> dict:
    """A state dict in main.py's layout (timm-registered SLaK with its classifier norm/head)."""
    cfg = dict(TINY_BACKBONE, Decom=True, num_classes=10)
    cfg.update(kwargs)
    return timm.create_model('SLaK_tiny', **cfg).state_dict()


# ---- backbone -----------------------------------------------------------------------------------------------------
def test_registered_class_is_the_shared_backbone():
    assert MODELS.get('SLaK') is SLaK
    assert issubclass(SLaK, sys.modules['SLaK'].SLaK)  # built on SLaK.py, not a copy
    names = [k for k, _ in _backbone().named_parameters()]
    assert not any(k.startswith(('norm.', 'head.')) for k in names)
    assert {k.split('.')[0] for k in names} == {'downsample_layers', 'stages', 'norm0', 'norm1', 'norm2', 'norm3'}


def test_feature_shapes_and_values_for_every_out_indices_subset():
    torch.manual_seed(0)
    full = _backbone().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = full(x)
        stages = full.forward_intermediates(x, intermediates_only=True)
    for i, feat in enumerate(reference):
        assert feat.shape == (2, TINY_CHANNELS[i], 64 // (4 * 2 ** i), 64 // (4 * 2 ** i))
        norm = getattr(full, f'norm{i}')  # channels_first LayerNorm, checked against F.layer_norm on NHWC
        expected = torch.nn.functional.layer_norm(stages[i].permute(0, 2, 3, 1), (TINY_CHANNELS[i],), norm.weight,
                                                  norm.bias, 1e-6).permute(0, 3, 1, 2)
        torch.testing.assert_close(feat, expected, rtol=1e-5, atol=1e-5)
    for r in range(1, 5):
        for subset in itertools.combinations(range(4), r):
            model = _backbone(out_indices=list(subset)).eval()
            model.load_state_dict(full.state_dict(), strict=False)
            with torch.no_grad():
                out = model(x)
            assert len(out) == len(subset)
            for i, feat in zip(subset, out):
                torch.testing.assert_close(feat, reference[i])


def test_lora_alias_kernel_default_and_bad_arguments():
    assert any('LoRA1' in k for k in SLaK(**dict(TINY_BACKBONE, LoRA=True)).state_dict())
    assert not any('LoRA1' in k for k in SLaK(**dict(TINY_BACKBONE, LoRA=False)).state_dict())
    with pytest.warns(UserWarning, match='kernel_size not given'):
        model = SLaK(width_factor=0.125, depths=[1, 1, 1, 1])
    assert model.kernel_size == [31, 29, 27, 13, 3]
    with pytest.raises(ValueError, match='Decom=True and LoRA=False'):
        _backbone(Decom=True, LoRA=False)
    with pytest.raises(ValueError, match='out_indices'):
        _backbone(out_indices=[0, 4])
    with pytest.raises(ValueError, match='kernel_size\\[1\\] = 6'):
        _backbone(kernel_size=[7, 6, 5, 5, 3])
    with pytest.raises(ValueError, match='pretrained and init_cfg'):
        _backbone(pretrained='a.pth', init_cfg=dict(type='Pretrained', checkpoint='a.pth'))


def test_frozen_stages_stay_frozen_and_in_eval_mode():
    model = _backbone(frozen_stages=1).train()
    for name, param in model.named_parameters():
        frozen = name.startswith(('downsample_layers.0.', 'downsample_layers.1.', 'stages.0.', 'stages.1.'))
        assert param.requires_grad != frozen, name
    assert not model.stages[1].training and not model.downsample_layers[0].training
    assert model.stages[2].training


def test_loads_main_py_checkpoint(tmp_path):
    sd = _classification_state_dict()
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}
    path = tmp_path / 'checkpoint-best.pth'
    # as main.py writes it ('args' as a plain dict; the original's argparse.Namespace is refused: test_safe_load.py)
    torch.save({'model': sd, 'model_ema': ema, 'epoch': 3, 'args': {'lr': 4e-3}}, path)
    model = _backbone(init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    missing, unexpected = model.load_classification_checkpoint(str(path))
    assert sorted(missing) == sorted(f'norm{i}.{p}' for i in range(4) for p in ('weight', 'bias'))
    assert sorted(unexpected) == ['head.bias', 'head.weight', 'norm.bias', 'norm.weight']
    own = model.state_dict()
    assert set(own) - set(missing) == set(sd) - set(unexpected)
    for k in set(own) - set(missing):
        assert torch.equal(own[k], sd[k]), k
    model = _backbone(init_cfg=dict(type='Pretrained', checkpoint=str(path), checkpoint_key='model_ema'))
    model.init_weights()
    assert torch.equal(model.state_dict()['stages.0.0.pwconv1.weight'], ema['stages.0.0.pwconv1.weight'])
    # DDP-prefixed raw state dict, and a whole segmentor checkpoint: only backbone.* keys are used.
    model = _backbone()
    model.load_classification_checkpoint({f'module.{k}': v for k, v in sd.items()})
    assert torch.equal(model.state_dict()['stages.2.0.gamma'], sd['stages.2.0.gamma'])
    segmentor = {f'backbone.{k}': v for k, v in ema.items()}
    segmentor['decode_head.conv_seg.weight'] = torch.zeros(3)
    model.load_classification_checkpoint({'state_dict': segmentor})
    assert torch.equal(model.state_dict()['stages.2.0.gamma'], ema['stages.2.0.gamma'])


def test_mismatched_checkpoints_name_the_key(tmp_path):
    path = tmp_path / 'ckpt.pth'
    torch.save({'model': _classification_state_dict(kernel_size=[9, 7, 5, 5, 3])}, path)
    with pytest.raises(ValueError, match=r'stages\.0\.0\.large_kernel\.LoRA1\.conv\.weight: checkpoint '
                                         r'\(12, 1, 9, 3\) vs backbone \(12, 1, 7, 3\)'):
        _backbone().load_classification_checkpoint(str(path))
    with pytest.raises(ValueError, match=r'downsample_layers\.0\.0\.weight: checkpoint \(24, 3, 4, 4\)'):
        _backbone().load_classification_checkpoint({'model': _classification_state_dict(width_factor=0.25)})
    with pytest.raises(ValueError, match=r'missing keys.*lkb_origin'):
        _backbone(Decom=False).load_classification_checkpoint({'model': _classification_state_dict()})
    with pytest.raises(ValueError, match='checkpoint file not found'):
        _backbone(init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'nope.pth'))).init_weights()
    with pytest.raises(ValueError, match='no "model_ema" entry'):
        _backbone().load_classification_checkpoint(str(path), checkpoint_key='model_ema')


def _sparse_state_dict() -> dict:
    torch.manual_seed(0)
    sd = _classification_state_dict()
    for k, v in sd.items():
        if v.dim() in (2, 4):
            v.mul_((torch.rand_like(v) > 0.5).to(v.dtype))
    return sd


@pytest.mark.parametrize('sparse', [True, False])
def test_sparse_checkpoint_keeps_its_zeros_under_adamw(sparse):
    sd = _sparse_state_dict()
    model = _backbone(sparse=sparse, drop_path_rate=0.)
    model.load_classification_checkpoint({'model': sd})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    for _ in range(2):
        loss = sum(f.square().mean() for f in model(torch.randn(2, 3, 32, 32)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    weight = model.stages[1][0].large_kernel.LoRA1.conv.weight
    was_zero = sd['stages.1.0.large_kernel.LoRA1.conv.weight'] == 0
    assert was_zero.any() and (~was_zero).any()
    if sparse:
        assert torch.all(weight[was_zero] == 0)
    else:  # control: without sparse=True the optimizer revives pruned weights
        assert torch.all(weight[was_zero] != 0)
    assert torch.all(weight[~was_zero] != sd['stages.1.0.large_kernel.LoRA1.conv.weight'][~was_zero])


def test_sparse_with_frozen_stages_and_a_second_checkpoint():
    """Frozen weights get no gradient hook (registering one on a frozen tensor crashed); loading another checkpoint
    replaces the previous hooks (a stale hook looked up a mask that no longer exists)."""
    sd = _sparse_state_dict()
    model = _backbone(sparse=True, drop_path_rate=0., frozen_stages=0)
    model.load_classification_checkpoint({'model': sd})
    key = 'stages.1.0.large_kernel.LoRA1.conv.weight'
    was_zero = sd[key] == 0

    def train_step():
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        loss = sum(f.square().mean() for f in model(torch.randn(2, 3, 32, 32)))
        loss.backward()
        optimizer.step()

    train_step()
    state = model.state_dict()
    assert torch.equal(state['stages.0.0.pwconv1.weight'], sd['stages.0.0.pwconv1.weight'])  # frozen
    assert torch.all(state[key][was_zero] == 0) and not torch.equal(state[key], sd[key])
    model.load_classification_checkpoint({'model': _classification_state_dict()})  # dense: no masks any more
    model.zero_grad()
    train_step()
    assert torch.all(model.state_dict()[key] != 0)


def test_sparse_without_checkpoint_warns_and_trains_dense():
    with pytest.warns(UserWarning, match='trains dense'):
        model = _backbone(sparse=True)
    model.init_weights()
    out = model(torch.randn(2, 3, 32, 32))
    sum(o.sum() for o in out).backward()
    assert model.stages[0][0].pwconv1.weight.grad.ne(0).all()


# ---- layer-decay constructor ----------------------------------------------------------------------------------------
class _Segmentor(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = _backbone(depths=[1, 1, 9, 1])
        self.decode_head = torch.nn.Conv2d(96, 3, 1)


def _groups(decay_type: str, num_layers: int, decay_rate: float, lr: float = 1e-3):
    model = _Segmentor()
    constructor = LearningRateDecayOptimizerConstructor(
        dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=lr, weight_decay=0.05)),
        dict(num_layers=num_layers, decay_rate=decay_rate, decay_type=decay_type))
    optimizer = constructor(model).optimizer
    by_name = {}
    for group in optimizer.param_groups:
        for name in group['param_names']:
            by_name[name] = group
    assert set(by_name) == {n for n, _ in model.named_parameters()}
    return model, by_name


def test_layer_wise_ids_follow_optim_factory_and_spec_table():
    model, groups = _groups('layer_wise', num_layers=6, decay_rate=0.7, lr=1e-3)
    for name, param in model.named_parameters():
        layer_id = get_num_layer_for_convnext(name[len('backbone.'):], num_max_layer=6) if name.startswith(
            'backbone.') else 7
        assert groups[name]['group_name'].startswith(f'layer_{layer_id}_'), name
        assert groups[name]['lr_scale'] == pytest.approx(0.7 ** (8 - layer_id - 1))
        assert groups[name]['lr'] == pytest.approx(1e-3 * groups[name]['lr_scale'])
        no_decay = param.ndim == 1 or name.endswith('.bias')
        assert groups[name]['weight_decay'] == (0. if no_decay else 0.05)
    # the original's rule, detection tiny (num_layers 6, rate 0.7): exponents written out by hand.
    expected = {'decode_head.weight': 0, 'backbone.norm3.weight': 0, 'backbone.stages.3.0.pwconv1.weight': 1,
                'backbone.downsample_layers.3.1.weight': 1, 'backbone.stages.2.8.pwconv1.weight': 2,
                'backbone.stages.2.3.pwconv1.weight': 3, 'backbone.stages.2.0.pwconv1.weight': 4,
                'backbone.downsample_layers.2.1.weight': 4, 'backbone.downsample_layers.1.1.weight': 5,
                'backbone.stages.1.0.pwconv1.weight': 5, 'backbone.stages.0.0.gamma': 6,
                'backbone.downsample_layers.0.0.weight': 7}
    for name, exponent in expected.items():
        assert groups[name]['lr_scale'] == pytest.approx(0.7 ** exponent), name


@pytest.mark.parametrize('num_layers', [6, 12])
def test_stage_wise_spec_table(num_layers):
    _, groups = _groups('stage_wise', num_layers=num_layers, decay_rate=0.9)
    top = num_layers + 1  # L - 1 with L = num_layers + 2
    expected = {'decode_head.weight': 0, 'backbone.norm2.bias': 0, 'backbone.stages.3.0.pwconv2.weight': top - 4,
                'backbone.stages.2.7.gamma': top - 3, 'backbone.stages.1.0.norm.weight': top - 2,
                'backbone.stages.0.0.large_kernel.small_conv.bn.weight': top - 1,
                'backbone.downsample_layers.2.0.weight': top, 'backbone.downsample_layers.0.0.bias': top}
    for name, exponent in expected.items():
        assert groups[name]['lr_scale'] == pytest.approx(0.9 ** exponent), name


def test_constructor_bad_config():
    with pytest.raises(ValueError, match='decay_type'):
        _groups('block_wise', num_layers=6, decay_rate=0.9)
    constructor = LearningRateDecayOptimizerConstructor(
        dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-3)), dict(decay_rate=0.9))
    with pytest.raises(ValueError, match='paramwise_cfg.num_layers'):
        constructor(_Segmentor())


# ---- configs: build, train step, predict ----------------------------------------------------------------------------
def _tiny_segmentor_cfg(path: str) -> Config:
    cfg = Config.fromfile(path)
    model = cfg.model
    model.backbone.update(TINY_BACKBONE)
    model.backbone.init_cfg = None
    model.backbone.sparse = False
    model.data_preprocessor.size = (64, 64)
    model.decode_head.update(in_channels=TINY_CHANNELS, channels=16, num_classes=NUM_CLASSES)
    model.auxiliary_head.update(in_channels=TINY_CHANNELS[2], channels=8, num_classes=NUM_CLASSES)
    model.test_cfg.update(crop_size=(64, 64), stride=(43, 43))
    return cfg


def _seg_batch(n: int = 2) -> dict:
    samples = []
    for _ in range(n):
        sample = SegDataSample()
        sample.gt_sem_seg = PixelData(data=torch.randint(0, NUM_CLASSES, (1, 64, 64)))
        sample.set_metainfo(dict(img_shape=(64, 64), ori_shape=(64, 64)))
        samples.append(sample)
    return dict(inputs=[torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8) for _ in range(n)],
                data_samples=samples)


def test_shipped_configs_are_the_papers():
    names = [os.path.basename(p) for p in SEG_CONFIGS]
    assert names == ['upernet_slak_base_512_160k_ade20k_ss.py', 'upernet_slak_small_512_160k_ade20k_ss.py',
                     'upernet_slak_tiny_512_160k_ade20k_ss.py', 'upernet_slak_tiny_512_80k_ade20k_ss.py']
    for path in SEG_CONFIGS:
        cfg = Config.fromfile(path)
        bb = cfg.model.backbone
        assert bb.kernel_size == [51, 49, 47, 13, 5] and bb.width_factor == 1.3 and bb.Decom
        assert bb.init_cfg.checkpoint == cfg.checkpoint_file == '/path/to/checkpoint-best.pth'
        assert cfg.model.decode_head.num_classes == 150 and cfg.model.test_cfg.mode == 'slide'
        assert cfg.train_dataloader.batch_size == 4 and cfg.custom_imports.imports == ['segmentation.slak']
        channels = [int(d * 1.3) for d in bb.dims]
        assert cfg.model.decode_head.in_channels == channels and cfg.model.auxiliary_head.in_channels == channels[2]
        if '80k' in path:
            assert cfg.train_cfg.max_iters == 80000 and cfg.optim_wrapper.optimizer.lr == 2e-4
            assert 'constructor' not in cfg.optim_wrapper and cfg.optim_wrapper.paramwise_cfg.norm_decay_mult == 0
            assert not bb.get('sparse') and bb.drop_path_rate == 0.1
        else:
            assert cfg.train_cfg.max_iters == 160000 and cfg.optim_wrapper.optimizer.lr == 1e-4 and bb.sparse
            assert cfg.optim_wrapper.paramwise_cfg == dict(num_layers=6 if 'tiny' in path else 12, decay_rate=0.9,
                                                           decay_type='stage_wise')
            assert cfg.param_scheduler[0].end == 1500


def _original_lr(base_lr: float, t: int, max_iters: int, warmup: int, warmup_ratio: float = 1e-6) -> float:
    """mmcv 1.x poly lr (power 1, min_lr 0) with linear warmup at iteration t: what the original configs ran."""
    lr = base_lr * (1 - t / max_iters)
    if t < warmup:
        lr *= 1 - (1 - t / warmup) * (1 - warmup_ratio)
    return lr


def test_lr_schedules_are_the_originals_warmup_on_poly():
    """Each config's schedulers, shrunk 100x in time, give the original's lr after warmup to within one iteration's
    decrement (mmengine's schedulers reach their end value one iteration before mmcv's); a poly that started only
    after warmup ran ~1 % of base lr higher for the whole schedule."""
    for path in SEG_CONFIGS:
        cfg = Config.fromfile(path)
        base_lr, max_iters = cfg.optim_wrapper.optimizer.lr, cfg.train_cfg.max_iters // 100
        warmup = cfg.param_scheduler[0].end // 100
        param = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.AdamW([param], lr=base_lr)
        schedulers = [PARAM_SCHEDULERS.build(dict(s, begin=s.begin // 100, end=s.end // 100, optimizer=optimizer))
                      for s in cfg.param_scheduler]
        lrs = []
        for _ in range(max_iters):
            lrs.append(optimizer.param_groups[0]['lr'])
            optimizer.step()
            for scheduler in schedulers:
                scheduler.step()
        assert lrs[0] == pytest.approx(base_lr * 1e-6)
        expected = [_original_lr(base_lr, t, max_iters, warmup) for t in range(warmup, max_iters)]
        assert lrs[warmup:] == pytest.approx(expected, rel=0, abs=1.001 * base_lr / max_iters), path


@pytest.mark.parametrize('path', SEG_CONFIGS, ids=os.path.basename)
def test_config_builds_trains_and_predicts(path):
    torch.manual_seed(0)
    cfg = _tiny_segmentor_cfg(path)
    init_default_scope('mmseg')
    model = revert_sync_batchnorm(MODELS.build(ConfigDict(cfg.model)))  # what the runner does without DDP
    model.init_weights()
    optim_wrapper = build_optim_wrapper(model, copy.deepcopy(cfg.optim_wrapper))
    if '80k' in path:  # norm_decay_mult=0 reaches BatchNorm only: SLaK's LayerNorm is no nn.LayerNorm (as original)
        decay = {id(p): g['weight_decay'] for g in optim_wrapper.optimizer.param_groups for p in g['params']}
        block = model.backbone.stages[0][0]
        assert decay[id(block.large_kernel.LoRA1.bn.weight)] == 0 and decay[id(block.norm.weight)] == 0.05
    before = model.backbone.stages[0][0].pwconv1.weight.detach().clone()
    model.train()
    losses = model.train_step(_seg_batch(), optim_wrapper)
    assert {'decode.loss_ce', 'aux.loss_ce'} <= set(losses)
    assert torch.isfinite(losses['loss']) and losses['loss'] > 0
    assert not torch.equal(before, model.backbone.stages[0][0].pwconv1.weight)
    model.eval()
    predictions = model.test_step(_seg_batch(1))
    labels = predictions[0].pred_sem_seg.data
    assert labels.shape == (1, 64, 64) and 0 <= labels.min() and labels.max() < NUM_CLASSES


# ---- mmcv-lite stand-in and missing frameworks ----------------------------------------------------------------------
@pytest.mark.skipif(not mmcv_ext_fallback.is_fallback_active(), reason='a compiled mmcv._ext is installed')
def test_mmcv_ext_fallback_ops():
    import mmcv._ext as ext
    from mmcv.ops import RoIAlign, nms
    from torchvision.ops import nms as tv_nms
    boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 11., 11.], [20., 20., 30., 30.], [0., 0., 9., 10.]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    _, keep = nms(boxes, scores, iou_threshold=0.5)
    assert keep.tolist() == tv_nms(boxes, scores, 0.5).tolist() == [3, 2]
    # offset=1 ("+1 pixel" boxes): IoU of boxes 0 and 1 becomes 100/142 > 0.7, while it is 81/119 < 0.7 without.
    assert ext.nms(boxes[:2], scores[:2], iou_threshold=0.7, offset=1).tolist() == [0]
    assert ext.nms(boxes[:2], scores[:2], iou_threshold=0.7, offset=0).tolist() == [0, 1]
    feats = torch.randn(2, 4, 16, 16)
    rois = torch.tensor([[0, 1., 2., 9., 12.], [1, 0., 0., 15., 15.]])
    via_ext = RoIAlign(7, spatial_scale=0.5, sampling_ratio=2, use_torchvision=False)(feats, rois)
    via_torchvision = RoIAlign(7, spatial_scale=0.5, sampling_ratio=2, use_torchvision=True)(feats, rois)
    torch.testing.assert_close(via_ext, via_torchvision)
    with pytest.raises(NotImplementedError, match="'deform_conv_forward'.*install full mmcv"):
        ext.deform_conv_forward(feats)


@pytest.mark.skipif(not mmcv_ext_fallback.is_fallback_active(), reason='a compiled mmcv._ext is installed')
def test_mmcv_ext_fallback_ops_stay_on_the_inputs_device(monkeypatch):
    """NMS and RoIAlign (stand-in and torchvision paths, as mmdet calls them) run torchvision's op on the device of
    their inputs. Meta tensors stand for a GPU here: any copy to the host (.cpu(), .numpy(), .item()) on the way
    raises, and every op call is checked for its device."""
    from mmcv.ops import RoIAlign, batched_nms, nms, roi_align
    devices = []

    def fake_nms(boxes, scores, iou_threshold):  # torchvision's meta kernel cannot size its output
        devices.append(('nms', boxes.device.type, scores.device.type))
        return torch.arange(boxes.shape[0] // 2, device=boxes.device)

    real_roi_align = torch.ops.torchvision.roi_align

    def recording_roi_align(input, rois, *args):
        devices.append(('roi_align', input.device.type, rois.device.type))
        return real_roi_align(input, rois, *args)

    monkeypatch.setattr(torch.ops.torchvision, 'nms', fake_nms)
    monkeypatch.setattr(torch.ops.torchvision, 'roi_align', recording_roi_align)
    meta = torch.device('meta')
    boxes, scores = torch.zeros(6, 4, device=meta), torch.zeros(6, device=meta)
    dets, keep = nms(boxes, scores, iou_threshold=0.5)
    assert dets.device == keep.device == meta and dets.shape == (3, 5)
    dets, keep = batched_nms(boxes, scores, torch.zeros(6, dtype=torch.long, device=meta),
                             dict(type='nms', iou_threshold=0.7))
    assert dets.device == meta
    feats, rois = torch.zeros(2, 4, 16, 16, device=meta), torch.zeros(3, 5, device=meta)
    for use_torchvision in (False, True):
        out = RoIAlign(7, spatial_scale=0.25, sampling_ratio=0, use_torchvision=use_torchvision)(feats, rois)
        assert out.device == meta and out.shape == (3, 4, 7, 7)
    assert roi_align(feats, rois, (14, 14), 1.0, 0, 'avg', True).device == meta  # mmdet's mask targets call this
    assert [d[0] for d in devices] == ['nms', 'nms', 'roi_align', 'roi_align', 'roi_align']
    assert all(d[1:] == ('meta', 'meta') for d in devices)


def test_mmcv_ext_fallback_leaves_a_compiled_mmcv_alone(monkeypatch):
    """With a real ``mmcv._ext`` importable, install() keeps it (it is never shadowed by the stand-in)."""
    import types
    compiled = types.ModuleType('mmcv._ext')
    compiled.nms = lambda *args, **kwargs: 'compiled'
    monkeypatch.setitem(sys.modules, 'mmcv._ext', compiled)
    assert mmcv_ext_fallback.install() is False
    assert sys.modules['mmcv._ext'] is compiled and not mmcv_ext_fallback.is_fallback_active()


def test_missing_framework_error(monkeypatch):
    monkeypatch.setitem(sys.modules, 'mmseg.engine', None)
    monkeypatch.delitem(sys.modules, 'segmentation.slak')
    with pytest.raises(ImportError, match=r'pip install -r requirements-mm.txt'):
        import segmentation.slak  # noqa: F401


def test_backbone_starts_the_twin_warmer_once_on_the_first_cuda_batch(monkeypatch):
    """The first CUDA batch (training or evaluation) starts SLaK.warm_size_agnostic_kernels with its batch size and
    compute dtype (autocast's where on); CPU batches and later batches start nothing."""
    import types
    import SLaK as slak_model
    calls = []
    monkeypatch.setattr(slak_model, 'warm_size_agnostic_kernels',
                        lambda model, batch, dtype, device: calls.append((model, batch, dtype, str(device))) or 'w')
    backbone = _backbone().train()
    backbone._warm_twins_once(torch.zeros(2, 3, 32, 32))  # CPU
    assert calls == []
    cuda_batch = types.SimpleNamespace(is_cuda=True, shape=(3, 3, 64, 96), dtype=torch.float32,
                                       device=torch.device('cuda', 0))
    monkeypatch.setattr(torch, 'is_autocast_enabled', lambda device_type=None: device_type == 'cuda')
    monkeypatch.setattr(torch, 'get_autocast_dtype', lambda device_type: torch.bfloat16)
    backbone._warm_twins_once(cuda_batch)
    backbone.eval()
    backbone._warm_twins_once(cuda_batch)
    assert calls == [(backbone, 3, torch.bfloat16, 'cuda:0')] and backbone._twin_warmer == 'w'
    fresh = _backbone().eval()  # tools/test.py: evaluation only, batch 1, no autocast
    monkeypatch.setattr(torch, 'is_autocast_enabled', lambda device_type=None: False)
    fresh._warm_twins_once(types.SimpleNamespace(is_cuda=True, shape=(1, 3, 64, 96), dtype=torch.float32,
                                                 device=torch.device('cuda', 0)))
    assert calls[1:] == [(fresh, 1, torch.float32, 'cuda:0')]
