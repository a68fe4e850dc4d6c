"""Qwen-7B-Chat (v1) tokenizer (tiktoken BPE file ``qwen.tiktoken``) for MiniGPT4Qwen on MindFormers.

Reproduces ``QWenTokenizer`` of the Qwen-7B(-Chat) v1 remote code (``tokenization_qwen.py``), which
MindFormers 1.9 does not ship:

* vocabulary: the N ordinary ranks of ``qwen.tiktoken`` (``base64(token bytes) rank`` per line), then
  the specials ``<|endoftext|>`` = N, ``<|im_start|>`` = N+1, ``<|im_end|>`` = N+2,
  ``<|extra_0|>`` ... ``<|extra_204|>`` = N+3 ... N+207 (real N = 151643); ``len(tokenizer)`` = N + 208;
* encoding: NFC normalisation, then tiktoken BPE with Qwen's pre-tokenisation regex. Special-token
  text is recognised by default (``tokenizer(text)``: ``allowed_special="all"``);
  ``encode(text, allowed_special=set())`` (how ``make_context`` encodes message contents) encodes it
  as ordinary text. No BOS/EOS is ever added;
* tokens: an ordinary token is the base64 of its bytes (the reference returns the bytes; base64
  keeps tokens strings, as MindFormers needs, and cannot collide with the ``<|...|>`` specials), a
  special token is its text;
* decoding: tiktoken with ``errors="replace"`` (broken UTF-8 -> U+FFFD); ``skip_special_tokens``
  drops every id >= the ``<|endoftext|>`` id. Ids >= ``len(tokenizer)`` (the model's vocabulary
  padding) cannot be decoded.

Chat generation stops at ``<|im_end|>`` or ``<|im_start|>`` (``stop_words_ids``); ``<|endoftext|>``
(``eod_id``) is the pad/eos id of Qwen's generation config.
"""
import base64
import binascii
import os
import unicodedata
from typing import Dict, List, Optional

import tiktoken
from mindformers.models.tokenization_utils import AddedToken, PreTrainedTokenizer
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from ..paths import ASSETS_DIR

__all__ = ["QWenTokenizer"]

VOCAB_FILE_NAME = "qwen.tiktoken"
# the tiny Qwen-layout vocabulary shipped for the tiny MiniGPT4Qwen (`vocab_file: null` in its run YAML)
PACKAGED_VOCAB_FILE = os.path.join(ASSETS_DIR, "qwen_tiny", VOCAB_FILE_NAME)
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
PAT_STR = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
           r"""|\s+(?!\S)|\s+""")
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
NUM_EXTRA_TOKENS = 205
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END) + tuple(f"<|extra_{i}|>" for i in range(NUM_EXTRA_TOKENS))


def load_tiktoken_ranks(vocab_file) -> Dict[bytes, int]:
    """Read ``qwen.tiktoken``; the ranks must be 0..N-1. Errors name the path (and the line)."""
    if vocab_file is None or not os.path.isfile(vocab_file):
        raise FileNotFoundError(f"Qwen tokenizer file (qwen.tiktoken) not found: {vocab_file}")
    ranks = {}
    with open(vocab_file, "rb") as file:
        for number, line in enumerate(file.read().splitlines(), start=1):
            if not line:
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except (ValueError, binascii.Error) as error:
                raise ValueError(f"{vocab_file}:{number} is not a 'base64 rank' line of a tiktoken file: "
                                 f"{line[:80]!r}") from error
    if not ranks:
        raise ValueError(f"{vocab_file} holds no tokens: not a tiktoken rank file")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{vocab_file}: the ranks are not 0..{len(ranks) - 1}, each once "
                         f"({len(ranks)} distinct tokens)")
    return ranks


def token_text(token: bytes) -> str:
    """The token string of an ordinary token: base64 of its bytes."""
    return base64.b64encode(token).decode("ascii")


@MindFormerRegister.register(MindFormerModuleType.TOKENIZER)
class QWenTokenizer(PreTrainedTokenizer):
    """Qwen v1 tokenizer, compatible with the ``qwen.tiktoken`` + ``tokenizer_config.json`` of Qwen-7B(-Chat).

    Args:
        vocab_file (str): path of ``qwen.tiktoken``.
        errors (str): how invalid UTF-8 is decoded (``bytes.decode`` errors). Default: ``"replace"``.
        **kwargs: passed to MindFormers' ``PreTrainedTokenizer``. Special tokens (``pad_token``,
            ``eos_token``, ...) may only be Qwen specials; none is set by the published config.

    Raises:
        FileNotFoundError: if ``vocab_file`` does not exist.
        ValueError: if it is not a tiktoken rank file, or a special token is not a Qwen special.
    """

    vocab_files_names = {"vocab_file": VOCAB_FILE_NAME}
    FILE_LIST = [TOKENIZER_CONFIG_FILE]
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file=None, errors="replace", **kwargs):
        vocab_file = PACKAGED_VOCAB_FILE if vocab_file is None else vocab_file
        ranks = load_tiktoken_ranks(vocab_file)
        self.vocab_file = vocab_file
        self.errors = errors
        self.special_tokens = {token: len(ranks) + index for index, token in enumerate(SPECIAL_TOKENS)}
        self.encoding = tiktoken.Encoding("Qwen", pat_str=PAT_STR, mergeable_ranks=ranks,
                                          special_tokens=self.special_tokens)
        self.encoder = {token_text(token): rank for token, rank in ranks.items()}
        self.encoder.update(self.special_tokens)
        self.decoder = {index: token for token, index in self.encoder.items()}
        # the published config points AutoTokenizer at remote code this class replaces: not carried into saves
        kwargs.pop("auto_map", None)
        super().__init__(errors=errors, **kwargs)

    @property
    def eod_id(self) -> int:
        """Id of ``<|endoftext|>`` (Qwen's eos and pad id; the first special id)."""
        return self.special_tokens[ENDOFTEXT]

    @property
    def im_start_id(self) -> int:
        return self.special_tokens[IM_START]

    @property
    def im_end_id(self) -> int:
        return self.special_tokens[IM_END]

    @property
    def stop_words_ids(self) -> List[List[int]]:
        """ChatML stop words: ``[[<|im_end|>], [<|im_start|>]]``."""
        return [[self.im_end_id], [self.im_start_id]]

    @property
    def vocab_size(self) -> int:
        """Ordinary ranks plus the 208 specials."""
        return self.encoding.n_vocab

    def __len__(self) -> int:
        return self.encoding.n_vocab

    def get_vocab(self) -> Dict[str, int]:
        """Token -> id for every id (ordinary tokens as base64)."""
        return dict(self.encoder)

    def _add_tokens(self, new_tokens, special_tokens: bool = False) -> int:
        """Only Qwen's own specials can be special tokens, and they already have ids: nothing is added."""
        if new_tokens and not special_tokens:
            raise ValueError("QWenTokenizer cannot add ordinary tokens")
        for token in new_tokens or ():
            content = token.content if isinstance(token, AddedToken) else token
            if content not in self.special_tokens:
                raise ValueError(f"{content!r} is not a Qwen special token ({ENDOFTEXT}, {IM_START}, "
                                 f"{IM_END}, <|extra_0|> ... <|extra_{NUM_EXTRA_TOKENS - 1}|>)")
        return 0

    def tokenize(self, text: str, allowed_special="all", disallowed_special=(), **kwargs) -> List[str]:
        """Tokens of the NFC-normalised text; ``allowed_special=set()`` treats special-token text as text."""
        ids = self.encoding.encode(unicodedata.normalize("NFC", text), allowed_special=allowed_special,
                                   disallowed_special=disallowed_special)
        return [self.decoder[index] for index in ids]

    def _convert_token_to_id(self, token: str) -> int:
        if token not in self.encoder:
            raise ValueError(f"unknown Qwen token {token!r} (ordinary tokens are base64 of their bytes)")
        return self.encoder[token]

    def _convert_id_to_token(self, index: int) -> str:
        """Id -> token (the base class rejects ids >= ``vocab_size`` first)."""
        return self.decoder[index]

    def convert_tokens_to_string(self, tokens: List[str]) -> str:
        """Specials as their text; runs of ordinary tokens as their bytes decoded with ``errors``."""
        text, pending = "", b""
        for token in tokens:
            if token in self.special_tokens:
                text += pending.decode("utf-8", errors=self.errors) + token
                pending = b""
            else:
                pending += base64.b64decode(token)
        return text + pending.decode("utf-8", errors=self.errors)

    def _decode(self, token_ids, skip_special_tokens: bool = False, errors: Optional[str] = None,
                **kwargs) -> str:
        """tiktoken decode; ``skip_special_tokens`` drops every id >= ``eod_id``."""
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        token_ids = [int(index) for index in token_ids]
        if skip_special_tokens:
            token_ids = [index for index in token_ids if index < self.eod_id]
        for index in token_ids:
            if not 0 <= index < len(self):
                raise ValueError(f"id {index} is not a token of {self.vocab_file} ({len(self)} ids)")
        return self.encoding.decode(token_ids, errors=errors or self.errors)

    def save_vocabulary(self, save_directory: str, filename_prefix: Optional[str] = None):
        """Write the ordinary ranks as ``[prefix-]qwen.tiktoken`` (``base64 rank`` lines, rank order)."""
        name = (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILE_NAME
        vocab_path = os.path.join(save_directory, name)
        with open(vocab_path, "w", encoding="utf-8") as vocab_out:
            for token, rank in sorted(self.encoder.items(), key=lambda item: item[1]):
                if token not in self.special_tokens:
                    vocab_out.write(f"{token} {rank}\n")
        return (vocab_path,)
