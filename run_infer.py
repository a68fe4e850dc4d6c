"""Answer image + prompt requests with a VisualGLM, MiniGPT-4 or MiniGPT4Qwen model (see --help; no arguments = demo)."""
import os
import sys

os.environ.setdefault("VISUAL_MLLM_HOME", os.path.dirname(os.path.abspath(__file__)))

from visual_mllm.cli.infer import main  # noqa: E402  (after VISUAL_MLLM_HOME is known)

if __name__ == "__main__":
    sys.exit(main())
