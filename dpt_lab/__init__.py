"""DPT Lab: look inside Dense Prediction Transformer depth models."""

from .checkpoints import load_model
from .encoders.base import EncoderFeatures, Record
from .errors import CheckpointError, DPTLabError
from .model import DepthModel, ModelInfo

__all__ = ["load_model", "CheckpointError", "DPTLabError", "DepthModel", "ModelInfo", "EncoderFeatures", "Record"]
__version__ = "0.1.0"
