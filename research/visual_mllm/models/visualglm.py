"""VisualGLM-6B: the BLIP-2 image side + ChatGLM-6B, registered with mindformers."""
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from ..llm.glm import GLMConfig, GLMModel
from .base import VisionLanguageConfig, VisionLanguageModel


@MindFormerRegister.register(MindFormerModuleType.CONFIG)
class VisualGLMConfig(VisionLanguageConfig):
    """VisualGLM-6B: the fields of `VisionLanguageConfig`, with a GLM `llm_config`."""

    model_type = "visualglm"
    llm_config_class = GLMConfig


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class VisualGLMForConditionalGeneration(VisionLanguageModel):
    config_class = VisualGLMConfig

    family = "visualglm"
    llm_class = GLMModel
    split_files = {"vit": "visualglm_vit", "qformer": "visualglm_qformer", "llm": "visualglm_glm"}
