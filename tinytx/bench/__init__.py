"""Benchmarks of tinytx against PyTorch (host-side code: may import numpy and torch).

``tinytx.bench.encoder`` times an encoder block and attention alone; ``tinytx.bench.common``
holds the timing helpers (thread control, alternating runs, medians, tables, JSON) that
every benchmark shares. ``benchmarks/*.py`` in the repository are thin scripts over these.
"""
