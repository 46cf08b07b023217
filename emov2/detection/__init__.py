"""Object detection and instance segmentation with EMOv2 backbones on torchvision's detectors (SSDLite, RetinaNet, Mask R-CNN)."""
