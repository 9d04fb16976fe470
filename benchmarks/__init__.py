"""Measurements of the mnist_sweep pipeline, run from a checkout (``python -m benchmarks.speed`` and so on).

Each module measures one thing and writes its report under docs/ (see docs/BENCHMARKS.md); benchmarks/common.py
reports the machine and the versions. Nothing here ships in the wheel, and the library imports nothing from it.
"""
