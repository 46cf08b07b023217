"""Semantic segmentation with EMOv2 backbones (DeepLabv3, Semantic FPN, SegFormer head, PSPNet) and U-EMO."""
from .models import PAPER_INPUT, PAPER_ROW_TO_KIND, SIZE_NOTES, Segmenter, create_segmenter, segmenter_names
from .unet import UNet

__all__ = ['PAPER_INPUT', 'PAPER_ROW_TO_KIND', 'SIZE_NOTES', 'Segmenter', 'create_segmenter', 'segmenter_names',
           'UNet']
