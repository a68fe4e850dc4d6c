"""Performance benchmarks of visual_mllm: run them with `python benchmarks/run.py` (see README.md)."""
