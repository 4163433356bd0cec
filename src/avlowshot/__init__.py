"""avlowshot: audio-visual low-shot (GZSL / GFSL) video classification on pre-extracted features."""

__version__ = "0.1.0"

_API = (
    "run",
    "sweep",
    "load_results",
)  # avlowshot/api.py, imported on first use so that `import avlowshot` stays cheap


def __getattr__(name: str):
    if name in _API:
        from avlowshot import api

        return getattr(api, name)
    raise AttributeError(f"module 'avlowshot' has no attribute {name!r}")
