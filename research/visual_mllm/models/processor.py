"""VisionLanguageProcessor: image preprocessing + the family's tokenizer and prompt format in one object.

Built from the ``processor`` section of a run YAML (``build_processor`` / ``AutoProcessor``):

    processor:
      type: VisionLanguageProcessor      # VisualGLMProcessor: the same, placeholder "pad" by default
      image_processor: {type: BlipImageProcessor, image_size: 224}
      tokenizer: {type: ChatGLMTokenizer, vocab_file: ...}   # the family's tokenizer
      # optional: num_image_tokens (default: taken from the model config), image_placeholder

The prompt format, how many image placeholder ids a prompt holds (the Q-Former query count) and which
id fills them are properties of the *model*; ``configure_for_model(model_config)`` takes them from the
model config and its family record (``visual_mllm.load_from_yaml`` does this). Values given to the
processor itself must agree with the model, otherwise ``configure_for_model`` refuses the pair.
"""
from typing import Optional, Sequence

import numpy as np
from mindformers.models.processing_utils import ProcessorMixin
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from .. import families
from ..processing.prompt import History, PromptBuilder


class ProcessorModelMismatchError(ValueError):
    """The processor's prompt settings do not fit the model it is used with."""


@MindFormerRegister.register(MindFormerModuleType.PROCESSOR)
class VisionLanguageProcessor(ProcessorMixin):
    """Turns (query, image, history) into model inputs and generated ids into the answer text.

    Args:
        image_processor: a ``BlipImageProcessor`` (any mindformers ``BaseImageProcessor`` returning
            float32 numpy [B,3,H,W]).
        tokenizer: the family's tokenizer.
        num_image_tokens: placeholder ids per image (= Q-Former queries; CogVLM: patches + 2); None = set later from the
            model config (``configure_for_model``).
        image_placeholder: an explicit token id, "pad" / "unk" (the tokenizer's), or None (the model's).
    """

    attributes = ["image_processor", "tokenizer"]
    # ProcessorMixin checks the attributes against classes of the mindformers package: name the bases.
    image_processor_class = "BaseImageProcessor"
    tokenizer_class = "PreTrainedTokenizerBase"

    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens: Optional[int] = None,
                 image_placeholder=None, **kwargs):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, **kwargs)
        self.num_image_tokens = None if num_image_tokens is None else int(num_image_tokens)
        self.image_placeholder = image_placeholder
        self.builder_class = None  # the family's PromptBuilder, set by configure_for_model
        self._builder = None

    # -- binding to a model --------------------------------------------------------------------------
    def configure_for_model(self, model_config):
        """Take the prompt format, image token count and placeholder from a model config; refuse
        contradicting values."""
        self.builder_class = families.family_of(model_config).prompt_builder_class
        queries = int(model_config.image_encoder_config.num_image_tokens)
        if self.num_image_tokens is not None and self.num_image_tokens != queries:
            raise ProcessorModelMismatchError(
                f"processor.num_image_tokens is {self.num_image_tokens} but an image fills {queries} rows of the "
                f"model's prompts (the Q-Former's queries, or CogVLM's patches + 2)")
        placeholder = model_config.image_placeholder
        if placeholder is None:
            placeholder = int(model_config.llm_config.pad_token_id)
        mine = self.image_placeholder
        if isinstance(mine, int) and not isinstance(mine, bool) and mine != placeholder:
            raise ProcessorModelMismatchError(
                f"processor.image_placeholder is {mine} but the model fills image slots with id "
                f"{placeholder} (model_config.image_placeholder, or the LLM pad id when that is null)")
        image_size = getattr(self.image_processor, "image_size", None)
        vit_size = model_config.image_encoder_config.vit_config.image_size
        if image_size is not None and tuple(image_size) != (vit_size, vit_size):
            raise ProcessorModelMismatchError(
                f"image_processor.image_size is {list(image_size)} but the model's ViT takes "
                f"{vit_size}x{vit_size} images (model_config.image_encoder_config.vit_config.image_size)")
        self._check_tokenizer(model_config.llm_config)
        self.num_image_tokens = queries
        self.image_placeholder = placeholder
        self._builder = None
        return self

    def _check_tokenizer(self, llm_config):
        """The tokenizer's special ids must be the LLM's (GLM positions are found by them) and fit its vocab."""
        wrong = []
        for name in ("bos_token_id", "eos_token_id", "pad_token_id", "mask_token_id", "gmask_token_id"):
            mine, model = getattr(self.tokenizer, name, None), getattr(llm_config, name, None)
            if mine is not None and model is not None and int(mine) != int(model):
                wrong.append(f"{name}: tokenizer {mine} != model_config.llm_config {model}")
        if wrong:
            raise ProcessorModelMismatchError(
                "the tokenizer does not belong to this model (wrong vocab_file or num_image_tokens?): "
                + "; ".join(wrong))
        if len(self.tokenizer) > llm_config.vocab_size:
            raise ProcessorModelMismatchError(
                f"the tokenizer has {len(self.tokenizer)} ids but the model's vocab_size is "
                f"{llm_config.vocab_size}")

    @property
    def prompt_builder(self) -> PromptBuilder:
        if self._builder is None:
            if self.builder_class is None:
                raise ValueError(
                    f"{type(self).__name__} is not bound to a model (prompt format, num_image_tokens, "
                    "placeholder): call configure_for_model(model.config) (visual_mllm.load_from_yaml does this)")
            self._builder = self.builder_class(self.tokenizer, self.num_image_tokens, self.image_placeholder)
        return self._builder

    # -- inputs and outputs --------------------------------------------------------------------------
    def preprocess_image(self, image) -> np.ndarray:
        """One image (path, PIL image or HWC array) -> float32 numpy [1,3,H,W]."""
        if isinstance(image, (list, tuple)):
            raise TypeError(f"{type(self).__name__} takes one image per conversation, got a "
                            f"{type(image).__name__} of {len(image)}")
        pixel_values = np.asarray(self.image_processor(image), dtype=np.float32)
        if pixel_values.ndim == 3:
            pixel_values = pixel_values[None]
        return pixel_values

    def __call__(self, query: str, image=None, history: History = (), english: bool = False,
                 max_prompt_tokens: Optional[int] = None, template: Optional[str] = None) -> dict:
        """Model inputs of one conversation turn.

        Returns {"input_ids": list of int, "image_start": index of the first image placeholder or None,
        "pixel_values": float32 numpy [1,3,H,W] or None, "history": the history turns kept}.
        With ``max_prompt_tokens`` the oldest history turns are dropped until the prompt fits
        (``PromptTooLongError`` if even the bare query does not). ``template``: one of the family's prompt
        templates (CogVLM: chat, vqa, base), None for its default.
        """
        has_image = image is not None
        pixel_values = self.preprocess_image(image) if has_image else None
        budget = None if max_prompt_tokens is None else int(max_prompt_tokens)
        kept, ids = self.prompt_builder.fit_history(query, history, budget, has_image=has_image, english=english,
                                                    template=template)
        return {"input_ids": list(ids.input_ids), "image_start": ids.image_start,
                "pixel_values": pixel_values, "history": kept}

    def decode_response(self, input_ids: Sequence[int], generated_ids: Sequence[int],
                        english: bool = False) -> str:
        """The answer text as the family's reference chat code returns it."""
        return self.prompt_builder.decode_response(input_ids, generated_ids, english=english)

    def __repr__(self):
        return (f"{type(self).__name__}(num_image_tokens={self.num_image_tokens}, "
                f"image_placeholder={self.image_placeholder!r}, image_processor={type(self.image_processor).__name__}, "
                f"tokenizer={type(self.tokenizer).__name__})")


@MindFormerRegister.register(MindFormerModuleType.PROCESSOR)
class VisualGLMProcessor(VisionLanguageProcessor):
    """The seed-era name of VisualGLM run YAMLs; its placeholder defaults to "pad" (SAT's)."""

    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens: Optional[int] = None,
                 image_placeholder="pad", **kwargs):
        super().__init__(image_processor, tokenizer, num_image_tokens, image_placeholder, **kwargs)


__all__ = ["VisionLanguageProcessor", "VisualGLMProcessor", "ProcessorModelMismatchError"]
