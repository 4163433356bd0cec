"""Evaluation: the one GZSL / GFSL metric (calibrated stacking, per-class mean accuracy) shared by every method."""
