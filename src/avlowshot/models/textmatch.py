"""Text matching: the zero-training baseline of the ClipClap table (no reference has it; avlowshot's own row).

On ``clipclap`` features every video is scored against every class by the cosine of its CLIP video feature with
the class's CLIP text embedding and of its CLAP audio feature with the class's CLAP text embedding (the layout's
1536-d class text is CLIP 512 ‖ CLAP 1024), as the two backbones' own zero-shot classifiers do. Nothing is trained:
the method has no parameters and its configs set ``epochs: 0``, so the shared protocol runs zero-epoch stages (the
initial model is the only checkpoint) and only the calibrated stacking is fitted: beta is searched on stage-1 val
and applied to the test, and ``result.json`` is the same record as every method's. The gain a trained method brings
over its frozen features is the difference between its row and this one.

Scores (higher = better, ``score_kind = "probability"``: beta is subtracted from the seen columns)::

    s_v = scale * cos(v, t_clip)        s_a = scale * cos(a, t_clap)
    modality video: s_v      audio: s_a
    fused, fusion mean:          w s_v + (1 - w) s_a
    fused, fusion softmax-mean:  w softmax(s_v) + (1 - w) softmax(s_a)   (softmax over the scored split's classes)

``w = video_weight`` (0.5), ``scale`` = 100 (CLIP's logit scale; it only stretches the score axis so that the
ClipClap beta grid 0..5 in steps of 1/15 resolves cosine gaps of 7e-4). With ``softmax-mean`` the scores are
probabilities: use ``--set beta_grid=avdiff`` (0..1) or a finer grid. Under ``--compat official`` the class text is
read in ClipClap's loader order (its ActivityNet / VGGSound id quirk), as the trained ClipClap-table rows.

**Parameters:** 0. **Published numbers:** none (the ClipClap table has no zero-training row).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from avlowshot.data.batching import Batch
from avlowshot.errors import ConfigError
from avlowshot.models.base import InputDims, Method, check_averaged


class TextMatchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    modality: Literal["fused", "video", "audio"] = Field(
        "fused", description="video: CLIP video vs CLIP text; audio: CLAP audio vs CLAP text; fused: both"
    )
    fusion: Literal["mean", "softmax-mean"] = Field(
        "mean", description="fused: weighted mean of the scaled cosines, or of their softmax over the classes"
    )
    video_weight: float = Field(0.5, ge=0, le=1, description="w: weight of the video score in the fused score")
    scale: float = Field(100.0, gt=0, description="the cosines are multiplied by it (CLIP's logit scale)")


class TextMatch(Method):
    name: ClassVar[str] = "text-match"
    score_kind: ClassVar[str] = "probability"  # higher = better
    needs_negatives: ClassVar[bool] = False
    config_class: ClassVar[type[BaseModel]] = TextMatchConfig
    tasks: ClassVar[tuple[str, ...]] = ("gzsl",)
    layouts: ClassVar[tuple[str, ...]] = ("clipclap",)
    inputs: ClassVar[str] = "averaged"
    trainable: ClassVar[bool] = False  # zero-epoch stages

    config: TextMatchConfig

    def __init__(self, config: TextMatchConfig, dims: InputDims, compat: str = "none"):
        super().__init__(config, dims, compat)
        if dims.text != dims.video + dims.audio:
            raise ConfigError(
                f"text-match: the class text ({dims.text}-d) must be CLIP ({dims.video}-d, the video dim) followed by "
                f"CLAP ({dims.audio}-d, the audio dim); use the clipclap layout"
            )

    def losses(self, batch: Batch, text: Tensor, negative=None, negative_text=None) -> dict[str, Tensor]:
        raise ConfigError("text-match has nothing to train: its stages run zero epochs (set epochs: 0)")

    def encode_samples(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """(unit CLIP video rows, unit CLAP audio rows)."""
        check_averaged(batch, "text-match")
        return F.normalize(batch.video.float(), dim=-1), F.normalize(batch.audio.float(), dim=-1)

    def encode_classes(self, text: Tensor) -> tuple[Tensor, Tensor]:
        """(unit CLIP text rows, unit CLAP text rows) of the class text ``[C, 512 + 1024]``."""
        text = text.float()
        return F.normalize(text[:, : self.dims.video], dim=-1), F.normalize(text[:, self.dims.video :], dim=-1)

    def scores(self, sample_codes, class_codes) -> Tensor:
        (sv, sa), (tv, ta) = sample_codes, class_codes
        c = self.config
        s_v = c.scale * (sv @ tv.t()) if c.modality != "audio" else None
        s_a = c.scale * (sa @ ta.t()) if c.modality != "video" else None
        if s_a is None:
            return s_v
        if s_v is None:
            return s_a
        if c.fusion == "softmax-mean":
            s_v, s_a = torch.softmax(s_v, dim=1), torch.softmax(s_a, dim=1)
        return c.video_weight * s_v + (1 - c.video_weight) * s_a
