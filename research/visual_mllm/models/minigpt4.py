"""MiniGPT-4 (Vicuna v0 / LLaMA): the BLIP-2 image side + `llama_proj` + a LLaMA decoder."""
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from ..llm.llama import LlamaConfig, LlamaModel
from .base import VisionLanguageConfig, VisionLanguageModel


@MindFormerRegister.register(MindFormerModuleType.CONFIG)
class MiniGPT4Config(VisionLanguageConfig):
    """MiniGPT-4: the fields of `VisionLanguageConfig`, with a LLaMA `llm_config`."""

    model_type = "minigpt4"
    llm_config_class = LlamaConfig


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class MiniGPT4ForConditionalGeneration(VisionLanguageModel):
    config_class = MiniGPT4Config

    family = "minigpt4"
    split_files = {"vit": "minigpt4_vit", "qformer": "minigpt4_qformer", "llm": "minigpt4_llama"}
    llm_class = LlamaModel
