"""visual_mllm: BLIP-2-style vision-language chat models (VisualGLM-6B; MiniGPT-4 and MiniGPT4Qwen later)
on MindSpore / MindFormers.

``import visual_mllm`` registers every config, model, processor and tokenizer with mindformers (see
``registry.py``), so mindformers' YAML routes (``build_model``, ``AutoModel``, ``AutoProcessor`` ...) build
our classes. The usual entry point is::

    model, processor = visual_mllm.load_from_yaml("configs/visualglm_tiny/run_visualglm_tiny.yaml")
"""
from .quiet import quiet_frameworks, quiet_imports

quiet_frameworks()  # before MindSpore and mindformers are imported
with quiet_imports():
    from .configuration import StrictConfig, UnknownConfigKeyError
    from .models.processor import ProcessorModelMismatchError, VisualGLMProcessor
    from .models.visualglm import VisualGLMConfig, VisualGLMForConditionalGeneration
    from .registry import (PACKAGED_VOCAB_FILE, load_from_yaml, load_processor_from_yaml, read_run_config,
                           register_all)

__version__ = "0.1.0"

__all__ = [
    "load_from_yaml", "load_processor_from_yaml", "read_run_config", "register_all",
    "VisualGLMConfig", "VisualGLMForConditionalGeneration", "VisualGLMProcessor",
    "PACKAGED_VOCAB_FILE",
    "StrictConfig", "UnknownConfigKeyError", "ProcessorModelMismatchError",
]
