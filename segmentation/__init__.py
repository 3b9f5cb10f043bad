"""SLaK for MMSegmentation 1.x: ``import segmentation.slak`` registers the backbone and optimizer constructor."""
