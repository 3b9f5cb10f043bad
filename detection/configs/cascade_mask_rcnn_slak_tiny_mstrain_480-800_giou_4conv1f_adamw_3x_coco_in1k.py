# Cascade Mask R-CNN + SLaK-T (51x51, decomposed, sparse checkpoint) on COCO, 3x schedule (36 epochs, lr steps at
# 27 and 33), DETR-style multi-scale training, GIoU 4conv1fc bbox heads; 8 GPUs x 2 images (the original recipe).
# Fine-tune a main.py checkpoint: --cfg-options model.backbone.init_cfg.checkpoint=/path/to/checkpoint-best.pth
# (the original set none: without it, sparse=True warns and the backbone trains dense from scratch).
_base_ = [
    '_base_/models/cascade_mask_rcnn_slak_fpn.py', '_base_/datasets/coco_instance.py',
    '_base_/schedules/schedule_adamw_layer_decay.py', '_base_/default_runtime.py',
]
checkpoint_file = '/path/to/checkpoint-best.pth'
model = dict(
    backbone=dict(
        drop_path_rate=0.4,
        layer_scale_init_value=1.0,
        kernel_size=[51, 49, 47, 13, 5],
        LoRA=True,
        width_factor=1.3,
        sparse=True,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    neck=dict(in_channels=[124, 249, 499, 998]),
    roi_head=dict(bbox_head=[
        dict(type='ConvFCBBoxHead', num_shared_convs=4, num_shared_fcs=1, in_channels=256, conv_out_channels=256,
             fc_out_channels=1024, roi_feat_size=7, num_classes=80,
             bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0., 0., 0., 0.], target_stds=stds),
             reg_class_agnostic=False, reg_decoded_bbox=True, norm_cfg=dict(type='SyncBN', requires_grad=True),
             loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
             loss_bbox=dict(type='GIoULoss', loss_weight=10.0))
        for stds in ([0.1, 0.1, 0.2, 0.2], [0.05, 0.05, 0.1, 0.1], [0.033, 0.033, 0.067, 0.067])]))

# Multi-scale training: short side 480..800 (step 32, long side <= 1333), or resize to 400/500/600, crop 384..600
# and resize again (the original's AutoAugment policy).
multi_scale = [(short, 1333) for short in range(480, 801, 32)]
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args={{_base_.backend_args}}),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='RandomChoice', transforms=[
        [dict(type='RandomChoiceResize', scales=multi_scale, keep_ratio=True)],
        [dict(type='RandomChoiceResize', scales=[(400, 1333), (500, 1333), (600, 1333)], keep_ratio=True),
         dict(type='RandomCrop', crop_type='absolute_range', crop_size=(384, 600), allow_negative_crop=True),
         dict(type='RandomChoiceResize', scales=multi_scale, keep_ratio=True)],
    ]),
    dict(type='PackDetInputs'),
]
train_dataloader = dict(batch_size=2, num_workers=2, dataset=dict(pipeline=train_pipeline))

max_epochs = 36
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[27, 33], gamma=0.1),
]
