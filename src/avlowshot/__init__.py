"""avlowshot: audio-visual low-shot (GZSL / GFSL) video classification on pre-extracted features."""

__version__ = "0.1.0"
