# MMSegmentation 1.x runtime. sync_bn='torch': in distributed runs the runner turns the backbone's BatchNorm into
# SyncBatchNorm (the original hard-wired SyncBN); single-process runs keep BatchNorm.
default_scope = 'mmseg'
env_cfg = dict(
    cudnn_benchmark=True,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'),
)
sync_bn = 'torch'
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(type='SegLocalVisualizer', vis_backends=vis_backends, name='visualizer')
log_processor = dict(by_epoch=False)
log_level = 'INFO'
load_from = None
resume = False
