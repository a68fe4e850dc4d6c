"""The prompt contract every model family implements, and what it shares.

A family's `PromptBuilder` turns (query, history, has_image) into the prompt text and its token ids
with the place of the image placeholders (`PromptIds`), fits the history into a token budget, and
turns generated ids back into the answer text. For finetuning it builds the training row of an answer
(`TrainingIds`: the prompt as inference builds it, then the answer in the form the family's reference
training teaches it, with labels). Shared code (inference, chat, pipeline, export, finetune) only uses
this interface; `english` is VisualGLM's language switch (its Q:/A: format), which families with one
prompt language refuse.
"""
import abc
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

History = Sequence[Tuple[str, str]]
IGNORE_INDEX = -100  # the label of an id that is not trained on (the loss skips it)

class PromptTooLongError(ValueError):
    """The prompt does not fit the token budget even with every history turn dropped."""

    def __init__(self, message: str, needed: int, budget: int):
        super().__init__(message)
        self.needed = needed
        self.budget = budget

    @property
    def over_by(self) -> int:
        return self.needed - self.budget


@dataclass
class PromptIds:
    """Token ids of one prompt and where the image placeholders are.

    ``image_start`` is the index of the first placeholder (``pre_image`` in the reference code) or
    None for a text-only prompt (the reference passes ``pre_image=0`` there, which means "no image").
    """

    input_ids: List[int]
    image_start: Optional[int]
    num_image_tokens: int
    prompt: str

    @property
    def has_image(self) -> bool:
        return self.image_start is not None

    @property
    def pre_image(self) -> int:
        """The reference's value: the placeholder start, or 0 for text-only prompts."""
        return 0 if self.image_start is None else self.image_start

    @property
    def image_span(self) -> Optional[Tuple[int, int]]:
        """[start, end) of the placeholder ids, or None."""
        if self.image_start is None:
            return None
        return self.image_start, self.image_start + self.num_image_tokens

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class TrainingIds:
    """One training row: the prompt (no loss), then the target the model learns to generate.

    ``labels[i]`` is ``input_ids[i]`` where the loss counts and IGNORE_INDEX elsewhere (the loss compares
    the logits at i-1 with ``labels[i]``). ``image_start`` is as in PromptIds.
    """

    input_ids: List[int]
    labels: List[int]
    image_start: Optional[int]

    @property
    def source_length(self) -> int:
        """Ids before the first trained one: the prompt with its image placeholders and format ids."""
        return next((i for i, label in enumerate(self.labels) if label != IGNORE_INDEX), len(self.labels))

    @property
    def target_length(self) -> int:
        """Ids from the first trained one on: the answer with the format's ids around it."""
        return len(self.input_ids) - self.source_length


def cut(ids: Sequence[int], limit: Optional[int], reserved: int = 0) -> List[int]:
    """The first ``limit - reserved`` ids (all of them when limit is None): a row part cut to its length
    limit, leaving ``reserved`` ids of room for the format's own ids around it."""
    ids = [int(i) for i in ids]
    return ids if limit is None else ids[:max(int(limit) - reserved, 0)]


def prompt_then_target(prompt: PromptIds, target: Sequence[int], max_source_length: Optional[int] = None,
                       max_target_length: Optional[int] = None) -> TrainingIds:
    """The training row ``prompt ids + target`` with labels on the target only; the limits cut the end of
    each part (the truncation of the MiniGPT-4 and Qwen finetune code: the row's tail goes)."""
    source, target = cut(prompt.input_ids, max_source_length), cut(target, max_target_length)
    return TrainingIds(source + target, [IGNORE_INDEX] * len(source) + target, prompt.image_start)


def conversation_questions(query: str, history: History, image_tag: Optional[str]) -> List[str]:
    """The questions of a conversation, oldest first; with an `image_tag`, the first one carries it (the
    image belongs to the conversation's first turn, and every turn re-sends it there)."""
    questions = [question for question, _ in history] + [query]
    if image_tag is not None:
        questions[0] = image_tag + questions[0]
    return questions


def prompt_budget(max_length: int, max_new_tokens: int) -> int:
    """Tokens left for the prompt when ``max_new_tokens`` must fit in a context of ``max_length``."""
    budget = int(max_length) - int(max_new_tokens)
    if budget <= 0:
        raise PromptTooLongError(
            f"no room for a prompt: max_new_tokens ({max_new_tokens}) leaves {budget} of the "
            f"{max_length}-token context", needed=1, budget=budget)
    return budget


class PromptBuilder(abc.ABC):
    """What a model family's prompt code provides to the chat/generation loop.

    Built as ``cls(tokenizer, num_image_tokens, placeholder)``: the family's tokenizer, the number of
    image placeholder ids a prompt holds (the Q-Former queries) and the id that fills them: an int,
    or "pad" / "unk" for the tokenizer's pad / unk id.
    """

    # the prompt templates a request may name (`template`); a family without any takes only None
    templates: Tuple[str, ...] = ()

    def __init__(self, tokenizer, num_image_tokens: int, placeholder: Union[str, int]):
        if int(num_image_tokens) <= 0:
            raise ValueError(f"num_image_tokens must be positive, got {num_image_tokens!r}")
        self.tokenizer = tokenizer
        self.num_image_tokens = int(num_image_tokens)
        self.placeholder_id = self._resolve_placeholder(tokenizer, placeholder)

    @staticmethod
    def _resolve_placeholder(tokenizer, placeholder) -> int:
        if isinstance(placeholder, bool):
            raise ValueError(f"placeholder must be 'pad', 'unk' or an int id, got {placeholder!r}")
        if isinstance(placeholder, int):
            return placeholder
        names = {"pad": "pad_token_id", "unk": "unk_token_id"}
        if placeholder not in names:
            raise ValueError(f"placeholder must be 'pad', 'unk' or an int id, got {placeholder!r}")
        value = getattr(tokenizer, names[placeholder], None)
        if value is None:
            raise ValueError(f"tokenizer has no {names[placeholder]} to use as the image placeholder")
        return int(value)

    def stop_sequences(self) -> List[List[int]]:
        """Id sequences that end an answer when the generated ids end with one (besides the LLM's eos)."""
        return []

    @abc.abstractmethod
    def decode_response(self, input_ids: Sequence[int], generated_ids: Sequence[int],
                        english: bool = False) -> str:
        """The answer text of `generated_ids` (which may end with a stop sequence) after the prompt `input_ids`."""

    @abc.abstractmethod
    def build_prompt(self, query: str, history: History = (), has_image: bool = False,
                     english: bool = False) -> str:
        """The prompt text of one turn."""

    @abc.abstractmethod
    def build_ids(self, query: str, history: History = (), has_image: bool = False,
                  english: bool = False) -> PromptIds:
        """Token ids of one turn, with the image placeholder location."""

    @abc.abstractmethod
    def postprocess(self, text: str, english: bool = False) -> str:
        """The answer from the decoded text."""

    @abc.abstractmethod
    def training_sample(self, query: str, answer: str, history: History = (), has_image: bool = False,
                        english: bool = False, max_source_length: Optional[int] = None,
                        max_target_length: Optional[int] = None) -> TrainingIds:
        """The training row that teaches `answer` to `query` (after `history`): the ids of `build_ids`, then
        the answer as the family's reference training encodes it (with its end ids), labels on that part.

        With the limits, the prompt part is cut to at most ``max_source_length`` ids and the target part to
        at most ``max_target_length`` (``TrainingIds.source_length`` / ``target_length``), where the
        family's reference finetune code cuts; without them nothing is cut.
        """

    @property
    @abc.abstractmethod
    def pad_id(self) -> int:
        """The id that right-pads training rows (masked out and never trained on): the family's reference pad."""

    def check_template(self, template: Optional[str]):
        """Refuse a template name the family does not have (None, its default, always fits)."""
        if template is not None and template not in self.templates:
            known = f"one of {', '.join(self.templates)}" if self.templates else "none: leave it unset"
            raise ValueError(f"prompt template {template!r}: {type(self).__name__} templates are {known}")

    def fit_history(self, query: str, history: History, max_prompt_tokens: Optional[int],
                    has_image: bool = False, english: bool = False,
                    template: Optional[str] = None) -> Tuple[List[Tuple[str, str]], PromptIds]:
        """Drop the oldest history turns until the prompt has at most ``max_prompt_tokens`` ids.

        `template`: one of the builder's `templates` (passed on to build_ids), None for its default.
        max_prompt_tokens None: no limit (the whole history is kept).
        Returns (kept history, ids). Raises PromptTooLongError if even the bare query (no history)
        is too long, saying by how many tokens.
        """
        self.check_template(template)
        named = {} if template is None else {"template": template}
        turns = [tuple(turn) for turn in history]
        for start in range(len(turns) + 1):
            kept = turns[start:]
            ids = self.build_ids(query, kept, has_image=has_image, english=english, **named)
            if max_prompt_tokens is None or len(ids) <= max_prompt_tokens:
                return kept, ids
        dropped = f" with all {len(turns)} history turn(s) dropped" if turns else ""
        raise PromptTooLongError(
            f"prompt too long: the query alone{dropped} needs {len(ids)} tokens "
            f"({'with' if has_image else 'without'} the image placeholders) but the budget is "
            f"{max_prompt_tokens}; it is over by {len(ids) - max_prompt_tokens} token(s). "
            "Shorten the query or lower max_new_tokens.",
            needed=len(ids), budget=max_prompt_tokens)
