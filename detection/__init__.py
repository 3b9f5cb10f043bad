"""SLaK for MMDetection 3.x: ``import detection.slak`` registers the backbone and optimizer constructor."""
