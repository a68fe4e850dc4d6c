"""MiniGPT4Qwen prompts: Qwen-7B-Chat's ChatML (`make_context`), with the image as `<|extra_0|>` ids.

* text: `<|im_start|>system\n{system}<|im_end|>`, then per history turn
  `\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>`, then
  `\n<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n`. With an image, the conversation's first
  question (the oldest history turn's, else the query) starts with `<Img><ImageHere></Img>` (cli_demo's rule).
* ids: `<ImageHere>` becomes N x `<|extra_0|>` and the whole text is tokenised with the special tokens
  recognised; those N ids are the placeholders the image embeddings replace. (A question's own text is
  tokenised the same way: literal special-token text in it is recognised, as MiniGPT4Qwen does.)
* answer: generation stops at `<|im_end|>` or `<|im_start|>`; the answer is the generated ids before the
  first of them, decoded (`errors="replace"`) and stripped. As in Qwen's `decode_tokens`, when neither stop
  id occurs the last generated id is dropped too (the reference's off-by-one, reproduced).
* training row: the prompt ids above, then `tokenizer(answer)` and `<|im_end|>` (where the chat stops),
  labels on both; padding with `<|endoftext|>` (Qwen's finetune code pads with it).
"""
from typing import List, Optional, Sequence

from .minigpt4_prompt import IMAGE_HERE, IMAGE_TAG, refuse_english
from .prompt import History, PromptBuilder, PromptIds, TrainingIds, conversation_questions, prompt_then_target

IMAGE_PLACEHOLDER = "<|extra_0|>"
SYSTEM = "You are a helpful assistant."


class QwenPromptBuilder(PromptBuilder):
    """MiniGPT4Qwen prompts (tokenizer: `QWenTokenizer`); the placeholder is always `<|extra_0|>`."""

    def __init__(self, tokenizer, num_image_tokens: int, placeholder=None, system: str = SYSTEM):
        super().__init__(tokenizer, num_image_tokens, tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER))
        if placeholder is not None and int(placeholder) != self.placeholder_id:
            raise ValueError(f"MiniGPT4Qwen's image placeholder is {IMAGE_PLACEHOLDER} (id {self.placeholder_id}), "
                             f"not {placeholder}")
        self.system = system

    def build_prompt(self, query: str, history: History = (), has_image: bool = False,
                     english: bool = False) -> str:
        refuse_english("MiniGPT4Qwen", english)
        questions = conversation_questions(query, history, IMAGE_TAG if has_image else None)
        parts = [f"<|im_start|>system\n{self.system}<|im_end|>"]
        for question, (_, answer) in zip(questions, history):
            parts.append(f"\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>")
        parts.append(f"\n<|im_start|>user\n{questions[-1]}<|im_end|>\n<|im_start|>assistant\n")
        return "".join(parts)

    def build_ids(self, query: str, history: History = (), has_image: bool = False,
                  english: bool = False) -> PromptIds:
        prompt = self.build_prompt(query, history, has_image=has_image, english=english)
        text = prompt.replace(IMAGE_HERE, IMAGE_PLACEHOLDER * self.num_image_tokens)
        ids = [int(i) for i in self.tokenizer(text)["input_ids"]]
        if not has_image:
            return PromptIds(ids, None, self.num_image_tokens, prompt)
        start = ids.index(self.placeholder_id)
        if ids[start:start + self.num_image_tokens] != [self.placeholder_id] * self.num_image_tokens:
            raise ValueError(f"the prompt holds {IMAGE_PLACEHOLDER} text of its own: the image slots are not contiguous")
        return PromptIds(ids, start, self.num_image_tokens, prompt)

    def stop_sequences(self) -> List[List[int]]:
        return [list(ids) for ids in self.tokenizer.stop_words_ids]

    def training_sample(self, query: str, answer: str, history: History = (), has_image: bool = False,
                        english: bool = False, max_source_length: Optional[int] = None,
                        max_target_length: Optional[int] = None) -> TrainingIds:
        """The ChatML prompt, then the answer's ids and `<|im_end|>`; labels on those."""
        prompt = self.build_ids(query, history, has_image=has_image, english=english)
        target = [int(i) for i in self.tokenizer(answer)["input_ids"]] + [int(self.tokenizer.im_end_id)]
        return prompt_then_target(prompt, target, max_source_length, max_target_length)

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.eod_id)

    def postprocess(self, text: str, english: bool = False) -> str:
        return text.strip()

    def decode_response(self, input_ids: Sequence[int], generated_ids: Sequence[int],
                        english: bool = False) -> str:
        ids = [int(i) for i in generated_ids]
        stops = {int(seq[0]) for seq in self.tokenizer.stop_words_ids}
        end = next((k for k, i in enumerate(ids) if i in stops), max(len(ids) - 1, 0))
        return self.postprocess(self.tokenizer.decode(ids[:end]), english)
