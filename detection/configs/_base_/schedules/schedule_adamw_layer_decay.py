# AdamW lr 2e-4 for 16 images per step (8 GPUs x 2) with layer-wise lr decay 0.7 over 6 layers (SLaK-T); 500 linear
# warmup iterations from 0.001 x lr; the epoch count and lr steps are set by each config (1x: 12 epochs, steps 8/11;
# 3x: 36 epochs, steps 27/33). As in the original, auto_scale_lr is enabled, so the runner always scales lr by
# (GPUs x batch_size) / 16, with or without --auto-scale-lr (set auto_scale_lr.enable=False to keep 2e-4).
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-4, betas=(0.9, 0.999), weight_decay=0.05),
    constructor='LearningRateDecayOptimizerConstructor',
    paramwise_cfg=dict(num_layers=6, decay_rate=0.7, decay_type='layer_wise'))
max_epochs = 12
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[8, 11], gamma=0.1),
]
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=max_epochs, val_interval=1)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
auto_scale_lr = dict(enable=True, base_batch_size=16)
