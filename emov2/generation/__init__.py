"""Class-conditional image generation with DiT and D-EMO (DiT whose blocks are conditioned i2RMBs)."""
from .task import GenerationTask, make_scheduler

__all__ = ['GenerationTask', 'make_scheduler']
