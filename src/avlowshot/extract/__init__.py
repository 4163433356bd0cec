"""Feature extraction from raw videos (PyAV decoding + backbones), class-name text encoders, and prediction."""
