"""VicunaTokenizer against transformers 4.30's slow LlamaTokenizer (the MiniGPT-4 fixture).

Fixtures: ``minigpt4/tokenizer_cases.json`` (cases and facts recorded from the real tokenizer on
``minigpt4/vicuna-tiny/tokenizer.model``) and ``minigpt4/reference.json`` (prompt segments, generated
ids, stop words of the MiniGPT-4 references). Every expected value is read from them.
"""
import os

import pytest

from conftest import case_params, fixture_path, load_json
from visual_mllm.tokenizers.llama import VicunaTokenizer

TOKENIZER_DIR = ("minigpt4", "vicuna-tiny")
CASES_FILE = ("minigpt4", "tokenizer_cases.json")
REFERENCE_FILE = ("minigpt4", "reference.json")


CASES = case_params(*CASES_FILE)


@pytest.fixture(scope="module")
def meta():
    return load_json(*CASES_FILE)["meta"]


@pytest.fixture(scope="module")
def model_file():
    return fixture_path(*TOKENIZER_DIR, "tokenizer.model")


@pytest.fixture(scope="module")
def published():
    """As ``LlamaTokenizer.from_pretrained(dir)`` loads it: no pad token."""
    return VicunaTokenizer.from_pretrained(str(fixture_path(*TOKENIZER_DIR)))


@pytest.fixture(scope="module")
def minigpt4(meta):
    """As MiniGPT-4's ``init_llm`` leaves it: ``pad_token = "$$"`` set after loading."""
    pad = meta["special_ids"]["pad_token_after_minigpt4_init_llm"]
    return VicunaTokenizer.from_pretrained(str(fixture_path(*TOKENIZER_DIR)), pad_token=pad)


@pytest.fixture(scope="module", params=["published", "minigpt4"])
def tokenizer(request):
    """Both configurations must reproduce every case: the pad token changes no encoding or decoding."""
    return request.getfixturevalue(request.param)


def _assert_reproduces(tokenizer, case):
    assert tokenizer(case["text"])["input_ids"] == case["ids"]
    assert tokenizer.encode(case["text"], add_special_tokens=False) == case["ids_no_special"]
    assert tokenizer.tokenize(case["text"]) == case["tokens"]
    assert tokenizer.decode(case["ids"]) == case["decoded"]
    assert tokenizer.decode(case["ids"], skip_special_tokens=True) == case["decoded_skip_special"]
    assert tokenizer.decode(case["ids_no_special"]) == case["decoded_no_special"]


# --- the reference cases ------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_encode_matches_reference(tokenizer, case):
    assert tokenizer(case["text"])["input_ids"] == case["ids"]
    assert tokenizer.encode(case["text"]) == case["ids"]
    assert tokenizer.encode(case["text"], add_special_tokens=False) == case["ids_no_special"]


@pytest.mark.parametrize("case", CASES)
def test_tokenize_matches_reference(tokenizer, case):
    assert tokenizer.tokenize(case["text"]) == case["tokens"]


@pytest.mark.parametrize("case", CASES)
def test_decode_matches_reference(tokenizer, case):
    assert tokenizer.decode(case["ids"]) == case["decoded"]
    assert tokenizer.decode(case["ids"], skip_special_tokens=True) == case["decoded_skip_special"]
    assert tokenizer.decode(case["ids_no_special"]) == case["decoded_no_special"]


@pytest.mark.parametrize("case", CASES)
def test_tokens_and_ids_convert_both_ways(tokenizer, case):
    assert tokenizer.convert_tokens_to_ids(case["tokens"]) == case["ids_no_special"]
    assert tokenizer.convert_ids_to_tokens(case["ids_no_special"]) == case["tokens"]


@pytest.mark.parametrize("case", CASES)
def test_text_without_special_tokens_is_raw_sentencepiece(published, case):
    """The slow tokenizer equals raw sentencepiece except where special-token text is split out."""
    specials = [token for token in published.all_special_tokens if token in case["text"]]
    if specials:
        assert case["ids_no_special"] != case["sp_encode_ids"]
        assert published.tokenize(case["text"]).count(specials[0]) == case["text"].count(specials[0])
    else:
        assert published.encode(case["text"], add_special_tokens=False) == case["sp_encode_ids"]


# --- special ids and stop words come from the model file -------------------------------------

def test_special_ids_match_reference(published, minigpt4, meta):
    expected = meta["special_ids"]
    for tokenizer in (published, minigpt4):
        assert tokenizer.unk_token_id == expected["unk"]
        assert tokenizer.bos_token_id == expected["bos"]
        assert tokenizer.eos_token_id == expected["eos"]
        assert tokenizer.vocab_size == len(tokenizer) == meta["vocab_size"]
    assert published.pad_token_id == expected["pad"]
    assert minigpt4.pad_token == expected["pad_token_after_minigpt4_init_llm"]
    assert minigpt4.pad_token_id == expected["pad_after_minigpt4_init_llm"]


def test_pieces_of_note(published, meta):
    for piece, index in meta["piece_ids"].items():
        assert published.convert_tokens_to_ids(piece) == index
        assert published.convert_ids_to_tokens(index) == piece


def test_stop_words_ids_match_reference(minigpt4):
    assert minigpt4.stop_words_ids == load_json(*REFERENCE_FILE)["stop_words_ids"]


def test_model_without_stop_piece_is_reported(tmp_path, model_file):
    """A model lacking the ``###`` piece cannot give MiniGPT-4's stop words: a clear error, not unk ids."""
    from mindformers.models import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    next(entry for entry in proto.pieces if entry.piece == "###").piece = "<renamed stop piece>"
    path = tmp_path / "tokenizer.model"
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(ValueError, match="###"):
        _ = VicunaTokenizer(str(path)).stop_words_ids


def test_pad_token_is_not_split_out_of_text(published, minigpt4):
    """Like the attribute MiniGPT-4 sets, the pad token is no added token: its text encodes as text."""
    text = f"a{minigpt4.pad_token}b {minigpt4.pad_token}"
    assert minigpt4.tokenize(text) == published.tokenize(text)
    assert minigpt4.pad_token not in minigpt4.get_added_vocab()


# --- MiniGPT-4 references ----------------------------------------------------------------------

def _turns():
    for sample in load_json(*REFERENCE_FILE)["samples"]:
        yield from sample["turns"]


def test_prompt_segments_match_reference(minigpt4):
    """First segment with BOS, the following ones without (``get_context_emb``)."""
    for turn in _turns():
        first, *rest = turn["segments"]
        assert minigpt4(first)["input_ids"] == turn["segment_ids"][0]
        for segment, ids in zip(rest, turn["segment_ids"][1:]):
            assert minigpt4(segment, add_special_tokens=False)["input_ids"] == ids


def test_generated_ids_decode_like_chat_answer(minigpt4):
    for turn in _turns():
        assert minigpt4.decode(turn["output_token"], skip_special_tokens=True) == turn["decoded_skip_special"]
        assert minigpt4.convert_ids_to_tokens(turn["generated_ids"]) == turn["generated_tokens"]


def test_pair_encoding_layout(published):
    first, second = published.encode("a", add_special_tokens=False), published.encode("b", add_special_tokens=False)
    bos = published.bos_token_id
    assert published.encode("a", "b") == [bos] + first + [bos] + second
    assert published.get_special_tokens_mask(first, second) == [1] + [0] * len(first) + [1] + [0] * len(second)


def test_add_eos_token(model_file, published):
    with_eos = VicunaTokenizer(str(model_file), add_eos_token=True)
    ids = published.encode("hello")
    assert with_eos.encode("hello") == ids + [published.eos_token_id]


# --- loading, saving, errors -----------------------------------------------------------------

def test_missing_model_file_names_the_path(tmp_path):
    missing = tmp_path / "absent" / "tokenizer.model"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        VicunaTokenizer(str(missing))


@pytest.mark.parametrize("content", [b"not a sentencepiece model", b""], ids=["garbage", "empty"])
def test_corrupt_model_file_names_the_path(tmp_path, content):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=str(path)):
        VicunaTokenizer(str(path))


def test_truncated_model_file_names_the_path(tmp_path, model_file):
    data = model_file.read_bytes()
    path = tmp_path / "tokenizer.model"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=str(path)):
        VicunaTokenizer(str(path))


def test_special_token_must_be_a_piece(model_file):
    with pytest.raises(ValueError, match="<notapiece>"):
        VicunaTokenizer(str(model_file), bos_token="<notapiece>")


def test_save_and_reload_round_trip(tmp_path, minigpt4, model_file):
    minigpt4.save_pretrained(str(tmp_path), save_json=True)
    assert (tmp_path / "tokenizer.model").read_bytes() == model_file.read_bytes()
    reloaded = VicunaTokenizer.from_pretrained(str(tmp_path))
    assert reloaded.pad_token == minigpt4.pad_token
    assert reloaded.pad_token_id == minigpt4.pad_token_id
    assert len(reloaded) == len(minigpt4)
    for param in CASES:
        _assert_reproduces(reloaded, param.values[0])


def test_save_vocabulary_honours_prefix(tmp_path, published):
    (path,) = published.save_vocabulary(str(tmp_path), filename_prefix="vicuna")
    assert os.path.basename(path) == "vicuna-tokenizer.model"
    assert VicunaTokenizer(path).encode("hello world") == published.encode("hello world")


def test_model_file_alone_gives_the_published_tokenizer(model_file):
    """The class defaults are the published tokenizer_config.json's."""
    alone = VicunaTokenizer(str(model_file))
    for param in CASES:
        _assert_reproduces(alone, param.values[0])


def test_bin_layout_folder_loads(published):
    """The older ``.bin`` checkpoint folder carries the same tokenizer files."""
    other = VicunaTokenizer.from_pretrained(str(fixture_path("minigpt4", "vicuna-tiny-bin")))
    for param in CASES:
        assert other.encode(param.values[0]["text"]) == param.values[0]["ids"]


def test_registered_for_mindformers(minigpt4, model_file):
    from mindformers.models.build_tokenizer import build_tokenizer
    from mindformers.models.processing_utils import ProcessorMixin
    from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

    assert MindFormerRegister.get_cls(MindFormerModuleType.TOKENIZER, "VicunaTokenizer") is VicunaTokenizer
    built = build_tokenizer({"type": "VicunaTokenizer", "vocab_file": str(model_file),
                             "pad_token": minigpt4.pad_token})
    assert isinstance(built, VicunaTokenizer)
    assert built.pad_token_id == minigpt4.pad_token_id
    for param in CASES:
        _assert_reproduces(built, param.values[0])

    class TextProcessor(ProcessorMixin):
        attributes = ["tokenizer"]
        tokenizer_class = "PreTrainedTokenizer"

    assert TextProcessor(minigpt4).tokenizer is minigpt4
