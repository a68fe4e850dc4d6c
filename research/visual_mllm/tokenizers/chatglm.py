"""ChatGLM-6B tokenizer (the sentencepiece model ``ice_text.model``) for VisualGLM-6B on MindFormers.

MindFormers 1.9 ships tokenizers for ChatGLM2/3/4 only. This module reproduces the tokenizer of
``THUDM/chatglm-6b`` (the one VisualGLM-6B loads) as it behaves under transformers 4.27, the
version its remote code targets:

* encoding: ``\\n`` -> ``<n>``, ``\\t`` -> ``<|tab|>``, runs of 2..80 spaces -> ``<|blank_k|>``
  (longest first), then sentencepiece with its dummy prefix and byte fallback; ids are shifted by
  ``num_image_tokens`` (0 in the published ``tokenizer_config.json``, 20000 by default);
* ``encode``/``__call__`` append ``[gMASK] <sop>`` at the end of the text;
* ``<sop>``, ``<eop>``, ``<unk>``, ``<pad>`` and ``[MASK]`` written in the text are split out
  with the whitespace on both of their sides; ``[gMASK]`` is not;
* decoding drops pad ids, decodes with sentencepiece (control pieces vanish, bytes re-assembled,
  ``<unk>`` -> `` ⁇ ``), undoes the whitespace pieces and applies the usual clean-up of spaces
  before punctuation.

Every special id is read from the sentencepiece model by its piece, never hard-coded: the real
model has ``[gMASK]`` = 130001, the tiny test model 801.
"""
import json
import os
import re
from typing import Dict, List, Optional

import numpy as np
import sentencepiece as spm
from mindformers.models.tokenization_utils import PreTrainedTokenizer
from mindformers.models.tokenization_utils_base import PaddingStrategy
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
from ..llm.glm import GLMPositions

__all__ = ["ChatGLMTokenizer", "glm_attention_mask", "glm_position_ids"]

VOCAB_FILE_NAME = "ice_text.model"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
DEFAULT_NUM_IMAGE_TOKENS = 20000  # the reference class default (the published config says 0)
# vocab_file None = the project's tiny ChatGLM-layout tokenizer shipped in visual_mllm/assets (tests, demo)
PACKAGED_TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
PACKAGED_VOCAB_FILE = os.path.join(PACKAGED_TOKENIZER_DIR, VOCAB_FILE_NAME)

NEWLINE_PIECE = "<n>"
TAB_PIECE = "<|tab|>"
MAX_BLANK_LENGTH = 80
IMAGE_TOKEN_PATTERN = re.compile(r"<image_(\d+)>")


def blank_piece(length: int) -> str:
    """Piece that stands for a run of ``length`` spaces (2 <= length <= 80)."""
    return f"<|blank_{length}|>"


def encode_whitespace(text: str, max_blank_length: int = MAX_BLANK_LENGTH) -> str:
    """Replace newlines, tabs and runs of spaces by the model's whitespace pieces.

    Runs are replaced longest first, so 81 spaces become ``<|blank_80|>`` plus one space (which
    sentencepiece turns into ``▁``) and 100 spaces ``<|blank_80|><|blank_20|>``.
    """
    text = text.replace("\n", NEWLINE_PIECE).replace("\t", TAB_PIECE)
    for length in range(max_blank_length, 1, -1):
        text = text.replace(" " * length, blank_piece(length))
    return text


def decode_whitespace(text: str, max_blank_length: int = MAX_BLANK_LENGTH) -> str:
    """Inverse of :func:`encode_whitespace` on decoded text.

    Literal ``<n>`` / ``<|tab|>`` typed by a user were encoded to the same pieces, so they come
    back as a newline / tab, as with the reference tokenizer.
    """
    text = text.replace(NEWLINE_PIECE, "\n").replace(TAB_PIECE, "\t")
    for length in range(2, max_blank_length + 1):
        text = text.replace(blank_piece(length), " " * length)
    return text


def _context_length(input_ids: List[int], bos_id: int) -> int:
    """Index of ``<sop>`` (the end of the bidirectional context), or the length if it is absent."""
    return input_ids.index(bos_id) if bos_id in input_ids else len(input_ids)


def glm_attention_mask(input_ids: List[int], bos_id: int) -> np.ndarray:
    """GLM prompt mask of shape (1, L, L), ``True`` where attention is NOT allowed.

    Every position sees the whole context (everything before ``<sop>``); from ``<sop>`` on the
    mask is causal.
    """
    length = len(input_ids)
    visible = np.tril(np.ones((1, length, length)))
    visible[:, :, :_context_length(input_ids, bos_id)] = 1
    return visible < 0.5


def glm_position_ids(input_ids: List[int], bos_id: int, mask_id: int, gmask_id: int) -> np.ndarray:
    """GLM 2-D position ids of shape (2, L), int64, as the model's own position scheme builds them."""
    positions, _ = GLMPositions(bos_id, mask_id, gmask_id).prompt([input_ids], len(input_ids))
    return positions[0].astype(np.int64)


def _packaged_num_image_tokens() -> int:
    with open(os.path.join(PACKAGED_TOKENIZER_DIR, TOKENIZER_CONFIG_FILE), encoding="utf-8") as file:
        return int(json.load(file)["num_image_tokens"])


def _load_sentencepiece(vocab_file) -> spm.SentencePieceProcessor:
    """Load ``ice_text.model``; a missing file is an error that names the path."""
    if vocab_file is None or not os.path.isfile(vocab_file):
        raise FileNotFoundError(f"ChatGLM tokenizer model (ice_text.model) not found: {vocab_file}")
    return spm.SentencePieceProcessor(model_file=str(vocab_file))


@MindFormerRegister.register(MindFormerModuleType.TOKENIZER)
class ChatGLMTokenizer(PreTrainedTokenizer):
    """ChatGLM-6B tokenizer, compatible with the ``THUDM/chatglm-6b`` / ``THUDM/visualglm-6b`` files.

    Args:
        vocab_file (str): path of ``ice_text.model``; None = the tiny tokenizer shipped in
            ``visual_mllm/assets`` (with the ``num_image_tokens`` of its ``tokenizer_config.json``, 0).
        do_lower_case (bool): lower-case the text before encoding. Default: False.
        remove_space (bool): collapse and strip whitespace before encoding. Default: False.
        bos_token, eos_token, end_token, mask_token, gmask_token, pad_token, unk_token (str): pieces of
            the special tokens (defaults as in ``tokenizer_config.json``); their ids are read from
            the model. Only bos, eos, unk, pad and mask are "special tokens" in the transformers sense
            (split out of raw text, skipped by ``skip_special_tokens``); gmask and end are not.
        num_image_tokens (int): offset added to every sentencepiece id. The published config says 0;
            the class default (None = 20000) is the reference's and shifts every id.
        padding_side (str): only ``"left"`` is supported (GLM masks and positions assume it).
        **kwargs: passed to MindFormers' ``PreTrainedTokenizer``.

    Raises:
        FileNotFoundError: if ``vocab_file`` does not exist.
        ValueError: if a special token is not a piece of the model, or padding_side is not "left".
    """

    vocab_files_names = {"vocab_file": VOCAB_FILE_NAME}
    FILE_LIST = [TOKENIZER_CONFIG_FILE]
    model_input_names = ["input_ids", "attention_mask", "position_ids"]
    padding_side = "left"

    def __init__(self, vocab_file=None, do_lower_case=False, remove_space=False, bos_token="<sop>",
                 eos_token="<eop>", end_token="</s>", mask_token="[MASK]", gmask_token="[gMASK]",
                 pad_token="<pad>", unk_token="<unk>", num_image_tokens=None, padding_side="left",
                 **kwargs):
        if vocab_file is None:
            vocab_file = PACKAGED_VOCAB_FILE
            if num_image_tokens is None:
                num_image_tokens = _packaged_num_image_tokens()
        if num_image_tokens is None:
            num_image_tokens = DEFAULT_NUM_IMAGE_TOKENS
        if padding_side != "left":
            raise ValueError(f"ChatGLMTokenizer only pads on the left, got padding_side={padding_side!r}")
        # The model must be loaded before the base class initialises: it queries the vocabulary.
        self.sp_model = _load_sentencepiece(vocab_file)
        self.vocab_file = vocab_file
        self.num_image_tokens = num_image_tokens
        self.do_lower_case = do_lower_case
        self.remove_space = remove_space
        self.end_token = end_token
        self.gmask_token = gmask_token
        self._check_pieces_exist([bos_token, eos_token, end_token, mask_token, gmask_token, pad_token,
                                  unk_token])
        super().__init__(do_lower_case=do_lower_case, remove_space=remove_space, bos_token=bos_token,
                         eos_token=eos_token, end_token=end_token, mask_token=mask_token,
                         gmask_token=gmask_token, pad_token=pad_token, unk_token=unk_token,
                         num_image_tokens=num_image_tokens, padding_side=padding_side, **kwargs)

    @classmethod
    def from_folder(cls, folder, **overrides) -> "ChatGLMTokenizer":
        """Build the tokenizer from a folder holding ``ice_text.model`` and ``tokenizer_config.json``.

        Works on the published ``THUDM/chatglm-6b`` / ``THUDM/visualglm-6b`` folders and on folders
        written by ``save_pretrained(folder, save_json=True)``. The config is required: without it
        ``num_image_tokens`` would fall back to 20000 and every id would be off by 20000.
        ``overrides`` replace values of the config.
        """
        for name in (VOCAB_FILE_NAME, TOKENIZER_CONFIG_FILE):
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} not found: a ChatGLM tokenizer folder needs "
                                        f"{VOCAB_FILE_NAME} and {TOKENIZER_CONFIG_FILE}")
        return cls.from_pretrained(os.fspath(folder), **overrides)

    def _check_pieces_exist(self, tokens: List[Optional[str]]):
        """Fail early when the model lacks a configured special piece (e.g. a non-ChatGLM model file)."""
        for piece in (str(token) for token in tokens if token is not None):
            if self.sp_model.id_to_piece(self.sp_model.piece_to_id(piece)) != piece:
                raise ValueError(f"special token {piece!r} is not a piece of {self.vocab_file}")

    @property
    def gmask_token_id(self) -> Optional[int]:
        """Id of ``[gMASK]`` (appended before ``<sop>``)."""
        return None if self.gmask_token is None else self.convert_tokens_to_ids(self.gmask_token)

    @property
    def end_token_id(self) -> Optional[int]:
        """Id of ``</s>``."""
        return None if self.end_token is None else self.convert_tokens_to_ids(self.end_token)

    @property
    def vocab_size(self) -> int:
        """Number of ids: the image-token offset plus the sentencepiece pieces."""
        return self.num_image_tokens + self.sp_model.get_piece_size()

    def __len__(self) -> int:
        """Size of the full vocabulary: ``vocab_size`` plus the added tokens that got new ids.

        MindFormers' base also counts the special tokens, which already are pieces of the model.
        """
        return self.vocab_size + sum(1 for index in self._added_tokens_decoder if index >= self.vocab_size)

    def get_vocab(self) -> Dict[str, int]:
        """Token -> id for every id, plus the added tokens."""
        vocab = {self._convert_id_to_token(index): index for index in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def preprocess_text(self, text: str) -> str:
        """Apply ``remove_space`` (``do_lower_case`` is applied by the base ``tokenize``, which keeps
        special tokens intact)."""
        if self.remove_space:
            text = " ".join(text.strip().split())
        return text

    def tokenize_atom(self, tokens, no_split_token):
        """Strip the whitespace on both sides of every special token split out of the text.

        Under transformers 4.27 the special tokens were plain strings, and plain-string special tokens
        ate their neighbours' whitespace (``"hello <eop> world"`` -> ``"hello"``, ``"<eop>"``,
        ``"world"``). MindFormers' base class registers them as non-stripping ``AddedToken`` objects,
        so this restores the reference behaviour; other added tokens keep their own flags.
        """
        special_tokens = set(self.all_special_tokens)
        for index, token in enumerate(tokens):
            if token in no_split_token and token in special_tokens:
                if index > 0:
                    tokens[index - 1] = tokens[index - 1].rstrip()
                if index + 1 < len(tokens):
                    tokens[index + 1] = tokens[index + 1].lstrip()
        return super().tokenize_atom(tokens, no_split_token)

    def _tokenize(self, text, **kwargs) -> List[str]:
        """Sentencepiece pieces of a text chunk that holds no special token."""
        return self.sp_model.encode(encode_whitespace(self.preprocess_text(text)), out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        """Piece -> id (shifted by num_image_tokens); ``<image_k>`` -> k; unknown pieces -> unk id."""
        image = IMAGE_TOKEN_PATTERN.fullmatch(token)
        if image:
            return int(image.group(1))
        return self.sp_model.piece_to_id(token) + self.num_image_tokens

    def _convert_id_to_token(self, index: int) -> str:
        """Id -> piece; ids below num_image_tokens are ``<image_k>``."""
        if index < self.num_image_tokens:
            return f"<image_{index}>"
        return self.sp_model.id_to_piece(index - self.num_image_tokens)

    def convert_tokens_to_string(self, tokens: List[str]) -> str:
        """Sentencepiece-decode pieces, then restore newlines, tabs and space runs."""
        return decode_whitespace(self.sp_model.decode_pieces(tokens))

    def _decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=None, **kwargs) -> str:
        """Decode ids after dropping every pad id (the reference does this even without skipping specials)."""
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        token_ids = [index for index in token_ids if index != self.pad_token_id]
        return super()._decode(token_ids, skip_special_tokens=skip_special_tokens,
                               clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs)

    def build_inputs_with_special_tokens(self, token_ids_0: List[int],
                                         token_ids_1: Optional[List[int]] = None) -> List[int]:
        """``A [gMASK] <sop>``; with a second sequence ``A [gMASK] <sop> B <eop>``."""
        ids = token_ids_0 + [self.gmask_token_id, self.bos_token_id]
        if token_ids_1 is not None:
            ids = ids + token_ids_1 + [self.eos_token_id]
        return ids

    def save_vocabulary(self, save_directory: str, filename_prefix: Optional[str] = None):
        """Write the sentencepiece model as ``[prefix-]ice_text.model`` in ``save_directory``.

        A ``save_directory`` that is not a directory is taken as the target file path.
        """
        if os.path.isdir(save_directory):
            name = (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILE_NAME
            vocab_path = os.path.join(save_directory, name)
        else:
            vocab_path = save_directory
        with open(vocab_path, "wb") as vocab_out:
            vocab_out.write(self.sp_model.serialized_model_proto())
        return (vocab_path,)

    def _pad(self, encoded_inputs, max_length=None, padding_strategy=PaddingStrategy.DO_NOT_PAD,
             pad_to_multiple_of=None, return_attention_mask=None) -> dict:
        """Left-pad one sequence the way the reference does.

        When a target length is known (any padding strategy), the GLM ``attention_mask``
        ((1, L, L) bool, True = hidden) and ``position_ids`` ((2, L)) are added before padding; a
        call without padding returns ``input_ids`` only. ``return_attention_mask`` is ignored, as in
        the reference. Padded rows/columns of the mask are hidden, padded positions are 0.
        """
        input_ids = encoded_inputs[self.model_input_names[0]]
        if padding_strategy == PaddingStrategy.LONGEST:
            max_length = len(input_ids)
        if max_length is not None and pad_to_multiple_of is not None and max_length % pad_to_multiple_of:
            max_length = (max_length // pad_to_multiple_of + 1) * pad_to_multiple_of
        if max_length is not None:
            self._add_glm_masks(encoded_inputs, input_ids)
        if padding_strategy != PaddingStrategy.DO_NOT_PAD and len(input_ids) != max_length:
            self._left_pad(encoded_inputs, max_length - len(input_ids))
        return encoded_inputs

    def _add_glm_masks(self, encoded_inputs, input_ids: List[int]):
        """Add ``attention_mask`` and ``position_ids`` unless already present."""
        if "attention_mask" not in encoded_inputs:
            encoded_inputs["attention_mask"] = glm_attention_mask(input_ids, self.bos_token_id)
        if "position_ids" not in encoded_inputs:
            encoded_inputs["position_ids"] = glm_position_ids(
                input_ids, self.bos_token_id, self.mask_token_id, self.gmask_token_id)

    def _left_pad(self, encoded_inputs, difference: int):
        """Prepend ``difference`` pad entries to every per-token field."""
        if "attention_mask" in encoded_inputs:
            encoded_inputs["attention_mask"] = np.pad(
                encoded_inputs["attention_mask"], pad_width=[(0, 0), (difference, 0), (difference, 0)],
                mode="constant", constant_values=True)
        if "position_ids" in encoded_inputs:
            encoded_inputs["position_ids"] = np.pad(encoded_inputs["position_ids"],
                                                    pad_width=[(0, 0), (difference, 0)])
        if "token_type_ids" in encoded_inputs:
            encoded_inputs["token_type_ids"] = [self.pad_token_type_id] * difference + encoded_inputs[
                "token_type_ids"]
        if "special_tokens_mask" in encoded_inputs:
            encoded_inputs["special_tokens_mask"] = [1] * difference + encoded_inputs["special_tokens_mask"]
        name = self.model_input_names[0]
        encoded_inputs[name] = [self.pad_token_id] * difference + encoded_inputs[name]
