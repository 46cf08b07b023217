"""Object detection and instance segmentation with EMOv2 backbones on torchvision's detectors (SSDLite, RetinaNet, Mask R-CNN)."""
from .models import (DETECTORS, EMOBackbone, EMOFPNBackbone, SSDLiteNeck, create_detector,  # noqa: F401
                     detector_names, emo_backbone_of)
