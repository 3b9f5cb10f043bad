# 80k iterations: AdamW lr 2e-4 (no layer decay), 800 warmup iterations; checkpoint every 8k, mIoU every 2k, log every
# 10 iterations (the original's). norm_decay_mult=0 exempts BatchNorm/SyncBN from weight decay; SLaK's own LayerNorm
# class is not an nn.LayerNorm, so it keeps weight decay, as with the original's mmcv constructor.
# lr: poly (power 1) from iteration 0 to 0 at the last iteration, times the linear warmup factor while that lasts:
# mmcv's warmup-on-poly of the original (a poly starting after warmup would run ~1 % higher all along).
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(norm_decay_mult=0.))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=800),
    dict(type='PolyLR', power=1.0, eta_min=0.0, by_epoch=False, begin=0, end=80000),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=80000, val_interval=2000)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=10, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=8000),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'))
