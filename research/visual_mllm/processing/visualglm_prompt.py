"""Prompt construction and answer post-processing for VisualGLM-6B.

The format follows the reference ``chat()`` (VisualGLM-6B ``model/chat.py``; the HF ``visual``
branch builds the same ids):

* prompt text: ``<img></img>`` (only when the conversation has an image), then each history turn as
  ``问：{q}\\n答：{a}\\n``, then ``问：{query}\\n答：``. English mode uses ``Q:{q}\\nA:{a}\\n`` and
  ``Q:{query}\\nA:``.
* ids with an image: ``encode(text up to and including the last "<img>")`` + N placeholder ids +
  ``encode(rest)`` (both without special tokens) + ``[gMASK] <sop>``. N is the number of Q-Former
  queries (32 for the real model); the placeholder is the pad id in SAT and the unk id in the HF code.
  The N placeholder embeddings are later replaced by the projected image embeddings.
* ids without an image: ``encode(prompt)`` with the special tokens appended.
* answer: decode (prompt ids before ``[gMASK]`` + generated ids), convert ASCII punctuation next to CJK
  characters to full width, then keep the text after the last ``答：`` (``A:``), stripped.
* training row (the reference finetune script, ../shared/spec/finetune.md): ``source + [gMASK] <sop> +
  encode(answer) + <eop>`` where source = the prompt ids before ``[gMASK]``; labels from ``<sop>`` on;
  rows are padded with the pad id.

The family-neutral contract (``PromptBuilder``, ``PromptIds``) is in ``prompt.py``.
"""
import re
from typing import List, Optional, Sequence, Tuple, Union

from .prompt import IGNORE_INDEX, History, PromptBuilder, PromptIds, TrainingIds, cut

IMAGE_TAG_OPEN = "<img>"
IMAGE_TAG_CLOSE = "</img>"


# --- ChatGLM-6B / VisualGLM-6B response clean-up ----------------------------------------------------

_CJK = "\u4e00-\u9fff"  # CJK Unified Ideographs, the range the reference checks
# (ASCII mark, full-width replacement); applied in this order, as the reference does
_FULL_WIDTH_PUNCT = ((",", "，"), ("!", "！"), (":", "："), (";", "；"), ("?", "？"))
_PUNCT_RULES = []
for _ascii, _full in _FULL_WIDTH_PUNCT:
    _mark = re.escape(_ascii)
    _PUNCT_RULES.append((re.compile(f"([{_CJK}]){_mark}"), f"\\g<1>{_full}"))   # CJK then mark
    _PUNCT_RULES.append((re.compile(f"{_mark}([{_CJK}])"), f"{_full}\\g<1>"))   # mark then CJK


def process_response(text: str) -> str:
    """ChatGLM-6B's answer clean-up (same in VisualGLM-6B's chat code).

    Strip surrounding whitespace, put the year in for the ``[[训练时间]]`` template slot, then for
    each of , ! : ; ? (in that order) replace the ASCII mark by its full-width form wherever it
    directly follows a CJK ideograph, and then wherever it directly precedes one.
    """
    text = text.strip().replace("[[训练时间]]", "2023年")
    for pattern, replacement in _PUNCT_RULES:
        text = pattern.sub(replacement, text)
    return text


class VisualGLMPromptBuilder(PromptBuilder):
    """VisualGLM-6B prompts.

    Args:
        tokenizer: a ChatGLM-6B tokenizer: ``encode(text, add_special_tokens=...)`` (True appends
            ``[gMASK] <sop>``), ``decode(ids)``, and ``gmask_token_id``, ``bos_token_id``,
            ``pad_token_id``, ``unk_token_id`` (``eos_token_id`` used if present).
        num_image_tokens: number of image placeholder ids = Q-Former query count (config ``image_length``).
        placeholder: "pad" (SAT, default), "unk" (HF remote code) or an explicit id.
    """

    def __init__(self, tokenizer, num_image_tokens: int, placeholder: Union[str, int] = "pad"):
        super().__init__(tokenizer, num_image_tokens, placeholder)

    # -- text ---------------------------------------------------------------------------------------
    @staticmethod
    def turn_markers(english: bool = False) -> Tuple[str, str]:
        """(question marker, answer marker)."""
        return ("Q:", "A:") if english else ("问：", "答：")

    def build_prompt(self, query: str, history: History = (), has_image: bool = False,
                     english: bool = False) -> str:
        ask, answer = self.turn_markers(english)
        parts = [IMAGE_TAG_OPEN + IMAGE_TAG_CLOSE] if has_image else []
        for old_query, old_answer in history:
            parts.append(f"{ask}{old_query}\n{answer}{old_answer}\n")
        parts.append(f"{ask}{query}\n{answer}")
        return "".join(parts)

    # -- ids ----------------------------------------------------------------------------------------
    def _special_suffix(self) -> List[int]:
        return [int(self.tokenizer.gmask_token_id), int(self.tokenizer.bos_token_id)]

    def ids_from_prompt(self, prompt: str, has_image: bool) -> PromptIds:
        """Ids of an already built prompt text (image placeholders after its last ``<img>``)."""
        if not has_image:
            ids = [int(i) for i in self.tokenizer.encode(prompt, add_special_tokens=True)]
            return PromptIds(ids, None, self.num_image_tokens, prompt)
        tag = prompt.rfind(IMAGE_TAG_OPEN)
        if tag < 0:
            raise ValueError(f"has_image=True but the prompt has no {IMAGE_TAG_OPEN} tag: {prompt[:80]!r}")
        pos = tag + len(IMAGE_TAG_OPEN)
        head = [int(i) for i in self.tokenizer.encode(prompt[:pos], add_special_tokens=False)]
        tail = [int(i) for i in self.tokenizer.encode(prompt[pos:], add_special_tokens=False)]
        ids = head + [self.placeholder_id] * self.num_image_tokens + tail + self._special_suffix()
        return PromptIds(ids, len(head), self.num_image_tokens, prompt)

    def build_ids(self, query: str, history: History = (), has_image: bool = False,
                  english: bool = False) -> PromptIds:
        prompt = self.build_prompt(query, history, has_image=has_image, english=english)
        return self.ids_from_prompt(prompt, has_image)

    # -- training -----------------------------------------------------------------------------------
    def training_sample(self, query: str, answer: str, history: History = (), has_image: bool = False,
                        english: bool = False, max_source_length: Optional[int] = None,
                        max_target_length: Optional[int] = None) -> TrainingIds:
        """``source + [gMASK] <sop> + target + <eop>``, labels -100 up to (not including) ``<sop>``, then
        the ids from ``<sop>`` on. The limits cut source to ``max_source_length - 1`` ids and target =
        ``encode(answer)`` to ``max_target_length - 2``, as the reference does."""
        ids = self.build_ids(query, history, has_image=has_image, english=english)
        source, suffix = cut(ids.input_ids[:-2], max_source_length, 1), list(ids.input_ids[-2:])  # [gMASK] <sop>
        target = cut(self.tokenizer.encode(answer, add_special_tokens=False), max_target_length, 2)
        input_ids = source + suffix + target + [int(self.tokenizer.eos_token_id)]
        sop = len(source) + 1
        return TrainingIds(input_ids, [IGNORE_INDEX] * sop + input_ids[sop:], ids.image_start)

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    # -- answer -------------------------------------------------------------------------------------
    def postprocess(self, text: str, english: bool = False) -> str:
        _, answer = self.turn_markers(english)
        return process_response(text).split(answer)[-1].strip()

    def answer_ids(self, input_ids: Sequence[int], generated_ids: Sequence[int]) -> List[int]:
        """The ids the reference decodes: prompt ids before ``[gMASK]`` + generated ids up to ``<eop>``."""
        input_ids = [int(i) for i in input_ids]
        suffix = self._special_suffix()
        if input_ids[-2:] != suffix:
            raise ValueError(f"prompt ids must end with [gMASK] <sop> {suffix}, got {input_ids[-2:]}")
        generated = [int(i) for i in generated_ids]
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is not None and int(eos) in generated:
            generated = generated[:generated.index(int(eos))]
        return input_ids[:-2] + generated

    def decode_response(self, input_ids: Sequence[int], generated_ids: Sequence[int],
                        english: bool = False) -> str:
        """The answer text exactly as the reference ``chat()`` returns it."""
        text = self.tokenizer.decode(self.answer_ids(input_ids, generated_ids))
        return self.postprocess(text, english=english)
