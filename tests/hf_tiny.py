"""Tiny random CLIP and CLAP folders in the Hugging Face format, built locally (no download), for the extract tests.

Each folder is what ``save_pretrained`` writes for a model, a tokenizer and a processor:

* CLIP: a character-level CLIP BPE tokenizer (the 256 byte symbols and their ``</w>`` forms, no merges), a 1-layer
  text and vision tower (image 224, patch 32: 49 patches) and the stock CLIPImageProcessor (224 crop).
* CLAP: a character-level byte-level BPE Roberta tokenizer (no merges), a 1-layer text tower, a 2-stage HTSAT audio
  tower with the stock sizes of the spectrogram (64 mels, spec 256) but tiny widths, and the stock 48 kHz
  ClapFeatureExtractor.
"""

from __future__ import annotations

from pathlib import Path

CLIP_DIM = 8  # projection_dim of the tiny CLIP
CLAP_DIM = 12  # projection_dim of the tiny CLAP


def _byte_symbols() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values())


def make_tiny_clip(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:  # transformers 4
        from transformers import CLIPImageProcessor as ImageProcessor

    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    eot = vocab["<|endoftext|>"]
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            eos_token_id=eot,
            pad_token_id=eot,
            bos_token_id=vocab["<|startoftext|>"],
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=224,
            patch_size=32,
        ),
        projection_dim=CLIP_DIM,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    ImageProcessor().save_pretrained(folder)
    return folder


def make_tiny_clap(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, RobertaTokenizer

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for s in _byte_symbols():
        vocab[s] = len(vocab)
    vocab["<mask>"] = len(vocab)
    tok = RobertaTokenizer(vocab=vocab, merges=[], model_max_length=128)
    config = ClapConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=136,
            type_vocab_size=1,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
        ),
        audio_config=dict(
            depths=[1, 1],
            num_attention_heads=[1, 2],
            patch_embeds_hidden_size=8,
            hidden_size=16,
            window_size=8,
            num_hidden_layers=2,
        ),
        projection_dim=CLAP_DIM,
    )
    torch.manual_seed(seed)
    model = ClapModel(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    ClapFeatureExtractor(frequency_min=50, frequency_max=14000, truncation="rand_trunc").save_pretrained(folder)
    return folder


def make_tiny_weights(root: Path, seed: int = 0) -> Path:
    """``root/clip`` and ``root/clap``: the folder layout ``ClipClapExtractor.from_weights`` and ``clip+clap`` take."""
    make_tiny_clip(root / "clip", seed)
    make_tiny_clap(root / "clap", seed)
    return root
