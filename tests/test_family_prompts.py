"""MiniGPT-4 and MiniGPT4Qwen prompt builders against their fixtures: prompt text, ids, where the image
goes, stop sequences and the answer text of every recorded turn.

A request means the same conversation for every family: questions without image tags, the image
placed by the family (on the conversation's first question). The fixtures record the reference code's
own conversation, so the tags are taken out of their history before asking the builder.
"""
import pytest

from conftest import fixture_path, load_json


def tokenizer(cls_path, *folder):
    import importlib

    module, name = cls_path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name).from_pretrained(str(fixture_path(*folder)))


def minigpt4_builder():
    from visual_mllm.processing.minigpt4_prompt import MiniGPT4PromptBuilder

    reference = load_json("minigpt4", "reference.json")
    tok = tokenizer("visual_mllm.tokenizers.llama.VicunaTokenizer", "minigpt4", "vicuna-tiny")
    return MiniGPT4PromptBuilder(tok, reference["sizes"]["num_query_token"], placeholder="unk"), reference


def minigpt4_turns(reference):
    """(sample name, has_image, query, history, recorded turn) of every turn of every sample."""
    for sample in reference["samples"]:
        answers = []
        for number, (question, turn) in enumerate(zip(sample["questions"], sample["turns"])):
            history = list(zip(sample["questions"][:number], answers))
            yield f"{sample['name']} turn {number}", sample["image"] is not None, question, history, turn
            answers.append(turn["answer"])


def test_minigpt4_prompt_ids_and_answers():
    builder, reference = minigpt4_builder()
    turns = list(minigpt4_turns(reference))
    assert turns
    for name, has_image, query, history, turn in turns:
        ids = builder.build_ids(query, history, has_image=has_image)
        assert ids.prompt == turn["prompt"], name
        first, *rest = turn["segment_ids"]
        if has_image:
            (second,) = rest
            assert ids.input_ids == first + [builder.placeholder_id] * builder.num_image_tokens + second, name
            assert ids.image_start == len(first)
        else:
            assert ids.input_ids == first and ids.image_start is None, name
        assert len(ids) == turn["prompt_len"], name
        assert builder.decode_response(ids.input_ids, turn["generated_ids"]) == turn["answer"], name
    assert builder.stop_sequences() == reference["stop_words_ids"]


def test_minigpt4_answer_is_cut_before_the_stop_text():
    builder, reference = minigpt4_builder()
    _, _, query, history, turn = next(minigpt4_turns(reference))
    ids = builder.build_ids(query, history, has_image=True)
    for stop in builder.stop_sequences():
        generated = list(turn["generated_ids"]) + stop
        assert builder.decode_response(ids.input_ids, generated) == \
            builder.decode_response(ids.input_ids, turn["generated_ids"])


def qwen_builder():
    from visual_mllm.processing.qwen_prompt import QwenPromptBuilder

    reference = load_json("minigpt4qwen", "reference.json")
    tok = tokenizer("visual_mllm.tokenizers.qwen.QWenTokenizer", "minigpt4qwen", "ckpt", "Qwen7B-chat")
    queries = next(len(s["image_positions"]) for s in reference["samples"] if s["image"])
    return QwenPromptBuilder(tok, queries), reference


def untagged(text):
    from visual_mllm.processing.minigpt4_prompt import IMAGE_TAG

    return text.replace(IMAGE_TAG, "")


def test_qwen_prompt_ids_and_answers():
    builder, reference = qwen_builder()
    for sample in reference["samples"]:
        history = [(untagged(q), a) for q, a in sample["history"]]
        has_image = sample["image"] is not None
        ids = builder.build_ids(untagged(sample["query"]), history, has_image=has_image)
        assert ids.prompt == sample["prompt"], sample["name"]
        assert ids.input_ids == sample["input_ids"], sample["name"]
        if has_image:
            assert list(range(*ids.image_span)) == sample["image_positions"], sample["name"]
        else:
            assert ids.image_start is None
        assert builder.decode_response(ids.input_ids, sample["generated_ids"]) == sample["response"], sample["name"]


def test_qwen_answer_stops_at_im_end_and_keeps_the_last_token():
    builder, reference = qwen_builder()
    sample = reference["samples"][-1]
    generated = list(sample["generated_ids"])
    tok = builder.tokenizer
    for stop in builder.stop_sequences():
        # a stop id ends the answer before it, and the token before the stop is kept (no off-by-one)
        assert builder.decode_response([], generated + stop) == tok.decode(generated).strip()
    assert builder.stop_sequences() == [[tok.im_end_id], [tok.im_start_id]]


def test_english_is_visualglm_only():
    builder, _ = minigpt4_builder()
    with pytest.raises(ValueError, match="VisualGLM"):
        builder.build_ids("hi", [], english=True)
