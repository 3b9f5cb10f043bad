# As the 3x config, with the 1x schedule (12 epochs, lr steps at 8 and 11): the README's "120epochs/12epochs" row
# (a 120-epoch ImageNet checkpoint fine-tuned for 12 epochs).
_base_ = ['cascade_mask_rcnn_slak_tiny_mstrain_480-800_giou_4conv1f_adamw_3x_coco_in1k.py']
max_epochs = 12
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[8, 11], gamma=0.1),
]
