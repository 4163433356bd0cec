"""Same seed, same numbers: a fixed CPU thread count and deterministic kernels for the whole run.

Floating-point sums depend on how work is split between threads, so a run is reproducible only at a fixed thread
count. Two things made the count float:

* torch turns MKL's dynamic threading off only inside ``torch.set_num_threads``; a process that never calls it (the
  CLI did not) leaves MKL free to pick its own number of threads per call, and on a busy machine it does;
* nothing recorded the count, so a run resumed or re-evaluated with another one silently changed its numbers.

:func:`pinned` sets the count (``--threads``, default: torch's), which also switches MKL's dynamic mode off, turns on
``torch.use_deterministic_algorithms`` (warn-only: an op without a deterministic kernel warns instead of failing a
long run) with cuDNN's deterministic mode, and restores everything afterwards. :func:`pin_environment` sets the
OpenMP / MKL variables that are only read when the libraries load, for commands that run it before importing torch.
The protocol records the count in ``run.json`` and ``result.json`` and refuses to continue a run with another one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from avlowshot.errors import ConfigError
from avlowshot.train.allocator import keep_freed_memory

# read by libgomp / MKL when they load: no team smaller than asked for, no MKL thread count of its own choosing
ENVIRONMENT = {"OMP_DYNAMIC": "FALSE", "MKL_DYNAMIC": "FALSE"}
MAX_THREADS = 1024


def pin_environment() -> None:
    """Set :data:`ENVIRONMENT` (unless the user set them) before torch / numpy load their thread pools."""
    for key, value in ENVIRONMENT.items():
        os.environ.setdefault(key, value)


def check_threads(n: int | None, where: str = "--threads") -> None:
    if n is not None and not (isinstance(n, int) and 1 <= n <= MAX_THREADS):
        raise ConfigError(f"{where} {n}: expected a thread count from 1 to {MAX_THREADS}")


def default_threads() -> int:
    import torch

    return torch.get_num_threads()


@contextlib.contextmanager
def pinned(threads: int | None = None) -> Iterator[int]:
    """Run the block with ``threads`` intra-op threads (None: the current count) and deterministic kernels; yields
    the thread count in use. From the first call on, the process also keeps freed memory for reuse
    (:func:`avlowshot.train.allocator.keep_freed_memory`; not undone on exit)."""
    import torch

    check_threads(threads)
    keep_freed_memory()  # every run, evaluation and bench comes through here
    before = torch.get_num_threads()
    det = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    n = before if threads is None else threads
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (read at CUDA init)
    # set_num_threads also calls mkl_set_num_threads and mkl_set_dynamic(false): this call, even with the current
    # count, is what fixes MKL's count
    torch.set_num_threads(n)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield n
    finally:
        torch.set_num_threads(before)
        torch.use_deterministic_algorithms(det[0], warn_only=det[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
