"""CogVLM (cogvlm-chat-hf): EVA2-CLIP + GLU adapter + boi/eoi (`vision/cogvlm_image.py`) and the LLaMA decoder
with vision / language experts (`llm/cogvlm.py`). No Q-Former: an image fills (S/p)^2 + 2 prompt rows."""
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from ..llm.cogvlm import CogVLMDecoder, CogVLMDecoderConfig
from ..vision.cogvlm_image import CogVLMImageEncoder, CogVLMImageEncoderConfig
from .base import VisionLanguageConfig, VisionLanguageModel


@MindFormerRegister.register(MindFormerModuleType.CONFIG)
class CogVLMConfig(VisionLanguageConfig):
    """CogVLM: the fields of `VisionLanguageConfig` with CogVLM's image side and decoder configs. Of the split
    checkpoints, `vit_checkpoint` holds the EVA2-CLIP tower, `qformer_checkpoint` the GLU adapter with boi/eoi
    (the image side's second file, whatever it holds) and `llm_checkpoint` the decoder."""

    model_type = "cogvlm"
    llm_config_class = CogVLMDecoderConfig
    image_encoder_config_class = CogVLMImageEncoderConfig


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class CogVLMForConditionalGeneration(VisionLanguageModel):
    config_class = CogVLMConfig

    family = "cogvlm"
    split_files = {"vit": "cogvlm_vit", "qformer": "cogvlm_adapter", "llm": "cogvlm_llm"}
    llm_class = CogVLMDecoder
    image_encoder_class = CogVLMImageEncoder
