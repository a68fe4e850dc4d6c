"""The model families: one record each, the only place that names a family's classes.

Shared code (registry, processor, CLIs, pipeline, export, finetune) finds a family from a model
config (`family_of`) or from its name (`get`) and reads what it needs here; it never imports a
family's own modules. Adding a family = its decoder, prompt builder, configs, its LLM's key tables in
`convert/` and one `Family(...)` entry in FAMILIES, whose `Conversion` names the conversion job that
`convert_weight.py --model_type <name>` runs and what that job needs of the family. A family with another
image side than BLIP-2's names its encoder and config classes on its model and config classes
(`image_encoder_class`, `image_encoder_config_class`: CogVLM's EVA2-CLIP + GLU adapter), and a decoder that
routes by token types says so (`takes_token_types`): generation, export and finetuning then pass them.
"""
import os
from dataclasses import dataclass, field
from typing import Dict, Optional

from .models.cogvlm import CogVLMConfig, CogVLMForConditionalGeneration
from .models.minigpt4 import MiniGPT4Config, MiniGPT4ForConditionalGeneration
from .models.minigpt4qwen import MiniGPT4QwenConfig, MiniGPT4QwenForConditionalGeneration
from .models.visualglm import VisualGLMConfig, VisualGLMForConditionalGeneration
from .paths import CONFIGS_DIR, DEFAULT_CONFIG
from .processing.cogvlm_prompt import CogVLMPromptBuilder
from .processing.minigpt4_prompt import MiniGPT4PromptBuilder
from .processing.qwen_prompt import QwenPromptBuilder
from .processing.visualglm_prompt import VisualGLMPromptBuilder
from .tokenizers.chatglm import ChatGLMTokenizer
from .tokenizers.llama import VicunaTokenizer
from .tokenizers.qwen import QWenTokenizer


@dataclass(frozen=True)
class Conversion:
    """How convert_weight.py converts the family's release.

    job "visualglm": one SAT or HF-format release (--torch_path), convert/visualglm.py.
    job "cogvlm": the cogvlm-chat-hf folder (--torch_path) and the Vicuna tokenizer folder (--tokenizer),
    convert/cogvlm.py.
    job "lavis": the LAVIS-era files (--eva_vit_path, --qformer_path, --proj_path) and the LLM's HF folder
    (--llm_path), convert/minigpt4.py; then `llm_format` names the convert/ module with the LLM folder's
    key tables and `projection` / `projection_file` the projection's key prefix in --proj_path and the
    file users know it as (for messages); `release_projection` / `release_llm` are the names the way back
    (--mindspore_config) writes the projection file and the LLM folder under, as the release calls them."""

    job: str
    llm_format: Optional[str] = None
    projection: Optional[str] = None
    projection_file: Optional[str] = None
    release_projection: Optional[str] = None
    release_llm: Optional[str] = None


@dataclass(frozen=True)
class Family:
    name: str                   # as model classes, export manifests and conversion outputs record it
    config_class: type          # the composite config (a models.base.VisionLanguageConfig)
    model_class: type           # the composite model (a models.base.VisionLanguageModel)
    tokenizer_class: type
    prompt_builder_class: type  # a processing.prompt.PromptBuilder
    conversion: Conversion
    # the reference demo's generation settings (GenerationConfig fields): run_infer.py's defaults
    sampling: Dict[str, float] = field(default_factory=dict)
    # the tiny run YAML (random weights, no download) that tests and demos run
    demo_config: Optional[str] = None


FAMILIES = (
    Family("visualglm", VisualGLMConfig, VisualGLMForConditionalGeneration, ChatGLMTokenizer, VisualGLMPromptBuilder,
           Conversion("visualglm"),
           sampling=dict(do_sample=True, top_p=0.4, top_k=100, temperature=0.8, repetition_penalty=1.2),
           demo_config=DEFAULT_CONFIG),
    Family("minigpt4", MiniGPT4Config, MiniGPT4ForConditionalGeneration, VicunaTokenizer, MiniGPT4PromptBuilder,
           Conversion("lavis", "llama_hf", "llama_proj", "MiniGPT-4's projection checkpoint pretrained_minigpt4*.pth",
                      release_projection="pretrained_minigpt4.pth", release_llm="vicuna"),
           sampling=dict(do_sample=True, top_p=0.9, top_k=0, temperature=1.0, repetition_penalty=1.05),
           demo_config=os.path.join(CONFIGS_DIR, "minigpt4_tiny", "run_minigpt4_tiny.yaml")),
    Family("minigpt4qwen", MiniGPT4QwenConfig, MiniGPT4QwenForConditionalGeneration, QWenTokenizer,
           QwenPromptBuilder,
           Conversion("lavis", "qwen_hf", "llm_proj", "MiniGPT4Qwen's checkpoint model.pth",
                      release_projection="model.pth", release_llm="Qwen7B-chat"),
           # MiniGPT4Qwen's cli_demo decodes greedily (Qwen-7B-Chat's own default samples with top_p 0.8)
           sampling=dict(do_sample=False),
           demo_config=os.path.join(CONFIGS_DIR, "minigpt4qwen_tiny", "run_minigpt4qwen_tiny.yaml")),
    Family("cogvlm", CogVLMConfig, CogVLMForConditionalGeneration, VicunaTokenizer, CogVLMPromptBuilder,
           Conversion("cogvlm"),
           # cli_demo_hf.py: do_sample=False (greedy), answers until EOS
           sampling=dict(do_sample=False),
           demo_config=os.path.join(CONFIGS_DIR, "cogvlm_tiny", "run_cogvlm_tiny.yaml")),
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


def with_conversion(job):
    """The families whose releases `job` converts."""
    return [family for family in FAMILIES if family.conversion.job == job]
