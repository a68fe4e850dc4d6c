"""What every family's model is: an image side + an LLM behind the interface of `llm/base.py`.

A family subclasses `VisionLanguageConfig` (naming its decoder's config class and, if it is not the BLIP-2
one of `vision/image_encoder.py`, its image side's config class) and `VisionLanguageModel` (naming its
decoder class, image encoder class and checkpoint file names). Image encoding, splicing, generation and
weight loading are the same for all of them.
"""
import os

import numpy as np
import mindspore as ms
from mindspore import Tensor
from mindformers.models.modeling_utils import PreTrainedModel

from ..configuration import StrictConfig
from ..generation.generator import EagerEngine, PromptRow, generate
from ..generation.steps import PREFILL_MODES, execution_mode, splice_image
from ..vision.image_encoder import ImageEncoder, ImageEncoderConfig, ProjectionMismatchError, check_projection
from .pretrained import PretrainedIOMixin
from .weights import deferred_init, load_checkpoints


class VisionLanguageConfig(StrictConfig):
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
    prefill_mode: how inference runs what runs once per request: image encoding and the prompt's prefill
        (the per-token decode step is always compiled). "graph": compiled once per shape, the fastest on
        repeated shapes; but a MindSpore CPU graph keeps some kernels' outputs (attention's head transposes,
        the rotary) until the process ends: ~17 MB per ViT-g block and ~35 MB per GLM layer at a 64-token
        prompt, ~2 GB for a real-size request. "pynative": op by op, nothing compiled, temporaries freed as
        it goes: the memory-lean choice for one-off runs of the real sizes (run_infer.py --prefill_mode
        pynative), as fast there (a 7B model's matmuls dwarf the per-op cost) and slower on the tiny models.
        Exported graphs and training are not affected.
    """

    llm_config_class = None  # set by each family: the config class of its decoder
    image_encoder_config_class = ImageEncoderConfig  # the config class of its image side

    def __init__(self, image_encoder_config=None, llm_config=None, seq_length=512, use_past=True,
                 image_placeholder=None, vit_checkpoint=None, qformer_checkpoint=None, llm_checkpoint=None,
                 seed=0, prefill_mode="graph", **kwargs):
        self.image_encoder_config = self.sub_config(image_encoder_config, self.image_encoder_config_class)
        self.llm_config = self.sub_config(llm_config, self.llm_config_class)
        self.seq_length = seq_length
        self.use_past = use_past
        self.image_placeholder = image_placeholder
        self.vit_checkpoint = vit_checkpoint
        self.qformer_checkpoint = qformer_checkpoint
        self.llm_checkpoint = llm_checkpoint
        self.seed = seed
        if prefill_mode not in PREFILL_MODES:
            raise ValueError(f"model_config.prefill_mode must be one of {', '.join(PREFILL_MODES)}, "
                             f"not {prefill_mode!r}")
        self.prefill_mode = prefill_mode
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


class VisionLanguageModel(PretrainedIOMixin, PreTrainedModel):
    """image_encoder (the family's `image_encoder_class`) and llm; generation through `EagerEngine`."""

    base_model_prefix = ""

    def __init__(self, config):
        super().__init__(config)
        checkpoints = config.checkpoint_files()
        if not checkpoints:
            ms.set_seed(config.seed)  # no weights given: a reproducible random model (the built-in demo)
        config.image_encoder_config.fit_llm(config.llm_config)
        with deferred_init(bool(checkpoints)):  # weights to load: no random values made first
            self.image_encoder = self.image_encoder_class(config.image_encoder_config)
            self.llm = self.llm_class(config.llm_config)
        self._engines = {}
        if checkpoints:
            load_checkpoints(self, checkpoints)  # tensor by tensor: the files are never held whole

    family = None  # short family name, recorded in exported manifests and conversion outputs
    llm_class = None  # the family's decoder (a `llm.base.Decoder`)
    image_encoder_class = ImageEncoder  # the family's image side (pixel_values -> image rows for the LLM)
    # file names (without extension) of the split checkpoints the converter and the merge step write
    split_files = None

    @classmethod
    def position_scheme(cls, llm_config):
        """The family's host-side PositionScheme (exported graphs need it without the model)."""
        return cls.llm_class.position_scheme(llm_config)

    @property
    def placeholder_id(self):
        """The token id that fills the image slots of a prompt before the image embeddings replace them."""
        ph = self.config.image_placeholder
        return self.config.llm_config.pad_token_id if ph is None else ph

    @property
    def num_image_tokens(self):
        return self.config.image_encoder_config.num_image_tokens

    def encode_images(self, pixel_values):
        """pixel_values numpy [B,3,H,W] -> image embeddings numpy [B,Q,H_llm], run as config.prefill_mode says."""
        with execution_mode(PREFILL_MODES[self.config.prefill_mode]):
            return self.image_encoder(Tensor(np.asarray(pixel_values, np.float32))).asnumpy()

    def construct(self, input_ids, image_embeds, image_start, position_ids, valid_length, prefix_length,
                  token_types=None):
        """Logits [B,S,V] of every position (training and parity checks); image rows spliced in.
        token_types [B,S] (1 = image row): needed by decoders that take them (`llm.takes_token_types`)."""
        embeds = splice_image(self.llm.embed(input_ids), image_embeds, image_start)
        return self.llm.logits(self.llm(embeds, position_ids, valid_length, prefix_length, None, False,
                                        token_types))

    def engine(self, use_past=None):
        """The eager generation engine (graph-mode cells, one KV cache per batch size)."""
        use_past = self.config.use_past if use_past is None else use_past
        if use_past not in self._engines:
            self._engines[use_past] = EagerEngine(self.llm, self.config.seq_length,
                                                  self.config.llm_config.pad_token_id, use_past=use_past,
                                                  prefill_mode=self.config.prefill_mode)
        return self._engines[use_past]

    def generate_ids(self, rows, generation_config, pixel_values=None, streamer=None, use_past=None):
        """Generated ids per row. rows: PromptRow list; pixel_values [B,3,H,W] for rows with an image
        (rows without one may hold zeros there), or None when no row has an image."""
        image_embeds = None
        if pixel_values is not None:
            image_embeds = self.encode_images(pixel_values)
        return generate(self.engine(use_past), rows, generation_config, image_embeds, streamer)


__all__ = ["VisionLanguageConfig", "VisionLanguageModel", "PromptRow", "ProjectionMismatchError", "check_projection"]
