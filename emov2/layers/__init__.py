from .basic import ConvNormAct, DeformConvNormAct, LayerNormChannels, LayerScale, spec_padding
from .window_attention import PARTITIONS, SpanningWindowAttention, pad_to_window, window_partition, \
    window_reverse, windowed_attention
from .meta_mobile_block import GlobalAttentionOperator, MetaMobileBlock
