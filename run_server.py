"""Serve a VisualGLM, MiniGPT-4 or MiniGPT4Qwen model over an OpenAI-compatible HTTP API, with a web chat
page (see --help; no arguments = the built-in demo model on http://127.0.0.1:8000)."""
import os
import sys

os.environ.setdefault("VISUAL_MLLM_HOME", os.path.dirname(os.path.abspath(__file__)))

from visual_mllm.cli.serve import main  # noqa: E402  (after VISUAL_MLLM_HOME is known)

if __name__ == "__main__":
    sys.exit(main())
