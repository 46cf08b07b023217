"""Semantic segmentation with EMOv2 backbones (DeepLabv3, Semantic FPN, SegFormer head, PSPNet) and U-EMO."""
