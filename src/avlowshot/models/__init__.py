"""Methods: one file per method built from the shared layers, behind one interface (:class:`Method`)."""

from avlowshot.models.avca import AVCA, AVCAConfig
from avlowshot.models.base import InputDims, Method, count_parameters
from avlowshot.models.registry import METHODS, build_method, config_model, validate_model_config

__all__ = [
    "AVCA",
    "AVCAConfig",
    "InputDims",
    "METHODS",
    "Method",
    "build_method",
    "config_model",
    "count_parameters",
    "validate_model_config",
]
