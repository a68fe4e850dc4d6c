"""CogVLM (cogvlm-chat-hf) against the outputs of the real remote code (../shared/fixtures/cogvlm/).

The fixture's tiny release is converted once by convert_weight.py (conftest `converted_cogvlm`) and loaded once
(`cogvlm`); every size, prompt, id and expected value comes from reference.json / reference.npz.

Tolerances: the image side is compared within 1e-4 (measured: ~7e-6 ViT, ~1e-6 image embeddings). Prompt logits
within 2e-4: the logits reach |73| (std 16), and the fixture's own float64 re-implementation differs from the
float32 reference by up to 1.04e-4 (independent_check.json), so 1e-4 would test the reference's rounding; the
port measures 1.3e-4. Greedy tokens must be identical (every step's top-1 - top-2 margin is > 0.1).
"""
import numpy as np
import pytest

from conftest import REPO_ROOT, fixture_path, load_json, steps_where_margins_allow

FIXTURE = "cogvlm"
SEQ_LENGTH = 128  # the longest recorded prompt (95) + 16 new tokens, rounded up


@pytest.fixture(scope="session")
def reference():
    return load_json(FIXTURE, "reference.json")


@pytest.fixture(scope="session")
def arrays():
    return np.load(fixture_path(FIXTURE, "reference.npz"))


@pytest.fixture(scope="session")
def cogvlm(converted_cogvlm):
    """(model, processor) of the converted fixture."""
    from visual_mllm.registry import load_from_yaml

    return load_from_yaml(converted_cogvlm / "run_cogvlm.yaml", seq_length=SEQ_LENGTH)


def image_of(sample):
    return None if sample["image"] is None else str(fixture_path(FIXTURE, sample["image"]))


def recorded_turn(sample):
    return sample["turns"][sample["recorded_turn"]]


def test_image_side_matches_the_remote_code(cogvlm, reference, arrays):
    """pixel values, EVA2-CLIP output (CLS first) and [boi, GLU adapter rows, eoi] of every image sample."""
    from mindspore import Tensor

    model, processor = cogvlm
    checked = 0
    for sample in reference["samples"]:
        if sample["image"] is None:
            continue
        key = sample["name"]
        pixels = processor.preprocess_image(image_of(sample))
        np.testing.assert_allclose(pixels, arrays[f"{key}_pixel_values"], rtol=0, atol=1e-6)
        vit_out, adapter_out, image_embeds = (t.asnumpy()[0] for t in
                                              model.image_encoder.encode_with_intermediates(Tensor(pixels)))
        np.testing.assert_allclose(vit_out, arrays[f"{key}_vit_out"], rtol=0, atol=1e-4)
        np.testing.assert_allclose(adapter_out, arrays[f"{key}_image_embeds"][1:-1], rtol=0, atol=1e-4)
        np.testing.assert_allclose(image_embeds, arrays[f"{key}_image_embeds"], rtol=0, atol=1e-4)
        checked += 1
    assert checked == 2


def test_prompt_ids_token_types_and_positions(cogvlm, reference, arrays):
    """Every turn's prompt text and ids as the demo builds them; the recorded turn's token types, positions
    (prompt and prompt + answer) and vision-expert mask as the remote code computes them."""
    from mindspore import Tensor
    from visual_mllm.generation.generator import PromptRow, token_types

    model, processor = cogvlm
    builder = processor.prompt_builder
    for sample in reference["samples"]:
        has_image = sample["image"] is not None
        for turn in sample["turns"]:
            ids = builder.build_ids(turn["user_text"], turn["history"], has_image=has_image)
            assert ids.prompt == turn["prompt_text"], sample["name"]
            assert ids.input_ids == turn["input_ids"], sample["name"]
        key, turn = sample["name"], recorded_turn(sample)
        row = PromptRow(turn["input_ids"], 1 if has_image else None)
        types = token_types([row], len(row.ids), model.num_image_tokens)
        assert types[0].tolist() == arrays[f"{key}_token_type_ids"].tolist()
        positions, _ = model.llm.positions.prompt([row.ids], len(row.ids), types)
        assert positions[0, 0].tolist() == arrays[f"{key}_position_ids"].tolist()
        full = len(arrays[f"{key}_full_position_ids"])
        answer_types = np.pad(types, ((0, 0), (0, full - len(row.ids))))  # generated tokens: text
        extended = model.llm.positions.extend([row.ids], positions, full, answer_types)
        assert extended[0, 0].tolist() == arrays[f"{key}_full_position_ids"].tolist()
        route = model.llm.route(Tensor(types), False).asnumpy()[0, :, 0]  # the vision-expert choice
        assert route.astype(int).tolist() == arrays[f"{key}_vision_expert_mask"].tolist()


def prompt_logits(model, sample, arrays):
    """[S, V] logits of every prompt position of a recorded sample (its ids and pixels from the npz)."""
    from mindspore import Tensor
    from visual_mllm.generation.generator import NO_IMAGE, PromptRow, token_types

    key = sample["name"]
    ids = arrays[f"{key}_input_ids"].astype(np.int32)[None]  # [1,S]
    has_image = sample["image"] is not None
    row = PromptRow(ids[0].tolist(), 1 if has_image else None)
    types = token_types([row], ids.shape[1], model.num_image_tokens)
    positions, prefix = model.llm.positions.prompt([row.ids], ids.shape[1], types)
    if has_image:
        image_embeds = model.image_encoder(Tensor(arrays[f"{key}_pixel_values"]))
    else:
        image_embeds = Tensor(np.zeros((1, model.num_image_tokens, model.config.llm_config.hidden_size), np.float32))
    start = Tensor(np.array([1 if has_image else NO_IMAGE], np.int32))
    return model(Tensor(ids), image_embeds, start, Tensor(positions), Tensor(np.array([ids.shape[1]], np.int32)),
                 Tensor(prefix), Tensor(types)).asnumpy()[0]


def test_prompt_logits_match_the_remote_code(cogvlm, reference, arrays):
    """Logits of every prompt position (image, two-turn and text-only samples) within 2e-4 (module docstring)."""
    model, _ = cogvlm
    for sample in reference["samples"]:
        np.testing.assert_allclose(prompt_logits(model, sample, arrays), arrays[f"{sample['name']}_logits"], rtol=0,
                                   atol=2e-4, err_msg=sample["name"])


def test_every_turn_in_one_batch_with_and_without_cache(cogvlm, reference):
    """Every turn of every sample (image chat, its second turn with the history the demo kept, text-only: rows
    of different lengths, right-padded) in one batch, with and without the KV cache: each row gives the
    reference's greedy ids (which the remote code generated one conversation at a time) and the demo's
    response (decoded, cut at </s>)."""
    from visual_mllm.generation.sampling import GenerationConfig
    from visual_mllm.inference import ChatRequest, answer

    model, processor = cogvlm
    turns = [(sample, turn) for sample in reference["samples"] for turn in sample["turns"]]
    requests = [ChatRequest(turn["user_text"], image_of(sample), turn["history"]) for sample, turn in turns]
    config = GenerationConfig(max_new_tokens=16, eos_token_id=model.config.llm_config.eos_token_id)
    for use_past in (True, False):
        results = answer(model, processor, requests, config, use_past=use_past)
        assert [r.input_ids for r in results] == [turn["input_ids"] for _, turn in turns]
        assert [r.generated_ids for r in results] == [turn["generated_ids"] for _, turn in turns], use_past
        assert [r.response for r in results] == [turn["response"] for _, turn in turns], use_past


def test_training_rows_and_batches(cogvlm):
    """A finetune row is the chat prompt as inference builds it, then the answer and </s> (labels on those); a
    batch carries the token types of its image rows and CogVLM's positions for them."""
    from visual_mllm.finetune.config import load_finetune_config
    from visual_mllm.finetune.datasets import IGNORE_INDEX, BatchSource, load_dataset
    from visual_mllm.llm.cogvlm import row_positions

    model, processor = cogvlm
    _, cfg = load_finetune_config(REPO_ROOT / "configs" / "cogvlm_tiny" / "lora.yaml")
    data = load_dataset(cfg.dataset, processor)
    tokenizer = processor.tokenizer
    for sample in data.samples:
        prompt = processor.prompt_builder.build_ids(sample.record.prompt, sample.record.history, has_image=True)
        n = len(prompt.input_ids)
        target = tokenizer(sample.record.label, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert sample.input_ids == prompt.input_ids + target
        assert sample.labels == [IGNORE_INDEX] * n + target and sample.image_start == 1
    batch = BatchSource(data, processor, model.llm.positions, cfg.dataset, batch_size=2, seed=0).batch(0)
    for k in range(2):
        length = batch["valid_length"][k]
        types = batch["token_types"][k]
        assert types[1:1 + model.num_image_tokens].all() and types.sum() == model.num_image_tokens
        assert batch["position_ids"][k, 0, :length].tolist() == row_positions(types[:length]).tolist()


def test_text_only_history_is_rebuilt_as_the_demo_keeps_it(cogvlm, reference):
    """cli_demo_hf.py keeps the *wrapped* text-only queries in its history (its loop, replayed here over three
    turns); the builder gets the plain turns and must give the demo's prompt of every turn. The first turn's
    wrapping is the recorded sample's."""
    _, processor = cogvlm
    sample = next(s for s in reference["samples"] if s["image"] is None)
    first = sample["turns"][0]
    system = first["query"][:first["query"].index(first["user_text"])]  # the demo's text_only_template head
    queries, responses = [first["user_text"], "And then?", "Why?"], ["first answer", "second answer", "unused"]
    demo_history, plain_history = [], []
    for number, (query, response) in enumerate(zip(queries, responses)):
        if number == 0:
            wrapped = f"{system}{query} ASSISTANT:"
        else:
            wrapped = "".join(f"{old} {answer}\n" for old, answer in demo_history) + f"USER: {query} ASSISTANT:"
        assert processor.prompt_builder.build_prompt(query, plain_history) == wrapped, number
        demo_history.append((wrapped, response))
        plain_history.append((query, response))
    assert processor.prompt_builder.build_prompt(queries[0], []) == first["prompt_text"]


def test_int8_weights_give_the_reference_tokens_where_margins_allow(converted_cogvlm, cogvlm, reference, arrays):
    """The LLM's Linears (both experts) quantised to int8 as the converted fixture loads: the prompt-logit error
    against the reference is measured on every recorded sample and bounded; then every turn's greedy tokens (one
    batch) equal the reference's at each step up to the first whose recorded top1-top2 margin is not above twice
    that error (a rounding could flip that step; nothing after it is comparable)."""
    from visual_mllm.generation.sampling import GenerationConfig
    from visual_mllm.inference import ChatRequest, answer
    from visual_mllm.registry import load_from_yaml, precision_overrides

    quantized, processor = load_from_yaml(converted_cogvlm / "run_cogvlm.yaml", seq_length=SEQ_LENGTH,
                                          **precision_overrides(quantize="int8"))
    error = 0.0
    for sample in reference["samples"]:
        expected = arrays[f"{sample['name']}_logits"]  # [S, V]
        sample_error = float(np.abs(prompt_logits(quantized, sample, arrays) - expected).max())
        # per-channel int8 of the fixture's weights: a small fraction of the logit range, never most of it
        assert sample_error < 0.1 * (expected.max() - expected.min()), (sample["name"], sample_error)
        error = max(error, sample_error)
    turns = [(sample, turn) for sample in reference["samples"] for turn in sample["turns"]]
    requests = [ChatRequest(turn["user_text"], image_of(sample), turn["history"]) for sample, turn in turns]
    config = GenerationConfig(max_new_tokens=16, eos_token_id=quantized.config.llm_config.eos_token_id)
    checked = 0
    for (sample, turn), result in zip(turns, answer(quantized, processor, requests, config)):
        checked += len(steps_where_margins_allow(sample["name"], result.generated_ids, turn["generated_ids"],
                                                 turn["margins"], error, "int8"))
    assert checked, "no greedy step had a margin above twice the int8 logit error"
