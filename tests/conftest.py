from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from avlowshot.data.synth import write_synthetic

# rich fixes a console's width at creation when COLUMNS is set, and pytest-xdist's workers start with COLUMNS=80:
# tests that pass their own COLUMNS to a command need the width read per call, as in a plain run.
os.environ.pop("COLUMNS", None)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per core this process may use, at most 4 (a container's CPU quota does not show in
    the core count, and every worker holds its own torch and synthetic data)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cores, 4)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Commands run without --cache-dir cache into a temporary folder, never the user's cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("AVLOWSHOT_CACHE_DIR", str(tmp_path_factory.mktemp("user-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """``synth_root(layout, dataset="UCF", scale=0.03, seed=0, shots=None)``: a synthetic root, written once."""
    made: dict[tuple, Path] = {}

    def make(layout: str, dataset: str = "UCF", scale: float = 0.03, seed: int = 0, shots: int | None = None) -> Path:
        key = (layout, dataset, scale, seed, shots)
        if key not in made:
            out = tmp_path_factory.mktemp("synth") / dataset
            made[key] = write_synthetic(layout, dataset, out, scale=scale, seed=seed, shots=shots)
        return made[key]

    return make


@pytest.fixture
def one_thread():
    """One torch intra-op thread: the small test models gain nothing from more, and on a busy 2-core CI box the
    extra threads only add contention (measured: a step 30x slower under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cache_dir(tmp_path):
    return tmp_path / "cache"
