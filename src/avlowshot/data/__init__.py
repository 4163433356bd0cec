"""Data layer: layouts (one reader per on-disk format), class tables, packed feature stores, splits, synthetic
benchmarks, batching."""
