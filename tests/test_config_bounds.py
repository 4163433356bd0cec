"""Hostile configs fail as config errors, quickly, in little memory and with a short message: non-finite numbers,
seeds beyond 64 bits, absurd epoch sizes, duplicate keys, YAML alias bombs, huge ints, deep nesting, huge files."""

from __future__ import annotations

import resource
import time
from pathlib import Path

import pytest

from avlowshot.errors import ConfigError
from avlowshot.train.config import load_config


def _load(tmp_path: Path, text: str | None = None, **kw):
    path = None
    if text is not None:
        path = tmp_path / "cfg.yaml"
        path.write_text(text)
    return load_config(path, method="avca", dataset="UCF", feature_set="cls", **kw)


def _base() -> str:
    return "method: avca\nfeature_set: cls\ndataset: UCF\n"


@pytest.mark.parametrize(
    ("sets", "match"),
    [
        (["lr=.inf"], "'lr': Input should be a finite number"),
        (["lr=.nan"], "'lr': Input should be a finite number"),
        (["weight_decay=-.inf"], "'weight_decay'"),
        (["model.first_additional_triplet=.inf"], "'model.first_additional_triplet': must be a finite number"),
        ([f"seed={2**64}"], "'seed': Input should be less than or equal to 18446744073709551615"),
        (["seed=-1"], "'seed'"),
        (["n_batches=1000000000000"], "'n_batches'"),
        (["n_batches=1000000", "batch_size=100000"], "samples per epoch"),
        (["epochs=1000000000"], "'epochs'"),
    ],
)
def test_absurd_values_are_config_errors(sets, match):
    with pytest.raises(ConfigError, match=match) as info:
        load_config(None, method="avca", dataset="UCF", feature_set="cls", overrides=sets)
    assert "--set" in str(info.value) or "samples per epoch" in str(info.value)


def test_seed_option_beyond_64_bits_and_the_largest_allowed(tmp_path):
    with pytest.raises(ConfigError, match="'seed'"):
        _load(tmp_path, seed=2**70)
    assert _load(tmp_path, seed=2**64 - 1).seed == 2**64 - 1


def test_inf_in_a_yaml_file_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"cfg.yaml: 'lr': Input should be a finite number"):
        _load(tmp_path, _base() + "lr: .inf\n")


def test_duplicate_keys_are_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"line 5.*the key 'lr' is given twice \(first at line 4\)"):
        _load(tmp_path, _base() + "lr: 0.1\nlr: 0.2\n")
    with pytest.raises(ConfigError, match=r"the key 'momentum' is given twice"):
        _load(tmp_path, _base() + "model:\n  momentum: 0.9\n  momentum: 0.5\n")
    # a key merged in with << may be overridden: that is what merge keys are for
    merged = _load(tmp_path, _base() + "model:\n  <<: {momentum: 0.9, reg_loss: false}\n  momentum: 0.5\n")
    assert merged.model["momentum"] == 0.5 and merged.model["reg_loss"] is False


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_an_alias_bomb_gives_a_short_error_quickly(tmp_path):
    """Nine levels of nine aliases: 387 million elements if expanded; the message echoes a few of them."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]")
    text = _base() + "\n".join(lines) + "\n"
    # as the value of real keys (top level and model section) and of unknown ones
    text += "lr: *a8\nmodel:\n  momentum: *a8\n  first_additional_triplet: *a7\n"
    peak, t0 = _peak_mb(), time.perf_counter()
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text)
    assert time.perf_counter() - t0 < 20 and _peak_mb() - peak < 200
    msg = str(info.value)
    assert len(msg) < 3000 and "'lr'" in msg and "unknown key" in msg


def test_many_errors_are_capped(tmp_path):
    text = _base() + "".join(f"unknown_{i}: 1\n" for i in range(60))
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text)
    assert "... and 50 more" in str(info.value) and len(str(info.value)) < 5000


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("seed: " + "7" * 5000 + "\n", "not a config"),  # Python refuses to convert ints of > 4300 digits
        ("lr: " + "[" * 5000 + "]" * 5000 + "\n", "not a config"),  # nesting deeper than the recursion limit
        ("lr: 1\n" + "#" * (2 << 20) + "\n", "bytes is not a config"),
        ("lr: [" + "x" * 100_000 + "\n", "not valid YAML"),
    ],
)
def test_hostile_yaml_fails_as_a_config_error(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match) as info:
        _load(tmp_path, text)
    assert len(str(info.value)) < 1000


def test_hostile_set_values_fail_as_config_errors():
    for item in ("lr=" + "[" * 5000, "seed=" + "9" * 5000):
        with pytest.raises(ConfigError, match="--set") as info:
            load_config(None, method="avca", dataset="UCF", feature_set="cls", overrides=[item])
        assert len(str(info.value)) < 1000
