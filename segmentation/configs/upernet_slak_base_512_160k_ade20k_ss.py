# UperNet + SLaK-B (depths 3/3/27/3, dims 128..1024, 51x51, decomposed, sparse checkpoint), ADE20K 512x512,
# 160k iterations, 4 GPUs x 4 images. Fine-tune: --cfg-options model.backbone.init_cfg.checkpoint=/path/to/ckpt.pth
_base_ = [
    '_base_/models/upernet_slak.py', '_base_/datasets/ade20k.py',
    '_base_/default_runtime.py', '_base_/schedules/schedule_160k.py',
]
checkpoint_file = '/path/to/checkpoint-best.pth'
crop_size = (512, 512)
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(
        depths=[3, 3, 27, 3],
        dims=[128, 256, 512, 1024],
        kernel_size=[51, 49, 47, 13, 5],
        width_factor=1.3,
        Decom=True,
        sparse=True,
        drop_path_rate=0.4,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    decode_head=dict(in_channels=[166, 332, 665, 1331], num_classes=150),
    auxiliary_head=dict(in_channels=665, num_classes=150),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(341, 341)))
optim_wrapper = dict(paramwise_cfg=dict(num_layers=12, decay_rate=0.9, decay_type='stage_wise'))
train_dataloader = dict(batch_size=4)
default_hooks = dict(logger=dict(interval=100))
