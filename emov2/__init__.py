"""EMOv2 / EMO lightweight vision backbones. Importing this registers the models in timm."""
from .models import emo as _emo  # noqa: F401  (registers emov2_* / emov1_* in timm)
from .checkpoint import CheckpointError
from .deploy import deploy, to_channels_last
from .factory import create_model, list_models, load_checkpoint
from . import reference

__version__ = '0.1.0'
__all__ = ['create_model', 'list_models', 'load_checkpoint', 'deploy', 'to_channels_last', 'CheckpointError']
