"""Training, evaluation, prediction and the demo for EMOv2 models (the paper's recipe on timm's pieces)."""
from .config import DEFAULTS, ConfigError, load_config
from .engine import NonFiniteLossError, RunExistsError, RunFinishedError, Trainer, TrainResult

__all__ = ["DEFAULTS", "ConfigError", "load_config", "Trainer", "TrainResult", "NonFiniteLossError", "RunExistsError",
           "RunFinishedError"]
