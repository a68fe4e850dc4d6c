"""Where things are (a leaf module: it imports nothing of the package).

PACKAGE_DIR / ASSETS_DIR: the installed package and the data it ships (tiny tokenizers; the demo: its YAML,
    LoRA and image, so that an installed package runs it from anywhere).
cache_dir(): the per-user cache ($VISUAL_MLLM_CACHE, default ~/.cache/visual_mllm): built CPU kernels, the
    demo LoRA when it is not packaged, framework logs, MindSpore's compile cache.
REPO_ROOT: the source checkout the package was installed from in editable mode (`pip install -e .`),
    or $VISUAL_MLLM_HOME; the run YAMLs under configs/ and the examples live there.
"""
import os

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
ASSETS_DIR = os.path.join(PACKAGE_DIR, "assets")
REPO_ROOT = os.environ.get("VISUAL_MLLM_HOME") or os.path.dirname(os.path.dirname(PACKAGE_DIR))
CONFIGS_DIR = os.path.join(REPO_ROOT, "configs")
# the built-in demo model: what run_infer.py and the pipeline use when no config is given (also reachable as
# configs/visualglm_tiny/run_visualglm_tiny.yaml, a link), and the image it answers about by default
DEFAULT_CONFIG = os.path.join(ASSETS_DIR, "demo", "run_visualglm_tiny.yaml")
DEMO_IMAGE = os.path.join(ASSETS_DIR, "demo", "chelsea.png")
# the LoRA finetune of the demo model (configs/visualglm_tiny/lora.yaml): run_finetune.py's default
DEMO_LORA_CONFIG = os.path.join(CONFIGS_DIR, "visualglm_tiny", "lora.yaml")


def cache_dir():
    return os.environ.get("VISUAL_MLLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "visual_mllm")
