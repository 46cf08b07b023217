from .emo import EMO, EMO_CONFIGS, ImprovedInvertedResidualMobileBlock, PointwiseMixer, checkpoint_filter_fn
from .vemo import VEMO, VEMO_CONFIGS
