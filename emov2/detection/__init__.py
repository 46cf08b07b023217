"""Object detection and instance segmentation with EMOv2 backbones on torchvision's detectors (SSDLite, RetinaNet, Mask R-CNN)."""
from .models import (DETECTORS, PAPER_INPUT, SIZE_NOTES, EMOBackbone, EMOFPNBackbone, SSDLiteNeck,
                     build_for_paper_row, create_detector, detector_names, emo_backbone_of, flops_view)
from .onnx import decode_ssdlite, export_ssdlite_onnx
from .data import CocoDetection, collate_detection, detection_transforms, load_coco
from .task import DetectionTask, coco_evaluate, evaluate_detections, to_coco_results
from .predict import draw_detections, evaluate_detector, load_detector, predict_detections

__all__ = ['DETECTORS', 'PAPER_INPUT', 'SIZE_NOTES', 'EMOBackbone', 'EMOFPNBackbone', 'SSDLiteNeck',
           'build_for_paper_row', 'create_detector', 'detector_names', 'emo_backbone_of', 'flops_view',
           'decode_ssdlite', 'export_ssdlite_onnx',
           'CocoDetection', 'collate_detection', 'detection_transforms', 'load_coco', 'DetectionTask', 'coco_evaluate',
           'evaluate_detections', 'to_coco_results', 'draw_detections', 'evaluate_detector', 'load_detector',
           'predict_detections']
