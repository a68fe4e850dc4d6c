"""CogVLM (cogvlm-chat-hf) prompts: `build_conversation_input_ids` of its remote code, driven as THUDM's
`basic_demo/cli_demo_hf.py` drives it.

* templates (`_history_to_prompt`): `chat` = `Question: {q} Answer: {a}\n` per history turn, then
  `Question: {query} Answer:`; `vqa` = the same with `Short answer:`; `base` = the query alone (history
  ignored). The release's config.json says `template_version: chat`, the default of image conversations.
* text-only conversations (the demo's): without a named template, the first query is wrapped in Vicuna's
  system prompt (`TEXT_ONLY`), a later one is `"".join(f"{old_query} {response}\n")` over the history +
  `USER: {query} ASSISTANT:`, with `base`; the demo keeps the *wrapped* queries in its history, so an old
  query is rebuilt here the same way from the turns before it. A named template applies to text-only
  prompts as the remote code applies it without an image.
* ids: `[BOS] + [placeholder] x ((S/p)^2 + 2) + encode(prompt, no special tokens)` (the image block right
  after BOS, in every turn; no block without an image); the placeholder ids are never looked at.
* answer: `decode(ids)` with special tokens kept, then `split("</s>")[0]`; generation stops at EOS only.
* training row: the prompt ids, then the answer's ids and EOS (the language-model labels of the HF remote
  code: every answer token and the end), labels on those; padding with the pad (= unk) id.
"""
from typing import List, Optional, Sequence

from .minigpt4_prompt import refuse_english
from .prompt import History, PromptBuilder, PromptIds, TrainingIds, prompt_then_target

TEMPLATES = {"chat": "Answer:", "vqa": "Short answer:", "base": None}
DEFAULT_TEMPLATE = "chat"  # config.json's template_version
TEXT_ONLY = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
             "detailed, and polite answers to the user's questions. USER: {} ASSISTANT:")
END = "</s>"


def history_to_prompt(template, history, query):
    """The remote code's `_history_to_prompt`."""
    answer_format = TEMPLATES[template]
    if answer_format is None:
        return query
    turns = "".join(f"Question: {old} {answer_format} {response}\n" for old, response in history)
    return f"{turns}Question: {query} {answer_format}"


def text_only_prompt(history, query):
    """The demo's text-only query after `history` (plain turns; the demo's stored queries are rebuilt)."""
    stored = []
    for old, response in history:
        stored.append((vicuna_turn(stored, old), response))
    return vicuna_turn(stored, query)


def vicuna_turn(stored, query):
    if not stored:
        return TEXT_ONLY.format(query)
    return "".join(f"{old} {response}\n" for old, response in stored) + f"USER: {query} ASSISTANT:"


class CogVLMPromptBuilder(PromptBuilder):
    """CogVLM prompts (tokenizer: `VicunaTokenizer` of vicuna-7b-v1.5); `template` is the default template of
    image conversations (None: `chat`); `build_ids(template=...)` names one per request."""

    templates = tuple(TEMPLATES)

    def __init__(self, tokenizer, num_image_tokens: int, placeholder="unk", template: Optional[str] = None):
        super().__init__(tokenizer, num_image_tokens, placeholder)
        self.check_template(template)
        self.template = template or DEFAULT_TEMPLATE

    def build_prompt(self, query: str, history: History = (), has_image: bool = False,
                     english: bool = False, template: Optional[str] = None) -> str:
        refuse_english("CogVLM", english)
        self.check_template(template)
        history = [tuple(turn) for turn in history]
        if not has_image and template is None:
            return text_only_prompt(history, query)
        return history_to_prompt(template or self.template, history, query)

    def build_ids(self, query: str, history: History = (), has_image: bool = False,
                  english: bool = False, template: Optional[str] = None) -> PromptIds:
        prompt = self.build_prompt(query, history, has_image, english, template)
        image = [self.placeholder_id] * self.num_image_tokens if has_image else []
        ids = [int(self.tokenizer.bos_token_id)] + image + self._encode(prompt)
        return PromptIds(ids, 1 if has_image else None, self.num_image_tokens, prompt)

    def _encode(self, text) -> List[int]:
        return [int(i) for i in self.tokenizer(text, add_special_tokens=False)["input_ids"]]

    def training_sample(self, query: str, answer: str, history: History = (), has_image: bool = False,
                        english: bool = False, max_source_length: Optional[int] = None,
                        max_target_length: Optional[int] = None) -> TrainingIds:
        """The prompt, then the answer's ids and EOS; labels on those."""
        prompt = self.build_ids(query, history, has_image=has_image, english=english)
        target = self._encode(answer) + [int(self.tokenizer.eos_token_id)]
        return prompt_then_target(prompt, target, max_source_length, max_target_length)

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.unk_token_id)

    def postprocess(self, text: str, english: bool = False) -> str:
        return text.split(END)[0]

    def decode_response(self, input_ids: Sequence[int], generated_ids: Sequence[int],
                        english: bool = False) -> str:
        return self.postprocess(self.tokenizer.decode([int(i) for i in generated_ids]), english)
