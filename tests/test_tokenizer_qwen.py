"""QWenTokenizer against the Qwen-7B-Chat v1 remote-code tokenizer (the MiniGPT4Qwen fixture).

Fixtures: ``minigpt4qwen/tokenizer_cases.json`` (cases and facts recorded from the real
``QWenTokenizer`` on ``minigpt4qwen/ckpt/Qwen7B-chat/qwen.tiktoken``; ordinary tokens are recorded as
base64 of their bytes) and ``minigpt4qwen/reference.json`` (prompts, ids and generation settings of
the MiniGPT4Qwen references). Every expected value is read from them.
"""
import base64
import os

import pytest

from conftest import case_params, fixture_path, load_json
from visual_mllm.tokenizers.qwen import QWenTokenizer

TOKENIZER_DIR = ("minigpt4qwen", "ckpt", "Qwen7B-chat")
CASES_FILE = ("minigpt4qwen", "tokenizer_cases.json")
REFERENCE_FILE = ("minigpt4qwen", "reference.json")


CASES = case_params(*CASES_FILE)


@pytest.fixture(scope="module")
def meta():
    return load_json(*CASES_FILE)["meta"]


@pytest.fixture(scope="module")
def reference_meta():
    return load_json(*REFERENCE_FILE)["meta"]


@pytest.fixture(scope="module")
def vocab_file():
    return fixture_path(*TOKENIZER_DIR, "qwen.tiktoken")


@pytest.fixture(scope="module")
def tokenizer():
    return QWenTokenizer.from_pretrained(str(fixture_path(*TOKENIZER_DIR)))


def _assert_reproduces(tokenizer, case):
    assert tokenizer(case["text"])["input_ids"] == case["ids"]
    assert tokenizer.encode(case["text"], allowed_special=set()) == case["ids_allowed_special_none"]
    assert tokenizer.tokenize(case["text"]) == case["tokens"]
    assert tokenizer.decode(case["ids"]) == case["decoded"]
    assert tokenizer.decode(case["ids"], skip_special_tokens=True) == case["decoded_skip_special_tokens"]


# --- the reference cases ------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_encode_matches_reference(tokenizer, case):
    """Special-token text is recognised by default; no BOS/EOS is added."""
    assert tokenizer(case["text"])["input_ids"] == case["ids"]
    assert tokenizer.encode(case["text"]) == case["ids"]
    assert tokenizer.encode(case["text"], add_special_tokens=False) == case["ids"]


@pytest.mark.parametrize("case", CASES)
def test_encode_without_allowed_specials_matches_reference(tokenizer, case):
    """``allowed_special=set()`` (make_context's message contents) splits special-token text as text."""
    assert tokenizer.encode(case["text"], allowed_special=set()) == case["ids_allowed_special_none"]
    assert tokenizer(case["text"], allowed_special=set())["input_ids"] == case["ids_allowed_special_none"]


@pytest.mark.parametrize("case", CASES)
def test_tokenize_matches_reference(tokenizer, case):
    tokens = tokenizer.tokenize(case["text"])
    assert tokens == case["tokens"]
    assert [index >= tokenizer.eod_id for index in tokenizer.convert_tokens_to_ids(tokens)] == case["token_is_special"]


@pytest.mark.parametrize("case", CASES)
def test_decode_matches_reference(tokenizer, case):
    assert tokenizer.decode(case["ids"]) == case["decoded"]
    assert tokenizer.decode(case["ids"], skip_special_tokens=True) == case["decoded_skip_special_tokens"]
    assert tokenizer.convert_tokens_to_string(case["tokens"]) == case["decoded"]


@pytest.mark.parametrize("case", CASES)
def test_tokens_and_ids_convert_both_ways(tokenizer, case):
    assert tokenizer.convert_tokens_to_ids(case["tokens"]) == case["ids"]
    assert tokenizer.convert_ids_to_tokens(case["ids"]) == case["tokens"]


# --- vocabulary and special ids ----------------------------------------------------------------

def test_special_ids_match_reference(tokenizer, meta):
    for token, index in meta["special_ids"].items():
        assert tokenizer.convert_tokens_to_ids(token) == index
        assert tokenizer.decode([index]) == token
    assert tokenizer.eod_id == meta["special_ids"]["<|endoftext|>"] == meta["n_ordinary_ranks"]
    assert tokenizer.im_start_id == meta["special_ids"]["<|im_start|>"]
    assert tokenizer.im_end_id == meta["special_ids"]["<|im_end|>"]
    assert len(tokenizer) == tokenizer.vocab_size == len(tokenizer.get_vocab()) == meta["len_tokenizer"]


def test_no_bos_eos_pad_unk_by_default(tokenizer):
    """The published config sets none; Qwen's generation config supplies the ids (see below)."""
    assert tokenizer.all_special_ids == []
    assert tokenizer.build_inputs_with_special_tokens([1, 2]) == [1, 2]


def test_generation_ids_match_minigpt4qwen(tokenizer, reference_meta):
    generate_kwargs = reference_meta["generate_kwargs_in_minigpt4qwen"]
    assert tokenizer.stop_words_ids == generate_kwargs["stop_words_ids"]
    assert [tokenizer.im_end_id, tokenizer.im_start_id] == generate_kwargs["eos_token_id"]
    assert tokenizer.eod_id == generate_kwargs["pad_token_id"]
    assert tokenizer.eod_id == reference_meta["generation_config"]["eos_token_id"]
    assert tokenizer.eod_id == reference_meta["generation_config"]["pad_token_id"]
    assert tokenizer(" ")["input_ids"][0] == generate_kwargs["bos_token_id(tokenizer(' ').input_ids[0])"]


def test_qwen_special_as_pad_token(vocab_file, tokenizer):
    padded = QWenTokenizer(str(vocab_file), pad_token="<|endoftext|>")
    assert padded.pad_token_id == tokenizer.eod_id
    assert len(padded) == len(tokenizer)
    batch = padded(["<|im_start|>", "<|im_start|>user"], padding=True)
    user = tokenizer.encode("user")
    assert batch["input_ids"][0] == [tokenizer.im_start_id] + [tokenizer.eod_id] * len(user)
    assert batch["attention_mask"][0] == [1] + [0] * len(user)


def test_only_qwen_specials_can_be_special_tokens(vocab_file, tokenizer):
    with pytest.raises(ValueError, match="<pad>"):
        QWenTokenizer(str(vocab_file), pad_token="<pad>")
    with pytest.raises(ValueError, match="ordinary"):
        tokenizer.add_tokens(["new_token"])


def test_padding_ids_cannot_be_decoded(tokenizer, reference_meta):
    """Ids of the model's vocabulary padding (len(tokenizer) .. vocab_size-1) are no tokens."""
    assert reference_meta["sizes"]["vocab_size"] > len(tokenizer)
    with pytest.raises(ValueError, match=str(len(tokenizer))):
        tokenizer.decode([len(tokenizer)])


def test_invalid_utf8_decodes_with_replacement(tokenizer):
    """A lone UTF-8 lead byte (first byte of a multi-byte character) decodes to U+FFFD."""
    lead_byte = tokenizer.convert_tokens_to_ids(base64.b64encode(b"\xf0").decode("ascii"))
    assert tokenizer.decode([lead_byte]) == "\ufffd"
    assert tokenizer.decode([lead_byte], errors="ignore") == ""


# --- MiniGPT4Qwen references -------------------------------------------------------------------

def test_prompt_ids_match_reference(tokenizer):
    extra_0 = tokenizer.convert_tokens_to_ids("<|extra_0|>")
    for sample in load_json(*REFERENCE_FILE)["samples"]:
        # llm_text: the prompt with <ImageHere> expanded; the text-only sample has none (its LLM text is the prompt)
        ids = tokenizer(sample.get("llm_text", sample["prompt"]))["input_ids"]
        assert ids == sample["input_ids"]
        assert tokenizer(sample["prompt"])["input_ids"] == sample["make_context_tokens"]
        assert [index for index, token in enumerate(ids) if token == extra_0] == (sample.get("image_positions") or [])


def test_generated_ids_decode_like_reference(tokenizer):
    for sample in load_json(*REFERENCE_FILE)["samples"]:
        assert tokenizer.decode(sample["generated_ids"]) == sample["decoded_generated"]
        assert [tokenizer.decode([index]) for index in sample["generated_ids"]] == sample["generated_tokens"]


# --- loading, saving, errors -----------------------------------------------------------------

def test_missing_vocab_file_names_the_path(tmp_path):
    missing = tmp_path / "absent" / "qwen.tiktoken"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        QWenTokenizer(str(missing))


@pytest.mark.parametrize("lines", [["IQ== 0", "@@@ 1"], ["IQ== 0", "Ig=="], ["IQ== 0", "Ig== x"], ["\x89PNG"], []],
                         ids=["bad_base64", "no_rank", "bad_rank", "binary", "empty"])
def test_corrupt_vocab_file_names_the_path(tmp_path, lines):
    path = tmp_path / "qwen.tiktoken"
    path.write_text("".join(line + "\n" for line in lines), encoding="latin-1")
    with pytest.raises(ValueError, match=str(path)):
        QWenTokenizer(str(path))


def test_ranks_must_be_contiguous(tmp_path, vocab_file):
    lines = vocab_file.read_text(encoding="utf-8").splitlines()
    path = tmp_path / "qwen.tiktoken"
    path.write_text("\n".join(lines[:-2] + lines[-1:]) + "\n", encoding="utf-8")  # drop the second-to-last rank
    with pytest.raises(ValueError, match=str(path)):
        QWenTokenizer(str(path))


def test_save_and_reload_round_trip(tmp_path, tokenizer, vocab_file):
    tokenizer.save_pretrained(str(tmp_path), save_json=True)
    assert (tmp_path / "qwen.tiktoken").read_bytes() == vocab_file.read_bytes()
    reloaded = QWenTokenizer.from_pretrained(str(tmp_path))
    assert len(reloaded) == len(tokenizer)
    for param in CASES:
        _assert_reproduces(reloaded, param.values[0])


def test_save_vocabulary_honours_prefix(tmp_path, tokenizer):
    (path,) = tokenizer.save_vocabulary(str(tmp_path), filename_prefix="qwen")
    assert os.path.basename(path) == "qwen-qwen.tiktoken"
    assert QWenTokenizer(path).encode("你好 world") == tokenizer.encode("你好 world")


def test_registered_for_mindformers(tokenizer, vocab_file):
    from mindformers.models.build_tokenizer import build_tokenizer
    from mindformers.models.processing_utils import ProcessorMixin
    from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

    assert MindFormerRegister.get_cls(MindFormerModuleType.TOKENIZER, "QWenTokenizer") is QWenTokenizer
    built = build_tokenizer({"type": "QWenTokenizer", "vocab_file": str(vocab_file)})
    assert isinstance(built, QWenTokenizer)
    for param in CASES:
        _assert_reproduces(built, param.values[0])

    class TextProcessor(ProcessorMixin):
        attributes = ["tokenizer"]
        tokenizer_class = "PreTrainedTokenizer"

    assert TextProcessor(tokenizer).tokenizer is tokenizer
