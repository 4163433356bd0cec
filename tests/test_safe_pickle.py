"""The restricted unpickler: crafted feature pickles and text .npy files are refused (never a crash), every
allow-listed global refuses its misuse, and every legitimate pickle of numpy data still loads as pickle would."""

from __future__ import annotations

import collections
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import crafted
from avlowshot.data.safe_pickle import safe_loads
from avlowshot.errors import DataError

SRC = str(Path(__file__).resolve().parents[1] / "src")
PROTOCOLS = (2, 3, 4, 5)

# Loads each file in turn in a child process: a segfault ends the child, not the test session, and the last
# "start" line names the file that crashed it.
_DRIVER = """
import json, sys
from avlowshot.data.safe_pickle import load_npy_dict, load_pickle
from avlowshot.errors import DataError
for f in sys.argv[1:]:
    print(json.dumps({"start": f}), flush=True)
    try:
        obj = load_pickle(f) if f.endswith(".pkl") else load_npy_dict(f)
        print(json.dumps({"file": f, "loaded": type(obj).__name__}), flush=True)
    except DataError as exc:
        print(json.dumps({"file": f, "refused": str(exc)}), flush=True)
"""


def _child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}


def _write_crafted(folder: Path) -> list[Path]:
    files = []
    for name in crafted.ALL:
        for p in PROTOCOLS:
            for kind, make in (("pkl", crafted.feature_pickle), ("npy", crafted.text_npy)):
                f = folder / f"{name}-p{p}.{kind}"
                f.write_bytes(make(name, p))
                files.append(f)
    return files


def test_crafted_files_are_refused_in_a_child_process(tmp_path):
    files = _write_crafted(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", _DRIVER, *map(str, files)], capture_output=True, text=True, env=_child_env(), timeout=600
    )
    lines = [json.loads(x) for x in proc.stdout.splitlines()]
    started = [x["start"] for x in lines if "start" in x]
    assert proc.returncode == 0, f"the loader died (rc {proc.returncode}) on {started[-1] if started else '?'}"
    done = {x["file"]: x for x in lines if "file" in x}
    assert len(done) == len(files) == len(crafted.ALL) * len(PROTOCOLS) * 2
    for f in files:
        rec = done[str(f)]
        assert "refused" in rec, f"{f.name} loaded as {rec.get('loaded')}"
        assert rec["refused"].startswith(f"{f}: ")  # the message names the file


# Runs CLI commands in one child process (one import of torch for all), each through typer's runner; prints
# {"args", "exit_code", "output"} per command. A segfault ends the child with a signal instead.
_CLI_DRIVER = """
import json, sys
from typer.testing import CliRunner
from avlowshot.cli import app
for args in json.loads(sys.argv[1]):
    r = CliRunner().invoke(app, args)
    print(json.dumps({"args": args, "exit_code": r.exit_code, "output": r.output}), flush=True)
"""


def test_check_data_and_run_exit_2_naming_the_crafted_file(synth_root, tmp_path):
    """The reported crash: ``video_names`` (or a class vector) forged as an object array from raw bytes."""
    roots = {}
    for where in ("pkl", "npy"):
        roots[where] = root = tmp_path / where / "UCF"
        shutil.copytree(synth_root("tcaf-cls"), root)
    pkl = sorted((roots["pkl"] / "features/cls_features_non_averaged/audio/stage_1_train").glob("*.pkl"))[0]
    pkl.write_bytes(crafted.feature_pickle("ndarray-reduce", 4))
    npy = roots["npy"] / "features/cls_features_non_averaged/text/word_embeddings_ucf_normed.npy"
    npy.write_bytes(crafted.text_npy("ndarray-reduce", 3))
    check = ["check-data", "--layout", "tcaf-cls", "--dataset", "UCF", "--root-dir"]
    run = ["run", "--method", "tcaf", "--layout", "tcaf-cls", "--dataset", "UCF", "--quiet", "--root-dir"]
    run_tail = ["--log-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")]
    commands = [
        ([*check, str(roots["pkl"])], pkl),
        ([*check, str(roots["npy"])], npy),
        ([*run, str(roots["pkl"]), *run_tail], pkl),
    ]
    proc = subprocess.run(
        [sys.executable, "-c", _CLI_DRIVER, json.dumps([args for args, _ in commands])],
        capture_output=True, text=True, env=_child_env(), timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, f"the CLI died (rc {proc.returncode}): {proc.stdout[-500:]} {proc.stderr[-2000:]}"
    results = [json.loads(x) for x in proc.stdout.splitlines()]
    assert len(results) == len(commands)
    for res, (args, target) in zip(results, commands, strict=True):
        out = res["output"].replace("\n", "")
        assert res["exit_code"] == 2, (args[0], res["output"][-1000:])
        assert str(target) in out and "refused to unpickle" in out, res["output"][-1000:]
    assert not any((tmp_path / "cache").glob("*/meta.json"))  # no cache was committed


LEGIT = {
    "f4": np.arange(12, dtype=np.float32).reshape(3, 4),
    "fortran": np.asfortranarray(np.arange(12.0).reshape(3, 4)),
    "big-endian": np.arange(5, dtype=">f4"),
    "i8": np.arange(5),
    "u1": np.arange(5, dtype=np.uint8),
    "bool": np.array([True, False]),
    "complex": np.array([1 + 2j]),
    "f2": np.arange(3, dtype=np.float16),
    "str": np.array(["ab", "cde"]),
    "bytes": np.array([b"ab", b"c"]),
    "object": np.array(["x", 1, None, np.zeros(2, np.float32)], dtype=object),
    "object-empty": np.empty((2, 0), dtype=object),
    "empty": np.zeros((0, 4), np.float32),
    "0-d": np.array(3.5),
    "0-d-object": np.array({"a": [1]}, dtype=object),
    "strided": np.arange(10)[::2],
    "transposed": np.arange(12).reshape(3, 4).T,
    "scalars": [np.float32(1.5), np.int64(3), np.bytes_(b"v_x"), np.str_("v_x"), np.bool_(True)],
    "containers": [{1, 2}, frozenset({"a"}), collections.OrderedDict(a=1), bytearray(b"\x00\xff"), b"", (None, 1.5)],
    "big-int": 10**30,
}


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray):
        if type(b) is not np.ndarray or a.dtype != b.dtype or a.shape != b.shape:
            return False
        return all(map(_same, a.ravel(), b.ravel())) if a.dtype == object else bool(np.array_equal(a, b))
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return type(a) is type(b) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_legitimate_pickles_load_as_pickle_loads_them(protocol):
    for name, value in LEGIT.items():
        data = pickle.dumps(value, protocol=protocol)
        assert _same(pickle.loads(data), safe_loads(data)), name


def test_a_legitimate_dtype_and_array_keep_numpy_flags():
    arr = safe_loads(pickle.dumps(np.array(["a", None], dtype=object), protocol=4))
    assert arr.dtype.hasobject and arr.dtype.flags == np.dtype(object).flags
    assert np.dtype(object).flags == 63  # numpy's own singleton was never touched


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (crafted.R(bytes, (10**12,)), "bytes.* is not allowed"),
        (crafted.R(np.bytes_, (10**9,)), "bytes_.* is not allowed"),
        (crafted.R(set, ("abc",)), "set.* is not allowed"),
        (crafted.R(collections.OrderedDict, ({"a": 1},)), "OrderedDict.* is not allowed"),
        (crafted.R(collections.OrderedDict, (), {"x": 1}), "BUILD on OrderedDict"),
        (crafted.R(np.dtype, ("V8", False, True)), "numpy.dtype.* is not allowed"),
        (crafted.R(np.dtype, ("M8", False, True)), "numpy.dtype.* is not allowed"),
        (crafted.R(np.dtype, ("f4", False, True), (3, "<", None, None, None, 2, -1, 0)), "dtype float32 of 2 bytes"),
    ],
)
def test_each_allowed_global_refuses_its_misuse(value, match):
    for protocol in PROTOCOLS:
        with pytest.raises(DataError, match=match):
            safe_loads(pickle.dumps(value, protocol=protocol), path="x.pkl")


def test_refusal_messages_stay_short():
    # a 100 kB shape tuple in the stream: the message quotes at most a few dozen characters of it
    value = crafted.R(crafted._ma._reconstruct, (np.ndarray, tuple(range(20000)), b"b"))
    with pytest.raises(DataError) as info:
        safe_loads(pickle.dumps(value, protocol=4), path="x.pkl")
    assert len(str(info.value)) < 400
