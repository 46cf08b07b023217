from .emo import EMO, EMO_CONFIGS, ImprovedInvertedResidualMobileBlock, PointwiseMixer, checkpoint_filter_fn
from .vemo import VEMO, VEMO_CONFIGS
from .dit import DiT, DIT_CONFIGS
from .deit_pvt import TokenMapViT, PyramidVisionTransformer, DEIT_PVT_CONFIGS
