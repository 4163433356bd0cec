"""Class-name encoders: word vectors, CLIP / CLAP text (tiny random folders), the real bundled MiniLM, and the
embedding file writer."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gensim")

from avlowshot.errors import DataError, WeightsError  # noqa: E402
from avlowshot.extract.clipclap_features import features_of  # noqa: E402
from avlowshot.extract.text import (  # noqa: E402
    CLAP_TEMPLATES,
    CLAP_TEMPLATES_VGGSOUND,
    CLIP_TEMPLATES,
    CLIP_TEMPLATES_VGGSOUND,
    ENCODER_SUFFIX,
    ClapTextEncoder,
    ClipClapTextEncoder,
    ClipTextEncoder,
    MiniLMEncoder,
    W2VEncoder,
    build_text_encoder,
    read_encoder_spec,
    save_embeddings,
)
from hf_tiny import CLAP_DIM, CLIP_DIM, make_tiny_weights  # noqa: E402

NAMES = ["Apply Eye Makeup", "playing guitar", "Yo Yo"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.set_num_threads(1)
    return make_tiny_weights(tmp_path_factory.mktemp("w"))


@pytest.fixture(scope="module")
def clip(weights):
    return ClipTextEncoder(weights / "clip")


@pytest.fixture(scope="module")
def clap(weights):
    return ClapTextEncoder(weights / "clap")


@pytest.fixture(scope="module")
def minilm():
    torch.set_num_threads(1)
    return MiniLMEncoder()


# ---------------------------------------------------------------------------------------------------------------
# Templates


def test_template_lists_as_in_the_reference():
    assert len(CLIP_TEMPLATES) == 48 and len(set(CLIP_TEMPLATES)) == 48
    assert CLIP_TEMPLATES[:5] == (
        "a photo of a person {}.",
        "a video of a person {}.",
        "a example of a person {}.",
        "a demonstration of a person {}.",
        "a photo of the person {}.",
    )
    assert CLIP_TEMPLATES[8] == "a photo of a person using {}."
    assert CLIP_TEMPLATES[-1] == "a demonstration of the person practicing {}."
    assert len(CLAP_TEMPLATES) == 30 and len(set(CLAP_TEMPLATES)) == 30
    assert CLAP_TEMPLATES[0] == "a person {} can be heard."
    assert CLAP_TEMPLATES[16] == "a example of a person during {} can be heard."
    assert CLAP_TEMPLATES[-1] == "a demonstration of the person practicing {} can be heard."
    assert len(CLIP_TEMPLATES_VGGSOUND) == 8 and CLIP_TEMPLATES_VGGSOUND[5] == "a video of the {}."
    assert len(CLAP_TEMPLATES_VGGSOUND) == 9 and CLAP_TEMPLATES_VGGSOUND[6] == "{} can be heard."
    for t in CLIP_TEMPLATES + CLAP_TEMPLATES + CLIP_TEMPLATES_VGGSOUND + CLAP_TEMPLATES_VGGSOUND:
        assert t.count("{}") == 1


# ---------------------------------------------------------------------------------------------------------------
# CLIP / CLAP text


def _direct(enc, name):
    """The reference's formula, one prompt per model call: normalise each, mean, normalise."""
    rows = []
    for t in enc.templates:
        batch = enc.bundle.tokenizer([t.format(name)], return_tensors="pt")
        with torch.inference_mode():
            f = features_of(
                enc.bundle.model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            )
        f = f[0].double().numpy()
        rows.append(f / np.linalg.norm(f))
    m = np.mean(rows, axis=0)
    return m / np.linalg.norm(m)


@pytest.mark.parametrize("which,dim,count", [("clip", CLIP_DIM, 48), ("clap", CLAP_DIM, 30)])
def test_template_encoder(request, which, dim, count):
    enc = request.getfixturevalue(which)
    assert enc.name == which and enc.dim == dim and len(enc.templates) == count
    x = enc.encode(NAMES)
    assert x.shape == (3, dim) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1, atol=1e-6)
    # batched (padded) computation = one prompt at a time
    for i, name in enumerate(NAMES):
        np.testing.assert_allclose(x[i], _direct(enc, name), atol=1e-5)
    np.testing.assert_array_equal(x, enc.encode(NAMES))  # deterministic
    np.testing.assert_allclose(enc.encode(NAMES[1:2])[0], x[1], atol=1e-6)  # independent of the batch
    assert enc.encode([]).shape == (0, dim)
    spec = enc.spec()
    assert spec["encoder"] == which and spec["dim"] == dim and spec["templates"] == count
    json.dumps(spec)


def test_small_batches_give_the_same_vectors(weights, clip):
    small = ClipTextEncoder(weights / "clip", batch_size=7)
    np.testing.assert_allclose(small.encode(NAMES), clip.encode(NAMES), atol=1e-6)
    assert small.spec() == clip.spec()  # the same encoder gives the same spec


def test_vggsound_templates(weights, clip):
    vgg = ClipTextEncoder(weights / "clip", templates="vggsound")
    assert len(vgg.templates) == 8
    assert vgg.spec() != clip.spec()
    assert not np.allclose(vgg.encode(NAMES), clip.encode(NAMES))
    with pytest.raises(DataError, match="template set"):
        ClipTextEncoder(weights / "clip", templates="nope")


def test_clip_plus_clap(weights, clip, clap):
    both = build_text_encoder("clip+clap", weights)
    assert isinstance(both, ClipClapTextEncoder) and both.dim == CLIP_DIM + CLAP_DIM
    assert both.parts[0].spec() == clip.spec() and both.parts[1].spec() == clap.spec()
    a, b = both.encode_parts(NAMES)
    x = both.encode(NAMES)
    np.testing.assert_array_equal(x, np.concatenate([a, b], axis=1))
    np.testing.assert_allclose(a, clip.encode(NAMES), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(x[:, :CLIP_DIM], axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(x[:, CLIP_DIM:], axis=1), 1, atol=1e-6)
    assert both.spec()["dim"] == CLIP_DIM + CLAP_DIM


def test_build_text_encoder_folders_and_errors(tmp_path, weights, clip):
    # clip / clap take the model folder or its parent (the extractor's weights folder)
    assert build_text_encoder("clip", weights).spec() == clip.spec()
    assert build_text_encoder("clip", weights / "clip").spec() == clip.spec()
    assert build_text_encoder("clap", weights).dim == CLAP_DIM
    # the spec does not depend on where the weights lie, only on their content
    shutil.copytree(weights / "clip", tmp_path / "moved" / "clip")
    assert build_text_encoder("clip", tmp_path / "moved").spec() == clip.spec()
    for name in ("w2v", "clip", "clap", "clip+clap"):
        with pytest.raises(WeightsError, match="needs weights"):
            build_text_encoder(name, None)
    with pytest.raises(WeightsError) as err:
        build_text_encoder("clip", tmp_path / "none")
    assert str(tmp_path / "none") in str(err.value) and "fix:" in str(err.value)
    with pytest.raises(WeightsError, match=str(tmp_path / "empty" / "clap")):
        (tmp_path / "empty" / "clip").mkdir(parents=True)
        shutil.copytree(weights / "clip", tmp_path / "empty" / "clip", dirs_exist_ok=True)
        build_text_encoder("clip+clap", tmp_path / "empty")
    with pytest.raises(WeightsError, match="model_type 'clap', expected 'clip'"):
        build_text_encoder("clip", weights / "clap")
    with pytest.raises(WeightsError, match="folder"):
        build_text_encoder("w2v", tmp_path)
    with pytest.raises(DataError, match="unknown text encoder"):
        build_text_encoder("bert", None)


# ---------------------------------------------------------------------------------------------------------------
# Word vectors


@pytest.fixture(scope="module")
def kv():
    from gensim.models import KeyedVectors

    words = ["playing", "guitar", "violin", "horse", "riding", "apply", "Eye", "makeup", "yo"]
    rng = np.random.default_rng(0)
    k = KeyedVectors(vector_size=6)
    k.add_vectors(words, rng.normal(size=(len(words), 6)).astype(np.float32))
    return k


@pytest.mark.parametrize("suffix,binary", [(".txt", False), (".vec", False), (".bin", True)])
def test_word2vec_mean_of_words(tmp_path, kv, suffix, binary):
    path = tmp_path / f"vectors{suffix}"
    kv.save_word2vec_format(str(path), binary=binary)
    enc = W2VEncoder(path)
    assert enc.kind == "word2vec" and enc.dim == 6
    x = enc.encode(["playing guitar", "Apply Eye Makeup", "yo_yo", "horse riding,"])
    assert x.dtype == np.float32 and x.shape == (4, 6)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1, atol=1e-6)

    def unit(v):
        return v / np.linalg.norm(v)

    np.testing.assert_allclose(x[0], unit((kv["playing"] + kv["guitar"]) / 2), atol=1e-6)
    # as written first ("Eye"), then lower-cased ("Apply" -> "apply", "Makeup" -> "makeup")
    np.testing.assert_allclose(x[1], unit(kv["apply"] + kv["Eye"] + kv["makeup"]), atol=1e-6)
    np.testing.assert_allclose(x[2], unit(kv["yo"]), atol=1e-6)
    np.testing.assert_allclose(x[3], unit(kv["horse"] + kv["riding"]), atol=1e-6)
    with pytest.raises(DataError) as err:
        enc.encode(["playing banjo"])
    msg = str(err.value)
    assert "'banjo'" in msg and "'playing banjo'" in msg and str(path) in msg


def test_fasttext_whole_name(tmp_path):
    from gensim.models import FastText
    from gensim.models.fasttext import load_facebook_vectors, save_facebook_model

    sentences = [["playing", "guitar", "loudly"], ["playing", "violin"], ["horse", "riding", "fast"]] * 5
    model = FastText(vector_size=8, window=2, min_count=1, min_n=2, max_n=4, bucket=500, epochs=2, seed=1, workers=1)
    model.build_vocab(corpus_iterable=sentences)
    model.train(corpus_iterable=sentences, total_examples=len(sentences), epochs=2)
    path = tmp_path / "tiny.bin"
    save_facebook_model(model, str(path))
    enc = build_text_encoder("w2v", path)
    assert isinstance(enc, W2VEncoder) and enc.kind == "fasttext" and enc.dim == 8
    ref = load_facebook_vectors(str(path))
    x = enc.encode(["playing guitar", "violin", "Body Weight Squats"])  # no out-of-vocabulary names
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1, atol=1e-6)
    for row, name in zip(x, ["playing guitar", "violin", "Body Weight Squats"], strict=True):
        v = ref.get_vector(name)  # the whole string, subword n-grams (fastText get_word_vector)
        np.testing.assert_allclose(row, v / np.linalg.norm(v), atol=1e-6)
    assert enc.spec()["kind"] == "fasttext"


def test_w2v_file_errors(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        W2VEncoder(tmp_path / "missing.bin")
    bad = tmp_path / "bad.txt"
    bad.write_text("not a header\n")
    with pytest.raises(WeightsError, match="not a readable"):
        W2VEncoder(bad)
    other = tmp_path / "vectors.npz"
    other.write_bytes(b"x")
    with pytest.raises(WeightsError, match="unknown word-vector file type"):
        W2VEncoder(other)


# ---------------------------------------------------------------------------------------------------------------
# MiniLM, the real bundled model


def test_minilm_real(minilm):
    assert minilm.dim == 384
    x = minilm.encode(["playing guitar", "playing violin", "horse riding"])
    assert x.shape == (3, 384) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    sim = x @ x.T
    assert sim[0, 1] > sim[0, 2] + 0.1
    assert sim[0, 1] > sim[1, 2]
    np.testing.assert_allclose(minilm.encode(["horse riding"])[0], x[2], atol=1e-5)
    assert minilm.spec()["source"] == "sentence-transformers/all-MiniLM-L6-v2"


def test_specs_differ_between_encoders(tmp_path, kv, clip, clap, minilm, weights):
    path = tmp_path / "v.txt"
    kv.save_word2vec_format(str(path))
    specs = [
        clip.spec(),
        clap.spec(),
        build_text_encoder("clip+clap", weights).spec(),
        W2VEncoder(path).spec(),
        minilm.spec(),
        ClapTextEncoder(weights / "clap", "vggsound").spec(),
    ]
    dumped = [json.dumps(s, sort_keys=True) for s in specs]
    assert len(set(dumped)) == len(dumped)
    assert W2VEncoder(path).spec() == specs[3]
    assert build_text_encoder("minilm", None).spec() == minilm.spec()


# ---------------------------------------------------------------------------------------------------------------
# Files


def test_save_embeddings_round_trip(tmp_path, clip):
    from avlowshot.data import layouts

    assert ENCODER_SUFFIX == layouts.ENCODER_SUFFIX
    path = tmp_path / "text" / "word_embeddings_ucf_normed.npy"
    x = clip.encode(NAMES)
    assert read_encoder_spec(path) is None
    assert save_embeddings(path, NAMES, x, clip.spec()) == path
    data = np.load(path, allow_pickle=True).item()
    assert list(data) == NAMES
    for name, row in zip(NAMES, x, strict=True):
        assert data[name].dtype == np.float32 and data[name].shape == (CLIP_DIM,)
        np.testing.assert_array_equal(data[name], row)
    assert read_encoder_spec(path) == clip.spec()
    assert (tmp_path / "text" / ("word_embeddings_ucf_normed.npy" + ENCODER_SUFFIX)).is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.name + ENCODER_SUFFIX]  # no tmp left

    # overwrite with fewer classes and another spec
    spec2 = dict(clip.spec(), template_set="other")
    save_embeddings(path, NAMES[:1], x[:1], spec2)
    assert list(np.load(path, allow_pickle=True).item()) == NAMES[:1]
    assert read_encoder_spec(path) == spec2


def test_save_embeddings_rejects_bad_input(tmp_path, clip):
    path = tmp_path / "e.npy"
    x = clip.encode(NAMES)
    with pytest.raises(ValueError, match="dim"):
        save_embeddings(path, NAMES, x, {"dim": 3})
    with pytest.raises(ValueError, match="len"):
        save_embeddings(path, NAMES[:2], x, clip.spec())
    with pytest.raises(DataError, match="duplicate"):
        save_embeddings(path, ["a", "a", "b"], x, clip.spec())
    assert not path.exists()
    (tmp_path / ("e.npy" + ENCODER_SUFFIX)).write_text("{oops")
    with pytest.raises(DataError, match="JSON"):
        read_encoder_spec(path)
