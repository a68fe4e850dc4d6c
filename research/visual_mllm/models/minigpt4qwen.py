"""MiniGPT4Qwen (Qwen-7B-Chat v1): the BLIP-2 image side + `llm_proj` + the Qwen decoder."""
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from ..llm.qwen import QwenConfig, QwenModel
from .base import VisionLanguageConfig, VisionLanguageModel


@MindFormerRegister.register(MindFormerModuleType.CONFIG)
class MiniGPT4QwenConfig(VisionLanguageConfig):
    """MiniGPT4Qwen: the fields of `VisionLanguageConfig`, with a Qwen `llm_config`."""

    model_type = "minigpt4qwen"
    llm_config_class = QwenConfig


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class MiniGPT4QwenForConditionalGeneration(VisionLanguageModel):
    config_class = MiniGPT4QwenConfig

    family = "minigpt4qwen"
    split_files = {"vit": "minigpt4qwen_vit", "qformer": "minigpt4qwen_qformer", "llm": "minigpt4qwen_qwen"}
    llm_class = QwenModel
