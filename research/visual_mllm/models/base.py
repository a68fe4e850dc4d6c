"""What every family's model is: the shared image side + an LLM behind the interface of `llm/base.py`.

A family (VisualGLM now; MiniGPT-4 and MiniGPT4Qwen later) subclasses `VisionLanguageModel` and says
only which decoder it builds (`build_llm`). Image encoding, splicing, generation and weight loading
are the same for all of them.
"""
import numpy as np
import mindspore as ms
from mindspore import Tensor
from mindformers.models.modeling_utils import PreTrainedModel

from ..generation.generator import EagerEngine, PromptRow, generate
from ..generation.steps import splice_image
from ..vision.image_encoder import ImageEncoder
from .pretrained import PretrainedIOMixin
from .weights import load_checkpoints


class ProjectionMismatchError(ValueError):
    """The image projection's output width does not equal the LLM hidden size."""


def check_projection(image_encoder_config, llm_hidden_size):
    """Fill an unset projection width from the LLM, refuse one that does not fit it."""
    width = image_encoder_config.projection_size
    if width is None:
        image_encoder_config.projection_size = llm_hidden_size
    elif width != llm_hidden_size:
        raise ProjectionMismatchError(
            f"the image projection outputs {width} features but the LLM hidden size is {llm_hidden_size}: "
            f"the projection belongs to a different LLM size (e.g. a 13B projection with a 7B LLM)")


class VisionLanguageModel(PretrainedIOMixin, PreTrainedModel):
    """image_encoder (ViT + ln_vision + Q-Former + projection) and llm; generation through `EagerEngine`."""

    base_model_prefix = ""

    def __init__(self, config):
        super().__init__(config)
        checkpoints = config.checkpoint_files()
        if not checkpoints:
            ms.set_seed(config.seed)  # no weights given: a reproducible random model (the built-in demo)
        check_projection(config.image_encoder_config, config.llm_config.hidden_size)
        self.image_encoder = ImageEncoder(config.image_encoder_config)
        self.llm = self.build_llm(config.llm_config)
        self._engines = {}
        if checkpoints:
            load_checkpoints(self, checkpoints)

    family = None  # short family name, recorded in exported manifests

    def build_llm(self, llm_config):
        raise NotImplementedError

    @staticmethod
    def position_scheme(llm_config):
        """The family's host-side PositionScheme (exported graphs need it without the model)."""
        raise NotImplementedError

    @property
    def num_image_tokens(self):
        return self.config.image_encoder_config.qformer_config.num_query_tokens

    def encode_images(self, pixel_values):
        """pixel_values numpy [B,3,H,W] -> image embeddings numpy [B,Q,H_llm]."""
        return self.image_encoder(Tensor(np.asarray(pixel_values, np.float32))).asnumpy()

    def construct(self, input_ids, image_embeds, image_start, position_ids, valid_length, prefix_length):
        """Logits [B,S,V] of every position (training and parity checks); image rows spliced in."""
        embeds = splice_image(self.llm.embed(input_ids), image_embeds, image_start)
        return self.llm.logits(self.llm(embeds, position_ids, valid_length, prefix_length))

    def engine(self, use_past=None):
        """The eager generation engine (graph-mode cells, one KV cache per batch size)."""
        use_past = self.config.use_past if use_past is None else use_past
        if use_past not in self._engines:
            self._engines[use_past] = EagerEngine(self.llm, self.config.seq_length,
                                                  self.config.llm_config.pad_token_id, use_past=use_past)
        return self._engines[use_past]

    def generate_ids(self, rows, generation_config, pixel_values=None, streamer=None, use_past=None):
        """Generated ids per row. rows: PromptRow list; pixel_values [B,3,H,W] for rows with an image
        (rows without one may hold zeros there), or None when no row has an image."""
        image_embeds = None
        if pixel_values is not None:
            image_embeds = self.encode_images(pixel_values)
        return generate(self.engine(use_past), rows, generation_config, image_embeds, streamer)


__all__ = ["VisionLanguageModel", "PromptRow", "ProjectionMismatchError", "check_projection"]
