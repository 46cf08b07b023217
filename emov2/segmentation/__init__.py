"""Semantic segmentation with EMOv2 backbones (DeepLabv3, Semantic FPN, SegFormer head, PSPNet) and U-EMO."""
from .models import PAPER_INPUT, PAPER_ROW_TO_KIND, SIZE_NOTES, Segmenter, create_segmenter, segmenter_names
from .unet import UNet

__all__ = ['PAPER_INPUT', 'PAPER_ROW_TO_KIND', 'SIZE_NOTES', 'Segmenter', 'create_segmenter', 'segmenter_names',
           'UNet']
from .data import ADE20K_CLASSES, SegmentationDataset, build_segmentation_datasets, collate_segmentation
from .inference import segment_logits, slide_inference, whole_inference
from .metrics import ConfusionMatrix, segmentation_metrics
from .task import SegmentationTask, evaluate_segmenter
from .predict import evaluate_checkpoint, load_segmenter, predict_images

__all__ += ['ADE20K_CLASSES', 'SegmentationDataset', 'build_segmentation_datasets', 'collate_segmentation',
            'segment_logits', 'slide_inference', 'whole_inference', 'ConfusionMatrix', 'segmentation_metrics',
            'SegmentationTask', 'evaluate_segmenter', 'evaluate_checkpoint', 'load_segmenter', 'predict_images']
