"""The dtype names tower configs and CLI flags take (a leaf module: no imports, cheap for --help)."""

DTYPE_NAMES = ("float32", "float16", "bfloat16")
AUTO = "auto"  # compute_dtype: float16 on Ascend (as the references run there), float32 elsewhere
QUANTIZE_NAMES = (None, "int8")  # a tower's weight quantisation: none, or weight-only int8 (W8A16)
