"""VisualGLM-6B: the BLIP-2 image side + ChatGLM-6B, registered with mindformers."""
import os

from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from ..configuration import StrictConfig
from ..llm.glm import GLMConfig, GLMModel, GLMPositions
from ..vision.image_encoder import ImageEncoderConfig
from .base import VisionLanguageModel


@MindFormerRegister.register(MindFormerModuleType.CONFIG)
class VisualGLMConfig(StrictConfig):
    """The whole model: towers, decoding context and where the weights are.

    image_encoder_config / llm_config: nested configs (instances or dicts from YAML).
    seq_length: the context generation works in: prompt + answer must fit (cache length with use_past).
    use_past: decode with the KV cache (one token per step) instead of re-running the whole sequence.
    image_placeholder: token id filling the image slots before splicing (SAT: pad id 3; HF: unk 0);
        None = the LLM's pad id. Only its position matters for the output.
    vit_checkpoint / qformer_checkpoint / llm_checkpoint: the split MindSpore checkpoints the converter
        writes; or `checkpoint_name_or_path` for one file holding everything. None everywhere = random
        weights (the built-in tiny demo; see `seed`).
    seed: initialisation seed used when no checkpoint is given, so the demo model is reproducible.
    """

    model_type = "visualglm"

    def __init__(self, image_encoder_config=None, llm_config=None, seq_length=512, use_past=True,
                 image_placeholder=None, vit_checkpoint=None, qformer_checkpoint=None, llm_checkpoint=None,
                 seed=0, **kwargs):
        self.image_encoder_config = self.sub_config(image_encoder_config, ImageEncoderConfig)
        self.llm_config = self.sub_config(llm_config, GLMConfig)
        self.seq_length = seq_length
        self.use_past = use_past
        self.image_placeholder = image_placeholder
        self.vit_checkpoint = vit_checkpoint
        self.qformer_checkpoint = qformer_checkpoint
        self.llm_checkpoint = llm_checkpoint
        self.seed = seed
        super().__init__(**kwargs)

    def checkpoint_files(self):
        """The checkpoint files to load, [] for none; a half-configured split is an error."""
        split = {"vit_checkpoint": self.vit_checkpoint, "qformer_checkpoint": self.qformer_checkpoint,
                 "llm_checkpoint": self.llm_checkpoint}
        if self.checkpoint_name_or_path:
            if any(split.values()):
                raise ValueError("set either checkpoint_name_or_path or the split *_checkpoint keys, not both")
            return [self.checkpoint_name_or_path]
        if not any(split.values()):
            return []
        unset = [key for key, value in split.items() if not value]
        if unset:
            raise ValueError(f"model_config sets only some split checkpoints; also set {', '.join(unset)}")
        for key, path in split.items():
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{key}: checkpoint file not found: {path} (set model_config.{key})")
        return list(split.values())

    def to_dict(self):
        output = super().to_dict()
        output["image_encoder_config"] = self.image_encoder_config.to_dict()
        output["llm_config"] = self.llm_config.to_dict()
        return output


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class VisualGLMForConditionalGeneration(VisionLanguageModel):
    config_class = VisualGLMConfig

    family = "visualglm"
    # file names (without extension) of the split checkpoints the converter and the merge step write
    split_files = {"vit": "visualglm_vit", "qformer": "visualglm_qformer", "llm": "visualglm_glm"}

    def build_llm(self, llm_config):
        return GLMModel(llm_config)

    @staticmethod
    def position_scheme(llm_config):
        return GLMPositions.from_config(llm_config)

    @property
    def placeholder_id(self):
        ph = self.config.image_placeholder
        return self.config.llm_config.pad_token_id if ph is None else ph
