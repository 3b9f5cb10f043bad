# UperNet + SLaK-S (depths 3/3/27/3, 51x51, decomposed, sparse checkpoint), ADE20K 512x512, 160k iterations,
# 4 GPUs x 4 images. Fine-tune: --cfg-options model.backbone.init_cfg.checkpoint=/path/to/checkpoint-best.pth
# Everything else as the SLaK-T 160k config.
_base_ = ['upernet_slak_tiny_512_160k_ade20k_ss.py']
model = dict(backbone=dict(depths=[3, 3, 27, 3], dims=[96, 192, 384, 768], drop_path_rate=0.3))
optim_wrapper = dict(paramwise_cfg=dict(num_layers=12))
