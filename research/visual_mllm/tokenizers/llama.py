"""LLaMA / Vicuna tokenizer (sentencepiece ``tokenizer.model``) for MiniGPT-4 on MindFormers.

Reproduces transformers 4.30's slow ``LlamaTokenizer`` (the version MiniGPT-4 pins, loaded with
``use_fast=False``), which MindFormers' own ``LlamaTokenizer`` does not (it strips the dummy-prefix
``▁`` of the first decoded token and pads with ``<unk>`` by default):

* encoding: ``<s>``, ``</s>`` and ``<unk>`` written in the text are split out (no whitespace is
  stripped around them); every other chunk is encoded by sentencepiece as it is, so each chunk gets
  the dummy prefix ``▁`` (``"a </s> b"`` -> pieces of ``"▁a▁"``, ``</s>``, pieces of ``"▁▁b"``);
* ``encode``/``__call__`` prepend ``<s>`` (``add_bos_token``) and append nothing
  (``add_eos_token=False``); a pair is ``<s> A <s> B``;
* decoding: special tokens are written as their text, with one space inserted before a special
  token that follows ordinary pieces; the other pieces are decoded by sentencepiece (which drops the
  dummy prefix of each run and re-assembles bytes); ``skip_special_tokens`` drops bos, eos, unk (and
  pad) ids; no clean-up of spaces (``clean_up_tokenization_spaces=False``);
* the pad token is set the way MiniGPT-4's ``init_llm`` sets it (``tokenizer.pad_token = "$$"``, an
  attribute set after loading): it is not split out of text, and its id is the id of that piece, or
  the unk id when the model has no such piece.

MiniGPT-4 (Vicuna v0) stops generating at the pieces ``###`` or ``##`` ``#`` (``stop_words_ids``;
``▁###`` is another piece). Every id is read from the model file, none is hard-coded.
"""
import os
from typing import Dict, List, Optional

import sentencepiece as spm
from mindformers.models.tokenization_utils import PreTrainedTokenizer
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from ..paths import ASSETS_DIR

__all__ = ["VicunaTokenizer"]

VOCAB_FILE_NAME = "tokenizer.model"
# the tiny LLaMA-layout tokenizer shipped for the tiny MiniGPT-4 (`vocab_file: null` in its run YAML)
PACKAGED_VOCAB_FILE = os.path.join(ASSETS_DIR, "vicuna_tiny", VOCAB_FILE_NAME)
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# the stop words of MiniGPT-4's demo, as pieces (demo.py: [[835], [2277, 29937]] for Vicuna)
MINIGPT4_STOP_PIECES = (("###",), ("##", "#"))


def load_sentencepiece(vocab_file, sp_model_kwargs=None) -> spm.SentencePieceProcessor:
    """Load a sentencepiece model; a missing or unreadable file is an error that names the path."""
    if vocab_file is None or not os.path.isfile(vocab_file):
        raise FileNotFoundError(f"LLaMA tokenizer model (tokenizer.model) not found: {vocab_file}")
    processor = spm.SentencePieceProcessor(**(sp_model_kwargs or {}))
    try:
        processor.Load(str(vocab_file))
    except (RuntimeError, OSError) as error:
        raise ValueError(f"{vocab_file} is not a valid sentencepiece model: {error}") from error
    return processor


@MindFormerRegister.register(MindFormerModuleType.TOKENIZER)
class VicunaTokenizer(PreTrainedTokenizer):
    """LLaMA / Vicuna tokenizer, compatible with the ``tokenizer.model`` + ``tokenizer_config.json`` of
    an HF LLaMA folder (registered under this name: MindFormers' ``LlamaTokenizer`` behaves differently).
    ``VicunaTokenizer.from_pretrained(folder)`` reads such a folder (MindFormers then warns that its
    config names ``LlamaTokenizer``) or one written by ``save_pretrained(folder, save_json=True)``.

    Args:
        vocab_file (str): path of ``tokenizer.model``.
        unk_token, bos_token, eos_token (str): pieces of the special tokens (``<unk>``, ``<s>``, ``</s>``).
        pad_token (str): pad token, set as an attribute after loading (see the module docstring);
            None (the published config) = no pad token; MiniGPT-4 uses ``"$$"``.
        add_bos_token (bool): prepend ``<s>`` when adding special tokens. Default: True.
        add_eos_token (bool): append ``</s>`` when adding special tokens. Default: False.
        sp_model_kwargs (dict): passed to ``SentencePieceProcessor``.
        clean_up_tokenization_spaces (bool): clean up spaces when decoding. Default: False (as published).
        **kwargs: passed to MindFormers' ``PreTrainedTokenizer``.

    Raises:
        FileNotFoundError: if ``vocab_file`` does not exist.
        ValueError: if it is not a sentencepiece model, or a special token is not one of its pieces.
    """

    vocab_files_names = {"vocab_file": VOCAB_FILE_NAME}
    FILE_LIST = [TOKENIZER_CONFIG_FILE]
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file=None, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token=None,
                 add_bos_token=True, add_eos_token=False, sp_model_kwargs=None,
                 clean_up_tokenization_spaces=False, **kwargs):
        vocab_file = PACKAGED_VOCAB_FILE if vocab_file is None else vocab_file
        # The model must be loaded before the base class initialises: it queries the vocabulary.
        self.sp_model = load_sentencepiece(vocab_file, sp_model_kwargs)
        self.vocab_file = vocab_file
        self.sp_model_kwargs = sp_model_kwargs or {}
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        for token in (unk_token, bos_token, eos_token):
            if token is not None and self._piece_id(str(token)) is None:
                raise ValueError(f"special token {str(token)!r} is not a piece of {vocab_file}")
        super().__init__(unk_token=unk_token, bos_token=bos_token, eos_token=eos_token,
                         add_bos_token=add_bos_token, add_eos_token=add_eos_token,
                         sp_model_kwargs=self.sp_model_kwargs,
                         clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs)
        # After the base init, as MiniGPT-4 does: the pad token is neither added nor split out of text.
        self.pad_token = pad_token

    def _piece_id(self, piece: str) -> Optional[int]:
        """Id of a piece of the model, None if the model has no such piece."""
        index = self.sp_model.piece_to_id(piece)
        return index if self.sp_model.id_to_piece(index) == piece else None

    @property
    def stop_words_ids(self) -> List[List[int]]:
        """MiniGPT-4's stop words as ids of this model: ``[[id('###')], [id('##'), id('#')]]``."""
        stops = []
        for pieces in MINIGPT4_STOP_PIECES:
            ids = [self._piece_id(piece) for piece in pieces]
            if None in ids:
                raise ValueError(f"{self.vocab_file} has no piece for the stop word {''.join(pieces)!r} "
                                 f"split as {list(pieces)}")
            stops.append(ids)
        return stops

    @property
    def vocab_size(self) -> int:
        """Number of sentencepiece pieces."""
        return self.sp_model.get_piece_size()

    def __len__(self) -> int:
        """``vocab_size`` plus the added tokens that got new ids (the special tokens are pieces)."""
        return self.vocab_size + sum(1 for index in self._added_tokens_decoder if index >= self.vocab_size)

    def get_vocab(self) -> Dict[str, int]:
        """Piece -> id for every id, plus the added tokens."""
        vocab = {self.sp_model.id_to_piece(index): index for index in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text, **kwargs) -> List[str]:
        """Sentencepiece pieces of a text chunk that holds no special token (with the dummy prefix)."""
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        """Piece -> id; unknown pieces -> the unk id."""
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp_model.id_to_piece(index)

    def convert_tokens_to_string(self, tokens: List[str]) -> str:
        """Special tokens as text (a space before one that follows ordinary pieces), the rest by sentencepiece."""
        special_tokens = set(self.all_special_tokens)
        out_string, pieces, prev_is_special = "", [], False
        for index, token in enumerate(tokens):
            if token in special_tokens:
                if not prev_is_special and index != 0:
                    out_string += " "
                out_string += self.sp_model.decode(pieces) + token
                pieces, prev_is_special = [], True
            else:
                pieces.append(token)
                prev_is_special = False
        return out_string + self.sp_model.decode(pieces)

    def build_inputs_with_special_tokens(self, token_ids_0: List[int],
                                         token_ids_1: Optional[List[int]] = None) -> List[int]:
        """``<s> A`` (with ``add_eos_token``: ``<s> A </s>``); a pair repeats the layout for B."""
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        ids = bos + token_ids_0 + eos
        if token_ids_1 is not None:
            ids = ids + bos + token_ids_1 + eos
        return ids

    def get_special_tokens_mask(self, token_ids_0: List[int], token_ids_1: Optional[List[int]] = None,
                                already_has_special_tokens: bool = False) -> List[int]:
        """1 where ``build_inputs_with_special_tokens`` puts a bos/eos, 0 elsewhere."""
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        bos = [1] if self.add_bos_token else []
        eos = [1] if self.add_eos_token else []
        mask = bos + [0] * len(token_ids_0) + eos
        if token_ids_1 is not None:
            mask = mask + bos + [0] * len(token_ids_1) + eos
        return mask

    def save_vocabulary(self, save_directory: str, filename_prefix: Optional[str] = None):
        """Write the sentencepiece model as ``[prefix-]tokenizer.model`` in ``save_directory``."""
        name = (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILE_NAME
        vocab_path = os.path.join(save_directory, name)
        with open(vocab_path, "wb") as vocab_out:
            vocab_out.write(self.sp_model.serialized_model_proto())
        return (vocab_path,)
