"""Convert VisualGLM-6B, MiniGPT-4 and MiniGPT4Qwen releases to MindSpore checkpoints (VisualGLM also back to HF; see --help)."""
import os
import sys

os.environ.setdefault("VISUAL_MLLM_HOME", os.path.dirname(os.path.abspath(__file__)))

from visual_mllm.cli.convert import main  # noqa: E402  (after VISUAL_MLLM_HOME is known)

if __name__ == "__main__":
    sys.exit(main())
