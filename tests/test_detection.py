"""detection/: SLaK in MMDetection 3.x (registration, Cascade Mask R-CNN configs: build, train step, predict)."""
from __future__ import annotations

import copy
import glob
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from mm_utils import REPO_ROOT, TINY_BACKBONE, TINY_CHANNELS, config_path, require

require('mmdet')

from mmengine import Config, ConfigDict  # noqa: E402
from mmengine.model import revert_sync_batchnorm  # noqa: E402
from mmengine.optim import build_optim_wrapper  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmengine.structures import InstanceData  # noqa: E402

import detection.slak  # noqa: E402,F401  registers SLaK into mmdet
from mmdet.registry import MODELS, OPTIM_WRAPPER_CONSTRUCTORS  # noqa: E402
from mmdet.structures import DetDataSample  # noqa: E402
from mmdet.structures.mask import BitmapMasks  # noqa: E402
from segmentation.layer_decay_optimizer_constructor import LearningRateDecayOptimizerConstructor  # noqa: E402
from segmentation.slak_backbone import SLaK  # noqa: E402

DET_CONFIGS = sorted(glob.glob(config_path('detection', 'configs', '*.py')))
CONFIG_3X, CONFIG_1X = (config_path('detection', 'configs', name) for name in (
    'cascade_mask_rcnn_slak_tiny_mstrain_480-800_giou_4conv1f_adamw_3x_coco_in1k.py',
    'cascade_mask_rcnn_slak_tiny_120_mstrain_480-800_giou_4conv1f_adamw_1x_coco_in1k.py'))
NUM_CLASSES = 3
SIZE = 96


def test_registration_is_shared_and_independent_of_mmseg():
    assert MODELS.get('SLaK') is SLaK
    assert OPTIM_WRAPPER_CONSTRUCTORS.get('LearningRateDecayOptimizerConstructor') is \
        LearningRateDecayOptimizerConstructor
    # detection/ reuses segmentation/ modules, which must not pull in mmseg (a fresh interpreter tells).
    # It also launches every map size through the size-agnostic Triton kernels (detection's sizes vary).
    code = ('import sys, json, detection.slak; k = sys.modules.get("slak_dwconv_triton"); '
            'print(json.dumps([sorted(m for m in sys.modules if m.split(".")[0] == "mmseg"), '
            'None if k is None else k.SPECIALISED_SIZES]))')
    env = {k: v for k, v in os.environ.items() if k != 'SLAK_DWCONV_SPECIALISED_SIZES'}
    result = subprocess.run([sys.executable, '-c', code], cwd=REPO_ROOT, capture_output=True, text=True, check=True,
                            env=env)
    mmseg_modules, specialised = json.loads(result.stdout.strip().splitlines()[-1])
    assert mmseg_modules == []
    assert specialised == (0 if importlib.util.find_spec('triton') else None)


def test_prefer_size_agnostic_kernels_leaves_an_explicit_setting(monkeypatch):
    import SLaK as slak_model
    kernels = getattr(sys.modules.get('depthwise_conv2d_implicit_gemm'), '_kernels', None)
    if kernels is None and slak_model._load_fast_dwconv() is not None:
        kernels = sys.modules['depthwise_conv2d_implicit_gemm']._kernels
    if kernels is None:
        pytest.skip('triton is not installed')
    monkeypatch.setattr(kernels, 'SPECIALISED_SIZES', 8)
    monkeypatch.setenv('SLAK_DWCONV_SPECIALISED_SIZES', '8')
    assert not slak_model.prefer_size_agnostic_kernels() and kernels.SPECIALISED_SIZES == 8
    monkeypatch.delenv('SLAK_DWCONV_SPECIALISED_SIZES')
    assert slak_model.prefer_size_agnostic_kernels() and kernels.SPECIALISED_SIZES == 0


def test_shipped_configs_are_the_papers():
    assert sorted(DET_CONFIGS) == sorted([CONFIG_3X, CONFIG_1X])
    schedules = {}
    for path in DET_CONFIGS:
        cfg = Config.fromfile(path)
        bb = cfg.model.backbone
        assert bb.kernel_size == [51, 49, 47, 13, 5] and bb.LoRA and bb.sparse and bb.width_factor == 1.3
        assert bb.drop_path_rate == 0.4 and bb.layer_scale_init_value == 1.0
        assert cfg.model.neck.in_channels == [124, 249, 499, 998]
        assert cfg.custom_imports.imports == ['detection.slak']
        roi = cfg.model.roi_head
        for extractor in (roi.bbox_roi_extractor, roi.mask_roi_extractor):
            assert extractor.roi_layer.use_torchvision
        for head in roi.bbox_head:
            assert head.type == 'ConvFCBBoxHead' and head.num_shared_convs == 4 and head.num_shared_fcs == 1
            assert head.loss_bbox == dict(type='GIoULoss', loss_weight=10.0) and head.reg_decoded_bbox
            assert head.norm_cfg.type == 'SyncBN'
        assert [h.bbox_coder.target_stds for h in roi.bbox_head] == [
            [0.1, 0.1, 0.2, 0.2], [0.05, 0.05, 0.1, 0.1], [0.033, 0.033, 0.067, 0.067]]
        assert cfg.optim_wrapper.constructor == 'LearningRateDecayOptimizerConstructor'
        assert cfg.optim_wrapper.optimizer.lr == 2e-4
        assert cfg.optim_wrapper.paramwise_cfg == dict(num_layers=6, decay_rate=0.7, decay_type='layer_wise')
        assert cfg.auto_scale_lr == dict(enable=True, base_batch_size=16) and cfg.train_dataloader.batch_size == 2
        scales = cfg.train_pipeline[3].transforms[0][0].scales
        assert [s[0] for s in scales] == list(range(480, 801, 32))
        schedules[path] = (cfg.train_cfg.max_epochs, cfg.param_scheduler[1].milestones)
        if path == CONFIG_1X:
            assert cfg.model == Config.fromfile(CONFIG_3X).model
    assert schedules == {CONFIG_3X: (36, [27, 33]), CONFIG_1X: (12, [8, 11])}


def test_base_model_config_warns_about_the_default_kernel():
    cfg = Config.fromfile(config_path('detection', 'configs', '_base_', 'models', 'cascade_mask_rcnn_slak_fpn.py'))
    backbone_cfg = dict(cfg.model.backbone, width_factor=0.125, depths=[1, 1, 1, 1])
    with pytest.warns(UserWarning, match='kernel_size not given'):
        backbone = MODELS.build(ConfigDict(backbone_cfg))
    assert backbone.kernel_size == [31, 29, 27, 13, 3]


def _tiny_detector_cfg(path: str) -> Config:
    cfg = Config.fromfile(path)
    model = cfg.model
    model.backbone.update(TINY_BACKBONE)
    model.backbone.init_cfg = None
    model.backbone.sparse = False
    model.neck.update(in_channels=TINY_CHANNELS, out_channels=32)
    model.rpn_head.update(in_channels=32, feat_channels=32)
    for extractor in (model.roi_head.bbox_roi_extractor, model.roi_head.mask_roi_extractor):
        extractor.out_channels = 32
    for head in model.roi_head.bbox_head:
        head.update(in_channels=32, conv_out_channels=32, fc_out_channels=64, num_classes=NUM_CLASSES)
    model.roi_head.mask_head.update(in_channels=32, conv_out_channels=32, num_classes=NUM_CLASSES)
    model.train_cfg.rpn.sampler.num = 64
    model.train_cfg.rpn_proposal.update(nms_pre=200, max_per_img=100)
    for stage in model.train_cfg.rcnn:
        stage.sampler.num = 32
    model.test_cfg.rpn.update(nms_pre=200, max_per_img=50)
    return cfg


def _det_batch(n: int = 2, with_gt: bool = True) -> dict:
    samples = []
    boxes = torch.tensor([[8., 10., 60., 70.], [40., 30., 90., 88.]])
    for _ in range(n):
        sample = DetDataSample()
        sample.set_metainfo(dict(img_shape=(SIZE, SIZE), ori_shape=(SIZE, SIZE), scale_factor=(1., 1.)))
        if with_gt:
            masks = np.zeros((2, SIZE, SIZE), dtype=np.uint8)
            for m, (x1, y1, x2, y2) in zip(masks, boxes.int().tolist()):
                m[y1:y2, x1:x2] = 1
            sample.gt_instances = InstanceData(bboxes=boxes.clone(), labels=torch.tensor([0, 2]),
                                               masks=BitmapMasks(masks, SIZE, SIZE))
        samples.append(sample)
    return dict(inputs=[torch.randint(0, 256, (3, SIZE, SIZE), dtype=torch.uint8) for _ in range(n)],
                data_samples=samples)


def test_cascade_mask_rcnn_trains_and_predicts():
    torch.manual_seed(0)
    cfg = _tiny_detector_cfg(CONFIG_3X)
    init_default_scope('mmdet')
    model = revert_sync_batchnorm(MODELS.build(ConfigDict(cfg.model)))  # what the runner does without DDP
    assert isinstance(model.backbone, SLaK)
    model.init_weights()
    optim_wrapper = build_optim_wrapper(model, copy.deepcopy(cfg.optim_wrapper))
    scales = {g['group_name']: g['lr_scale'] for g in optim_wrapper.optimizer.param_groups}
    assert scales['layer_0_decay'] == pytest.approx(0.7 ** 7) and scales['layer_7_decay'] == 1.0
    before = model.backbone.stages[0][0].pwconv1.weight.detach().clone()
    model.train()
    losses = model.train_step(_det_batch(), optim_wrapper)
    for stage in range(3):
        assert {f's{stage}.loss_cls', f's{stage}.loss_bbox', f's{stage}.loss_mask'} <= set(losses)
    assert {'loss_rpn_cls', 'loss_rpn_bbox'} <= set(losses)
    assert torch.isfinite(losses['loss']) and losses['loss'] > 0
    assert not torch.equal(before, model.backbone.stages[0][0].pwconv1.weight)
    model.eval()
    model.test_cfg.rcnn.score_thr = 0.  # an untrained model: keep every detection so the masks are exercised
    pred = model.test_step(_det_batch(1, with_gt=False))[0].pred_instances
    n = len(pred)
    assert 0 < n <= 100
    assert pred.bboxes.shape == (n, 4) and pred.masks.shape == (n, SIZE, SIZE)
    assert pred.labels.min() >= 0 and pred.labels.max() < NUM_CLASSES
    assert torch.all(pred.bboxes[:, 2:] <= SIZE) and torch.all(pred.bboxes[:, :2] >= 0)


def test_missing_framework_error(monkeypatch):
    monkeypatch.setitem(sys.modules, 'mmdet.engine', None)
    monkeypatch.delitem(sys.modules, 'detection.slak')
    with pytest.raises(ImportError, match=r'pip install -r requirements-mm.txt'):
        import detection.slak  # noqa: F401
