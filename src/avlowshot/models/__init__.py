"""Methods: one file per method built from the shared layers, behind one interface (:class:`Method`)."""

from avlowshot.models.apn import APN, APNConfig
from avlowshot.models.avca import AVCA, AVCAConfig
from avlowshot.models.avdiff import AVDiff, AVDiffConfig
from avlowshot.models.avgzslnet import CJME, AVGZSLNet, AVGZSLNetConfig, CJMEConfig
from avlowshot.models.base import InputDims, Method, Substage, count_parameters
from avlowshot.models.bilinear import ALE, DEVISE, SJE, BilinearConfig
from avlowshot.models.clipclap import ClipClap, ClipClapConfig
from avlowshot.models.fsgen import TSL, ProtoGAN
from avlowshot.models.fusion import AttentionFusion, Perceiver
from avlowshot.models.fvaegan import FVAEGAN, FVAEGANConfig
from avlowshot.models.hyperbolic import HyperAlignment, HyperMultiple, HyperSingle
from avlowshot.models.registry import METHODS, build_method, config_model, validate_model_config
from avlowshot.models.tcaf import TCAF, TCAFConfig
from avlowshot.models.textmatch import TextMatch

__all__ = [
    "ALE",
    "AVGZSLNet",
    "AVGZSLNetConfig",
    "BilinearConfig",
    "CJME",
    "CJMEConfig",
    "DEVISE",
    "SJE",
    "APN",
    "APNConfig",
    "FVAEGAN",
    "FVAEGANConfig",
    "AVCA",
    "AVCAConfig",
    "AVDiff",
    "AVDiffConfig",
    "AttentionFusion",
    "ClipClap",
    "ClipClapConfig",
    "HyperAlignment",
    "HyperMultiple",
    "HyperSingle",
    "InputDims",
    "METHODS",
    "Method",
    "Perceiver",
    "ProtoGAN",
    "Substage",
    "TCAF",
    "TCAFConfig",
    "TSL",
    "TextMatch",
    "build_method",
    "config_model",
    "count_parameters",
    "validate_model_config",
]
