"""The plain implementation: the training graph module by module as the spec reads it, NCHW,
nothing folded or fused. It is the oracle of the tests and the denominator of every speed-up
ratio; :func:`emov2.to_channels_last` (training) and :func:`emov2.deploy` (inference) are measured
against it."""
from .factory import create_model

__all__ = ['create_model']
