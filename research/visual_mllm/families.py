"""The model families: one record each, the only place that names a family's classes.

Shared code (registry, processor, CLIs, pipeline, export, finetune) finds a family from a model
config (`family_of`) or from its name (`get`) and reads what it needs here; it never imports a
family's own modules. Adding a family = its decoder, prompt builder, configs and one `Family(...)`
entry in FAMILIES, plus its conversion: key tables in `convert/` and, for a BLIP-2-style release, a
`Spec` in `convert/minigpt4.py` (`convert_weight.py --model_type` picks it; VisualGLM's SAT/HF
releases have their own job in `convert/visualglm.py`).
"""
import os
from dataclasses import dataclass, field
from typing import Dict, Optional

from .models.minigpt4 import MiniGPT4Config, MiniGPT4ForConditionalGeneration
from .models.minigpt4qwen import MiniGPT4QwenConfig, MiniGPT4QwenForConditionalGeneration
from .models.visualglm import VisualGLMConfig, VisualGLMForConditionalGeneration
from .paths import CONFIGS_DIR
from .processing.minigpt4_prompt import MiniGPT4PromptBuilder
from .processing.qwen_prompt import QwenPromptBuilder
from .processing.visualglm_prompt import VisualGLMPromptBuilder
from .tokenizers.chatglm import ChatGLMTokenizer
from .tokenizers.llama import VicunaTokenizer
from .tokenizers.qwen import QWenTokenizer


@dataclass(frozen=True)
class Family:
    name: str                   # as model classes, export manifests and conversion outputs record it
    config_class: type          # the composite config (a models.base.VisionLanguageConfig)
    model_class: type           # the composite model (a models.base.VisionLanguageModel)
    tokenizer_class: type
    prompt_builder_class: type  # a processing.prompt.PromptBuilder
    # the reference demo's generation settings (GenerationConfig fields): run_infer.py's defaults
    sampling: Dict[str, float] = field(default_factory=dict)
    # the tiny run YAML (random weights, no download) that tests and demos run
    demo_config: Optional[str] = None


FAMILIES = (
    Family("visualglm", VisualGLMConfig, VisualGLMForConditionalGeneration, ChatGLMTokenizer, VisualGLMPromptBuilder,
           sampling=dict(do_sample=True, top_p=0.4, top_k=100, temperature=0.8, repetition_penalty=1.2),
           demo_config=os.path.join(CONFIGS_DIR, "visualglm_tiny", "run_visualglm_tiny.yaml")),
    Family("minigpt4", MiniGPT4Config, MiniGPT4ForConditionalGeneration, VicunaTokenizer, MiniGPT4PromptBuilder,
           sampling=dict(do_sample=True, top_p=0.9, top_k=0, temperature=1.0, repetition_penalty=1.05),
           demo_config=os.path.join(CONFIGS_DIR, "minigpt4_tiny", "run_minigpt4_tiny.yaml")),
    Family("minigpt4qwen", MiniGPT4QwenConfig, MiniGPT4QwenForConditionalGeneration, QWenTokenizer,
           QwenPromptBuilder,
           # MiniGPT4Qwen's cli_demo decodes greedily (Qwen-7B-Chat's own default samples with top_p 0.8)
           sampling=dict(do_sample=False),
           demo_config=os.path.join(CONFIGS_DIR, "minigpt4qwen_tiny", "run_minigpt4qwen_tiny.yaml")),
)


def get(name) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"unknown model family {name!r}; known: {', '.join(f.name for f in FAMILIES)}")


def family_of(config) -> Family:
    """The family of a composite model config (instance or class)."""
    cls = config if isinstance(config, type) else type(config)
    for family in FAMILIES:
        if issubclass(cls, family.config_class):
            return family
    raise ValueError(f"{cls.__name__} is not the config of a known model family "
                     f"({', '.join(f.config_class.__name__ for f in FAMILIES)})")
