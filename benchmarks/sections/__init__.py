"""Benchmark sections: one module each, registered in `benchmarks/run.py`'s SECTIONS."""
