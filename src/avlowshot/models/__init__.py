"""Methods: one file per method built from the shared layers, behind one interface (:class:`Method`)."""

from avlowshot.models.avca import AVCA, AVCAConfig
from avlowshot.models.avdiff import AVDiff, AVDiffConfig
from avlowshot.models.avgzslnet import CJME, AVGZSLNet, AVGZSLNetConfig, CJMEConfig
from avlowshot.models.base import InputDims, Method, Substage, count_parameters
from avlowshot.models.bilinear import ALE, DEVISE, SJE, BilinearConfig
from avlowshot.models.clipclap import ClipClap, ClipClapConfig
from avlowshot.models.registry import METHODS, build_method, config_model, validate_model_config
from avlowshot.models.tcaf import TCAF, TCAFConfig

__all__ = [
    "ALE",
    "AVGZSLNet",
    "AVGZSLNetConfig",
    "BilinearConfig",
    "CJME",
    "CJMEConfig",
    "DEVISE",
    "SJE",
    "AVCA",
    "AVCAConfig",
    "AVDiff",
    "AVDiffConfig",
    "ClipClap",
    "ClipClapConfig",
    "InputDims",
    "METHODS",
    "Method",
    "Substage",
    "TCAF",
    "TCAFConfig",
    "build_method",
    "config_model",
    "count_parameters",
    "validate_model_config",
]
