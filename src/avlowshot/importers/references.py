"""What each reference ships and how it maps onto avlowshot: file names, every saved argument, state-dict keys.

Every argument a reference saves has a rule here (specs/<method>.md, CLI sections):

* ``to(key)``: copied onto the avlowshot config (``epochs``, ``lr``, ``model.transformer_depth``, ...);
* ``derived(key)``: read together with other arguments into one avlowshot key (e.g. TCAF's
  ``use_self_attention`` + ``use_cross_attention`` -> ``model.attention``), by the method's ``derive``;
* ``need(values)``: a selector whose other values choose something avlowshot does not have (a baseline model, an
  unimplemented attention type, the squared-distance metric): any other value is refused;
* ``context(name)``: checked against the import's own inputs (dataset, layout, feature dims, the label space, the
  stage of the folder);
* ``inert(why)``: has no effect on the model or on its evaluation (paths, logging, workers, flags the method never
  reads).

An argument without a rule is refused too: a file of another version of the code cannot be imported silently.

State-dict keys: AVCA and ClipClap checkpoints load as they are. TCAF registers its embedding block twice
(``position_encoder_block`` and ``audiovisual_embeddings`` are one module, saved under both names) and keeps the
Fourier time features directly in that block; AV-DIFF has the same block and names the Sequential of its epsilon
network and calibration net ``fc`` (avlowshot: ``net``, and the epsilon network is also reachable as
``diffusion.eps_model``). :func:`map_state_dict` turns a reference state dict into avlowshot's keys.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Rule:
    kind: str  # to | derived | need | context | inert
    target: str | None = None  # to / derived: the avlowshot key; context: the check's name
    allowed: tuple = ()  # need: the admitted values
    why: str = ""
    convert: Callable[[Any], Any] | None = None


def to(target: str, convert: Callable[[Any], Any] | None = None, *, allowed: tuple = (), why: str = "") -> Rule:
    """Copied onto ``target``; with ``allowed``, other values are refused (``why``: what they would select)."""
    return Rule("to", target, allowed=allowed, why=why, convert=convert)


def derived(target: str) -> Rule:
    return Rule("derived", target)


def need(*allowed: Any, why: str) -> Rule:
    return Rule("need", allowed=allowed, why=why)


def context(name: str) -> Rule:
    return Rule("context", name)


def inert(why: str) -> Rule:
    return Rule("inert", why=why)


def _float(v: Any) -> float:
    return float(v)


# ----------------------------------------------------------------------------------------------------------------
# Arguments shared by the code bases (AVCA's argparse, and the configargparse of TCAF, ClipClap and AV-DIFF that
# grew out of it)

UNUSED = "never read by this method"
PATHS = "a path or a name of the training run; avlowshot's --root-dir and --out replace it"


def _common() -> dict[str, Rule]:
    return {
        "root_dir": inert(PATHS),
        "log_dir": inert(PATHS),
        "dump_path": inert(PATHS),
        "exp_name": inert(PATHS),
        "cfg": inert("the config file the arguments were read from; the arguments themselves are mapped"),
        "run": inert("which parts of the reference's driver ran"),
        "device": inert("the device it trained on; avlowshot evaluate takes --device"),
        "debug": inert(UNUSED),
        "verbose": inert(UNUSED),
        "debug_comment": inert(UNUSED),
        "dataset_name": context("dataset"),
        "feature_extraction_method": context("feature_dir"),
        "zero_shot_split": context("split"),
        "input_size": context("input_size"),
        "input_size_audio": context("input_size_audio"),
        "input_size_video": context("input_size_video"),
        "retrain_all": context("stage"),
        "save_checkpoints": inert("whether per-epoch checkpoints were written (the folder's files are read)"),
        "epochs": to("epochs"),
        "lr": to("lr", _float),
        "bs": to("batch_size"),
        "n_batches": to("n_batches"),
        "seed": to("seed"),
        "lr_scheduler": to("lr_scheduler"),
        "manual_text_word2vec": inert("AudioSetZSL only"),
        "val_all_loss": inert(UNUSED),
        "cycle_loss": inert(UNUSED),
        "norm_inputs": inert("read by the DEVISE / APN baselines only"),
        "margin": inert("read by the AVGZSLNet / CJME baselines only"),
        "embedding_use_bn": inert("read by the AVGZSLNet / CJME baselines only"),
        "decoder_use_bn": inert("read by the AVGZSLNet baseline only"),
        "normalize_decoder_outputs": inert("read by the AVGZSLNet baseline only"),
        "distance_fn": need("L2Loss", why="the evaluation distance; avlowshot scores with the plain L2 distance"),
        "first_additional_triplet": inert(UNUSED),
        "second_additional_triplet": inert(UNUSED),
        "third_additional_triplet": inert(UNUSED),
        "depth_transformer": inert(UNUSED),
        "additional_triplets_loss": inert(UNUSED),
        **{
            k: inert("a model flag of the code base with no implementation behind it in this method")
            for k in (
                "baseline",
                "audio_baseline",
                "video_baseline",
                "concatenated_baseline",
                "new_model",
                "new_model_early_fusion",
                "new_model_middle_fusion",
                "new_model_attention",
                "new_model_attention_both_heads",
                "perceiver",
                "attention_fusion",
            )
        },  # fmt: skip
        **{
            k: need(
                False, why="selects a baseline model (ALE / DEVISE / SJE / APN / CJME) that avlowshot does not have"
            )
            for k in ("ale", "devise", "sje", "apn", "cjme")
        },
    }


def _sequence_common() -> dict[str, Rule]:
    """TCAF-family arguments (TCAF, ClipClap, AV-DIFF)."""
    return {
        "z_score_inputs": need(False, why="z-scores every input tensor (broken in the reference)"),
        "optimizer": need("adam", why="adam-sam is not implemented by avlowshot"),
        "mixup_parameter": inert(UNUSED),
        "use_mixup": inert(UNUSED),
        "ct_loss": inert(UNUSED),
        "w_loss": inert(UNUSED),
        "eval_name": inert("a label of the evaluation"),
        "eval_bs": to("eval_batch_size"),
        "eval_num_workers": inert("data-loader workers"),
        "eval_save_performances": inert("writes per-class pickles; avlowshot's result.json holds them"),
        "load_path_stage_A": inert(PATHS),
        "load_path_stage_B": inert(PATHS),
        "transformer_average_features": inert("not read by the model"),
        "audio_only": need(False, why="only triggers an assertion in the reference; there is no unimodal path"),
        "video_only": need(False, why="only triggers an assertion in the reference; there is no unimodal path"),
        "transformer_embedding_time_len": inert("read only by the 'fixed' time embedding, which is refused"),
    }


def _fusion_model() -> dict[str, Rule]:
    """Token-fusion arguments of TCAF and AV-DIFF, under the same names in avlowshot's configs."""
    keys = (
        "embeddings_hidden_size", "decoder_hidden_size", "embedding_dropout", "decoder_dropout",
        "embeddings_batch_norm", "transformer_dim", "transformer_depth", "transformer_heads", "transformer_dim_head",
        "transformer_mlp_dim", "transformer_dropout", "transformer_embedding_dim", "transformer_embedding_dropout",
        "transformer_embedding_modality",
    )  # fmt: skip
    rules = {k: to(f"model.{k}") for k in keys}
    rules["transformer_embedding_fourier_scale"] = to("model.transformer_embedding_fourier_scale", _float)
    rules["transformer_embedding_time_embed_type"] = to(
        "model.transformer_embedding_time_embed_type",
        allowed=("sinusoid", "none"),
        why="the 'fixed' (learned table) time embedding is not implemented by avlowshot",
    )
    rules["transformer_use_class_token"] = need(True, why="the model always reads the class token")
    rules["batch_seqlen_train"] = derived("model.train_window")
    rules["batch_seqlen_train_maxlen"] = derived("model.train_window")
    rules["batch_seqlen_train_trim"] = need("random", why="training windows start at random in avlowshot")
    rules["batch_seqlen_test"] = derived("model.test_window")
    rules["batch_seqlen_test_maxlen"] = derived("model.test_window")
    rules["batch_seqlen_test_trim"] = need("center", why="evaluation windows are centred in avlowshot")
    return rules


def _window(args: dict[str, Any], mode_key: str, len_key: str) -> int | None:
    mode = args.get(mode_key, "max")
    if mode == "max":
        return None
    if mode == "fixed":
        return int(args[len_key])
    raise ValueError(f"'{mode_key}' is {mode!r}; expected max or fixed")


# ----------------------------------------------------------------------------------------------------------------
# Per method


def _avca_rules() -> dict[str, Rule]:
    r = _common()
    for k in ("embeddings_hidden_size", "decoder_hidden_size", "depth_transformer", "additional_triplets_loss",
              "reg_loss"):  # fmt: skip
        r[k] = to(f"model.{k}")
    for k in ("embedding_dropout", "decoder_dropout", "additional_dropout", "momentum"):
        r[k] = to(f"model.{k}", _float)
    r["first_additional_triplet"] = to("model.first_additional_triplet", _float)
    r["second_additional_triplet"] = to("model.second_additional_triplet", _float)
    r["AVCA"] = need(True, why="without --AVCA the reference trains AVGZSLNet, which avlowshot does not have")
    r["z_score_inputs"] = inert("parsed, never applied by AVCA's data path")
    r["dropout_baselines"] = inert("read by the DEVISE / CJME baselines only")
    return r


def _tcaf_rules() -> dict[str, Rule]:
    r = {**_common(), **_sequence_common(), **_fusion_model()}
    for k in ("cross_entropy_loss", "reg_loss", "rec_loss", "transformer_use_embedding_net"):
        r[k] = to(f"model.{k}")
    r["additional_dropout"] = to("model.additional_dropout", _float)
    r["use_self_attention"] = derived("model.attention")
    r["use_cross_attention"] = derived("model.attention")
    r["new_model_sequence"] = need(True, why="without it the reference builds another model")
    r["selavi"] = context("selavi")
    r["transformer_embedding_embed_augment_position"] = need(
        False, why="random time offsets of the embedding are not implemented by avlowshot"
    )
    return r


def _tcaf_derive(args: dict[str, Any]) -> dict[str, Any]:
    s, c = bool(args.get("use_self_attention", True)), bool(args.get("use_cross_attention", True))
    if not (s or c):
        raise ValueError(
            "'use_self_attention' and 'use_cross_attention' are both false: the reference then applies no mask at all "
            "(padding attended), which avlowshot does not reproduce"
        )
    return {
        "model.attention": "full" if s and c else ("cross" if c else "self"),
        "model.train_window": _window(args, "batch_seqlen_train", "batch_seqlen_train_maxlen"),
        "model.test_window": _window(args, "batch_seqlen_test", "batch_seqlen_test_maxlen"),
    }


CLIPCLAP_FUSION_UNUSED = "a TCAF argument the ClipClap model does not read"


def _clipclap_rules() -> dict[str, Rule]:
    r = {**_common(), **_sequence_common()}
    for k in ("decoder_hidden_size", "rec_loss", "reg_loss", "cross_entropy_loss", "modality"):
        r[k] = to(f"model.{k}")
    r["decoder_dropout"] = to("model.decoder_dropout", _float)
    r["additional_dropout"] = to("model.additional_dropout", _float)
    r["word_embeddings"] = derived("model.text")
    r["use_wavcaps_embeddings"] = need(True, why="the clipclap layout reads the CLIP and the WavCaps-CLAP text")
    r["embeddings_batch_norm"] = need(True, why="avlowshot's ClipClap always has the hidden BatchNorm")
    r["best_model_criterion"] = need("score", why="the evaluation reads the *_score.pt checkpoint")
    r["new_model_sequence"] = need(True, why="without it the reference builds another model")
    r["data_parallel"] = inert("only prefixes 'module.' to the saved keys, which the import strips")
    r["eval_modality"] = inert(UNUSED)
    r["selavi"] = inert("collator rates only; the CLIP/CLAP features have one vector per video")
    r["reg_loss"] = to("model.reg_loss")
    for k in ("embedding_dropout", "embeddings_hidden_size", "transformer_use_embedding_net",
              "transformer_use_class_token", "use_self_attention", "use_cross_attention",
              "transformer_embedding_embed_augment_position", "transformer_embedding_time_embed_type",
              "transformer_embedding_fourier_scale", "transformer_embedding_modality", "transformer_embedding_dropout",
              "transformer_embedding_dim", "transformer_dim", "transformer_depth", "transformer_heads",
              "transformer_dim_head", "transformer_mlp_dim", "transformer_dropout"):  # fmt: skip
        r[k] = inert(CLIPCLAP_FUSION_UNUSED)
    for k in ("batch_seqlen_train", "batch_seqlen_train_maxlen", "batch_seqlen_train_trim", "batch_seqlen_test",
              "batch_seqlen_test_maxlen", "batch_seqlen_test_trim"):  # fmt: skip
        r[k] = inert("no effect: the CLIP/CLAP features have one vector per video")
    r["input_size_audio"] = inert("not read by ClipClap (its input widths come from the features)")
    r["input_size_video"] = inert("not read by ClipClap (its input widths come from the features)")
    r["input_size"] = inert("not read by ClipClap (its input widths come from the features)")
    return r


def _clipclap_derive(args: dict[str, Any]) -> dict[str, Any]:
    modality = args.get("modality", "both")
    words = args.get("word_embeddings", "both")
    if modality != "both":
        return {"model.text": "auto"}  # the reference ignores --word_embeddings here: CLAP (audio) / CLIP (video)
    text = {"both": "both", "clip": "clip", "wavcaps": "clap"}.get(words)
    if text is None:
        raise ValueError(f"'word_embeddings' is {words!r}; expected clip, wavcaps or both")
    return {"model.text": text}


def _avdiff_rules() -> dict[str, Rule]:
    r = {**_common(), **_sequence_common(), **_fusion_model()}
    for k in ("layer_change_attention", "output_dimension_transformer", "diffusion_steps", "generator_hidden_size",
              "number_layers_diffusion", "use_diffusion_batch_norm", "calibration_net_hidden_size"):  # fmt: skip
        r[k] = to(f"model.{k}")
    r["diffusion_dropout_value"] = to("model.diffusion_dropout_value", _float)
    r["epochs_fine_tune"] = to("substage_epochs.full")
    r["batch_seqlen_val_maxlen"] = derived("model.val_window")
    r["transformer_use_embedding_net"] = need(True, why="avlowshot's AV-DIFF always has A_enc / V_enc")
    r["cross_entropy_loss"] = need(True, why="the reference needs it (labels are remapped by it)")
    r["final_model"] = need(True, why="otherwise the reference stops with 'No correct model name.'")
    r["attention_type"] = need("m_to_o_stream", why="the only attention type the reference implements")
    r["embedding_type"] = need("w2v_embedding", why="the avdiff layout reads the 300-d word2vec class embeddings")
    r["freeze_model"] = need(True, why="avlowshot's full substage always freezes the fusion part")
    r["selavi"] = need(False, why="the avdiff layout has VGGish / C3D rows of 0.96 s / 0.64 s")
    r["logits_length"] = context("logits_length")
    r["text_embeddings_file"] = context("text_file")
    r["use_diffusion_model"] = inert("parsed, but the reference always uses the diffusion model")
    r["use_calibration"] = inert(UNUSED)
    r["detach_output"] = inert(UNUSED)
    r["learn_calibration_fake"] = inert(UNUSED)
    r["discriminator_hidden_size"] = inert(UNUSED)
    r["latent_generator"] = inert(UNUSED)
    r["additional_dropout"] = inert(UNUSED)
    r["reg_loss"] = inert(UNUSED)
    r["rec_loss"] = inert(UNUSED)
    r["new_model_sequence"] = inert("passed to the metric, unused")
    r["use_self_attention"] = inert("unused: the hybrid attention follows layer_change_attention")
    r["use_cross_attention"] = inert("unused: the hybrid attention follows layer_change_attention")
    r["transformer_embedding_embed_augment_position"] = inert(
        "no effect: the random offset applies only without time stamps, and the model always passes them"
    )
    for k in ("TCAF", "TSL", "bmt", "zorro", "sldg_tav", "hierarchical_perceiver", "AVCA", "AVCA_cls",
              "AVCA_cls_original"):  # fmt: skip
        r[k] = inert("a model flag of the code base with no implementation behind it")
    return r


def _avdiff_derive(args: dict[str, Any]) -> dict[str, Any]:
    out = {
        "model.train_window": _window(args, "batch_seqlen_train", "batch_seqlen_train_maxlen"),
        "model.test_window": _window(args, "batch_seqlen_test", "batch_seqlen_test_maxlen"),
        "model.diffusion": True,
    }
    out["model.val_window"] = (
        None if args.get("batch_seqlen_test", "max") == "max" else int(args["batch_seqlen_val_maxlen"])
    )
    return out


# ----------------------------------------------------------------------------------------------------------------
# State-dict keys


def _strip_module(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``data_parallel`` checkpoints prefix every key with ``module.``; the references strip it when loading."""
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state.items()}


def _embedding_block(state: dict[str, torch.Tensor], block: str) -> dict[str, torch.Tensor]:
    """TCAF's block keeps ``fourier_randn`` / ``fourier_embeddings`` directly; avlowshot nests them in
    ``time_embedding``."""
    out = {}
    for k, v in state.items():
        for name in ("fourier_randn", "fourier_embeddings."):
            if k.startswith(f"{block}.{name}"):
                k = f"{block}.time_embedding.{k[len(block) + 1 :]}"
                break
        out[k] = v
    return out


class KeyMapError(ValueError):
    pass


def _drop_alias(state: dict[str, torch.Tensor], alias: str, of: str) -> dict[str, torch.Tensor]:
    """Remove the keys of a module registered twice (``alias`` = ``of``), after checking they hold the same
    tensors."""
    out = {}
    for k, v in state.items():
        if k.startswith(alias + "."):
            twin = of + k[len(alias) :]
            if twin not in state:
                raise KeyMapError(f"'{k}' has no counterpart '{twin}' (the two names are one module in the reference)")
            if state[twin].shape != v.shape or not torch.equal(state[twin], v):
                raise KeyMapError(f"'{k}' differs from '{twin}', but the two names are one module in the reference")
            continue
        out[k] = v
    return out


def _rename_prefix(state: dict[str, torch.Tensor], old: str, *new: str) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        if k.startswith(old):
            for n in new:
                out[n + k[len(old) :]] = v
        else:
            out[k] = v
    return out


def _tcaf_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = _drop_alias(state, "audiovisual_embeddings", "position_encoder_block")
    return _embedding_block(state, "position_encoder_block")


def _avdiff_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = _embedding_block(state, "position_encoder_block")
    state = _rename_prefix(state, "generator.fc.", "generator.net.", "diffusion.eps_model.net.")
    return _rename_prefix(state, "discriminator_seen_novel.fc.", "discriminator_seen_novel.net.")


# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """One reference code base: where its files are and how its arguments and keys map."""

    method: str  # avlowshot method name
    title: str
    repository: str
    model_class: str  # prefix of its checkpoint files: <model_class>_score.pt, checkpoints/<..>_score_ckpt_<e>.pt
    layouts: tuple[str, ...]  # the avlowshot layouts of the features it trains on
    rules: dict[str, Rule]
    derive: Callable[[dict[str, Any]], dict[str, Any]] = lambda args: {}
    key_map: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] = lambda s: s
    signature: tuple[str, ...] = ()  # key prefixes only this reference's state dicts have
    repeats: tuple[str, ...] = ("checkpoints",)  # stage-2 checkpoint folders (AV-DIFF: one per shot repeat)
    weights: str = ""  # where the authors link their trained models (specs)
    notes: list[str] = field(default_factory=list)


REFERENCES: dict[str, Reference] = {
    "avca": Reference(
        "avca", "AVCA (CVPR 2022)", "https://github.com/ExplainableML/AVCA-GZSL", "AVCA", ("avca-cls", "avca-main"),
        _avca_rules(), signature=("pos_emb1D", "cross_attention."),
        weights="Google Drive zips linked from the repository README",
    ),
    "tcaf": Reference(
        "tcaf", "TCAF (ECCV 2022)", "https://github.com/ExplainableML/TCAF-GZSL", "Multimodal_Sequence_Transformer",
        ("tcaf-cls", "tcaf-main"), _tcaf_rules(), _tcaf_derive, _tcaf_keys,
        signature=("audiovisual_embeddings.", "D_w.", "D_o."),
        weights="a Google Drive link in the repository README",
    ),
    "clipclap": Reference(
        "clipclap", "ClipClap-GZSL (CVPRW 2024)", "https://github.com/dkurzend/ClipClap-GZSL", "ClipClap_model",
        ("clipclap",), _clipclap_rules(), _clipclap_derive, signature=("O_enc.", "W_enc."),
        weights="a Google Drive link in the repository README",
    ),
    "avdiff": Reference(
        "avdiff", "AV-DIFF (GCPR 2023)", "https://github.com/ExplainableML/AVDIFF-GFSL", "AVDiff", ("avdiff",),
        _avdiff_rules(), _avdiff_derive, _avdiff_keys, signature=("generator.", "discriminator_seen_novel."),
        repeats=("checkpoints", "checkpoints_1", "checkpoints_2"),
        weights="models.zip on mlcloud.uni-tuebingen.de, linked from the repository README",
    ),
}  # fmt: skip


def reference(name: str) -> Reference:
    try:
        return REFERENCES[name]
    except KeyError:
        from avlowshot.errors import ConfigError

        raise ConfigError(f"--from {name}: expected one of {', '.join(REFERENCES)}") from None


def guess_reference(state: dict[str, torch.Tensor]) -> str | None:
    """The reference whose state dicts have the signature keys of ``state`` (to name the method of a checkpoint
    imported as another)."""
    hits = [name for name, ref in REFERENCES.items() if all(any(k.startswith(p) for k in state) for p in ref.signature)]
    return hits[0] if len(hits) == 1 else None


def map_state_dict(ref: Reference, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return ref.key_map(_strip_module(dict(state)))
