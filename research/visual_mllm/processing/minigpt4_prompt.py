"""MiniGPT-4 (Vicuna v0) prompts: `CONV_VISION_Vicuna0` of MiniGPT-4's conversation code.

* text: the system prompt, then `###Human: {q}###Assistant: {a}` per history turn and
  `###Human: {query}###Assistant: ` (trailing space). With an image, the first question of the
  conversation (the oldest history turn's, else the query) is `<Img><ImageHere></Img> {question}`.
* ids: the text is split at `<ImageHere>`; the first segment is tokenised with BOS, the second without
  (both get sentencepiece's dummy prefix); N placeholder ids stand between them, replaced later by the
  N projected image embeddings.
* answer: generation stops at `###` (the pieces `###`, or `##` `#`: the tokenizer's `stop_words_ids`) or
  at `</s>`; the text is `decode(ids, skip_special_tokens=True).split('###')[0].split('Assistant:')[-1].strip()`.
* training row: the prompt ids above, then MiniGPT-4's stage-2 target `tokenizer(answer + "###",
  add_special_tokens=False)` (the answer and its end symbol), labels on that target only; padding with the
  id of MiniGPT-4's pad token `$$`. (MiniGPT-4's own stage 2 wraps the instruction as
  `###Human: <Img><ImageHere></Img> {q} ###Assistant: ` without the system text; training on the chat
  prompt instead teaches the model exactly what run_infer.py sends it.)
"""
from typing import List, Optional, Sequence

from .prompt import History, PromptBuilder, PromptIds, TrainingIds, conversation_questions, prompt_then_target

IMAGE_HERE = "<ImageHere>"
IMAGE_TAG = f"<Img>{IMAGE_HERE}</Img>"
SEPARATOR = "###"   # also the end symbol of a training target (MiniGPT-4's `end_sym`)
PAD_TOKEN = "$$"    # MiniGPT-4 sets `llama_tokenizer.pad_token = "$$"`
ROLES = ("Human: ", "Assistant: ")
SYSTEM = ("Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I "
          "provide it to you. Please answer my questions.")


def refuse_english(family, english):
    """Families with one prompt language have no `english` switch (VisualGLM's Q:/A: format)."""
    if english:
        raise ValueError(f"english=True is VisualGLM's Q:/A: prompt format; {family} prompts have no such "
                         "switch (leave it false)")


class MiniGPT4PromptBuilder(PromptBuilder):
    """MiniGPT-4 prompts (tokenizer: `VicunaTokenizer`)."""

    def __init__(self, tokenizer, num_image_tokens: int, placeholder="unk", system: str = SYSTEM):
        super().__init__(tokenizer, num_image_tokens, placeholder)
        self.system = system

    def build_prompt(self, query: str, history: History = (), has_image: bool = False,
                     english: bool = False) -> str:
        refuse_english("MiniGPT-4", english)
        questions = conversation_questions(query, history, IMAGE_TAG + " " if has_image else None)
        ask, answer = ROLES
        parts = [self.system + SEPARATOR]
        for question, (_, old_answer) in zip(questions, history):
            parts.append(f"{ask}{question}{SEPARATOR}{answer}{old_answer}{SEPARATOR}")
        parts.append(f"{ask}{questions[-1]}{SEPARATOR}{answer}")
        return "".join(parts)

    def build_ids(self, query: str, history: History = (), has_image: bool = False,
                  english: bool = False) -> PromptIds:
        prompt = self.build_prompt(query, history, has_image=has_image, english=english)
        if not has_image:
            return PromptIds(self._encode(prompt, True), None, self.num_image_tokens, prompt)
        head, tail = prompt.split(IMAGE_HERE)
        first = self._encode(head, True)
        ids = first + [self.placeholder_id] * self.num_image_tokens + self._encode(tail, False)
        return PromptIds(ids, len(first), self.num_image_tokens, prompt)

    def _encode(self, text, bos) -> List[int]:
        return [int(i) for i in self.tokenizer(text, add_special_tokens=bos)["input_ids"]]

    def stop_sequences(self) -> List[List[int]]:
        return [list(ids) for ids in self.tokenizer.stop_words_ids]

    def training_sample(self, query: str, answer: str, history: History = (), has_image: bool = False,
                        english: bool = False, max_source_length: Optional[int] = None,
                        max_target_length: Optional[int] = None) -> TrainingIds:
        """The chat prompt, then `answer###` tokenised without BOS; labels on that target."""
        prompt = self.build_ids(query, history, has_image=has_image, english=english)
        return prompt_then_target(prompt, self._encode(answer + SEPARATOR, False), max_source_length,
                                  max_target_length)

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.convert_tokens_to_ids(PAD_TOKEN))  # the unk id when `$$` is no piece

    def postprocess(self, text: str, english: bool = False) -> str:
        return text.split(SEPARATOR)[0].split("Assistant:")[-1].strip()

    def decode_response(self, input_ids: Sequence[int], generated_ids: Sequence[int],
                        english: bool = False) -> str:
        text = self.tokenizer.decode([int(i) for i in generated_ids], skip_special_tokens=True)
        return self.postprocess(text, english)
