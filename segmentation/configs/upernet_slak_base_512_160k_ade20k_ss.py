# UperNet + SLaK-B (depths 3/3/27/3, dims 128..1024, 51x51, decomposed, sparse checkpoint), ADE20K 512x512,
# 160k iterations, 4 GPUs x 4 images. Fine-tune: --cfg-options model.backbone.init_cfg.checkpoint=/path/to/ckpt.pth
# Everything else as the SLaK-S 160k config.
_base_ = ['upernet_slak_small_512_160k_ade20k_ss.py']
model = dict(
    backbone=dict(dims=[128, 256, 512, 1024], drop_path_rate=0.4),
    decode_head=dict(in_channels=[166, 332, 665, 1331]),
    auxiliary_head=dict(in_channels=665))
default_hooks = dict(logger=dict(interval=100))
