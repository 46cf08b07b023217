"""Layers of the EMO family: the i2RMB for 1-3 spatial axes, its attention, conditioning and convs.

Each layer with a faster inference form owns it (``deploy_form``), which :func:`emov2.deploy` calls.
"""
from .basic import ConvNormAct, DeformConvNormAct, LayerNormChannels, LayerScale, conv_nd, norm_nd, spec_padding
from .block import ImprovedInvertedResidualMobileBlock, PointwiseMixer
from .conditioning import Modulation, modulate
from .fused import DeployOptions, FusedConv2d, fold_conv_norm, fold_norm_into_next_conv
from .window_attention import PARTITIONS, SpanningWindowAttention, check_window_scores_fit, pad_to_window, \
    window_partition, window_reverse, windowed_attention
