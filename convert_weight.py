"""Convert VisualGLM-6B weights (SAT or HF-format release) to MindSpore, or back to the HF format (see --help)."""
import os
import sys

os.environ.setdefault("VISUAL_MLLM_HOME", os.path.dirname(os.path.abspath(__file__)))

from visual_mllm.cli.convert import main  # noqa: E402  (after VISUAL_MLLM_HOME is known)

if __name__ == "__main__":
    sys.exit(main())
