"""ChatGLM-6B tokenizer against the reference cases made with the real tokenizer (transformers 4.27).

Fixtures: ``tokenizer/chatglm`` (tiny ``ice_text.model``, the published ``tokenizer_config.json``,
``cases.json``) and ``visualglm/reference.json`` / ``reference.npz`` (prompt ids and GLM masks of
the VisualGLM references). Every expected value is read from them.
"""
import os

import numpy as np
import pytest
# MindFormers' copy of the sentencepiece proto: sentencepiece's own module would import protobuf
# before MindSpore sets PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python, and MindSpore's import then fails.
from mindformers.models import sentencepiece_model_pb2

from conftest import case_params, fixture_path, load_json, npz_prefix
from visual_mllm.tokenizers.chatglm import ChatGLMTokenizer

TOKENIZER_DIR = ("tokenizer", "chatglm")
CASES_FILE = TOKENIZER_DIR + ("cases.json",)


CASES = case_params(*CASES_FILE)


@pytest.fixture(scope="module")
def tokenizer_dir():
    return str(fixture_path(*TOKENIZER_DIR))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return ChatGLMTokenizer.from_folder(tokenizer_dir)


@pytest.fixture(scope="module")
def meta():
    return load_json(*CASES_FILE)["meta"]


def _edited_model(folder, edit):
    """Copy of the fixture model with ``edit(model_proto)`` applied, written in ``folder``; returns its path."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(fixture_path(*TOKENIZER_DIR, "ice_text.model").read_bytes())
    edit(proto)
    path = folder / "ice_text.model"
    path.write_bytes(proto.SerializeToString())
    return str(path)


def _piece_index(proto, piece):
    return next(index for index, entry in enumerate(proto.pieces) if entry.piece == piece)


# --- the reference cases of cases.json -------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_encode_matches_reference(tokenizer, case):
    assert tokenizer.encode(case["text"]) == case["ids"]
    assert tokenizer.encode(case["text"], add_special_tokens=False) == case["ids_no_special"]


@pytest.mark.parametrize("case", CASES)
def test_call_matches_reference(tokenizer, case):
    """``tokenizer([text])`` returns only input_ids (no mask without padding), like the reference."""
    encoded = tokenizer([case["text"]])
    assert list(encoded.keys()) == ["input_ids"]
    assert encoded["input_ids"][0] == case["ids"]


@pytest.mark.parametrize("case", CASES)
def test_tokenize_matches_reference(tokenizer, case):
    assert tokenizer.tokenize(case["text"]) == case["tokens"]


@pytest.mark.parametrize("case", CASES)
def test_decode_matches_reference(tokenizer, case):
    assert tokenizer.decode(case["ids"]) == case["decoded"]
    assert tokenizer.decode(case["ids_no_special"]) == case["decoded_no_special"]
    assert tokenizer.decode(case["ids"], clean_up_tokenization_spaces=False) == case["decoded_no_cleanup"]


@pytest.mark.parametrize("case", CASES)
def test_tokens_and_ids_convert_both_ways(tokenizer, case):
    assert tokenizer.convert_tokens_to_ids(case["tokens"]) == case["ids_no_special"]
    assert tokenizer.convert_ids_to_tokens(case["ids_no_special"]) == case["tokens"]


@pytest.fixture(scope="module")
def visible_pad_tokenizer(tmp_path_factory):
    """Tokenizer whose ``<pad>`` piece is USER_DEFINED, so sentencepiece would print it if it were kept."""
    def make_pad_visible(proto):
        user_defined = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
        proto.pieces[_piece_index(proto, "<pad>")].type = user_defined

    tokenizer = ChatGLMTokenizer(_edited_model(tmp_path_factory.mktemp("pad"), make_pad_visible),
                                 num_image_tokens=0)
    assert tokenizer.convert_tokens_to_string([tokenizer.pad_token]) == tokenizer.pad_token
    return tokenizer


@pytest.mark.parametrize("case", CASES)
def test_decode_drops_pad_ids(visible_pad_tokenizer, case):
    """Pad ids are removed before decoding, whatever the type of the ``<pad>`` piece."""
    pad = visible_pad_tokenizer.pad_token_id
    assert visible_pad_tokenizer.decode([pad] + case["ids"] + [pad]) == case["decoded"]


# --- special ids come from the model file ----------------------------------------------------

def test_special_ids_match_reference(tokenizer, meta):
    expected = meta["special_ids"]
    assert tokenizer.unk_token_id == expected["unk_token_id"]
    assert tokenizer.pad_token_id == expected["pad_token_id"]
    assert tokenizer.bos_token_id == expected["bos_token_id(<sop>)"]
    assert tokenizer.eos_token_id == expected["eos_token_id(<eop>)"]
    assert tokenizer.mask_token_id == expected["mask_token_id([MASK])"]
    assert tokenizer.gmask_token_id == expected["gmask_token_id([gMASK])"]
    assert tokenizer.end_token_id == expected["end_token_id(</s>)"]
    assert tokenizer.vocab_size == len(tokenizer) == meta["vocab_size"]


def test_split_special_tokens_match_reference(tokenizer, meta):
    assert sorted(tokenizer.all_special_tokens) == sorted(meta["no_split_tokens(transformers)"])


def test_special_ids_follow_the_model_file(tmp_path, tokenizer):
    """Swapping the ``<sop>``/``<eop>`` pieces in the model swaps their ids: nothing is hard-coded."""
    def swap_sop_eop(proto):
        sop, eop = _piece_index(proto, "<sop>"), _piece_index(proto, "<eop>")
        proto.pieces[sop].piece, proto.pieces[eop].piece = "<eop>", "<sop>"

    swapped = ChatGLMTokenizer(_edited_model(tmp_path, swap_sop_eop), num_image_tokens=0)
    assert swapped.bos_token_id == tokenizer.eos_token_id
    assert swapped.eos_token_id == tokenizer.bos_token_id
    assert swapped.encode("")[-1] == tokenizer.eos_token_id


@pytest.fixture(scope="module")
def default_offset_tokenizer(tokenizer_dir):
    """Built from the model file alone: num_image_tokens keeps the reference class default."""
    return ChatGLMTokenizer(os.path.join(tokenizer_dir, "ice_text.model"))


@pytest.mark.parametrize("case", CASES)
def test_default_image_offset_shifts_every_id(default_offset_tokenizer, case):
    """Without the config every id moves by the class default of 20000 (the reference's trap)."""
    offset = default_offset_tokenizer.num_image_tokens
    assert offset == 20000
    shifted_ids = [index + offset for index in case["ids"]]
    assert default_offset_tokenizer.encode(case["text"]) == shifted_ids
    assert default_offset_tokenizer.decode(shifted_ids) == case["decoded"]


def test_model_without_gmask_is_rejected(tmp_path):
    def rename_gmask(proto):
        proto.pieces[_piece_index(proto, "[gMASK]")].piece = "[xMASK]"

    with pytest.raises(ValueError, match=r"\[gMASK\]"):
        ChatGLMTokenizer(_edited_model(tmp_path, rename_gmask), num_image_tokens=0)


# --- loading, saving, errors -----------------------------------------------------------------

def test_missing_vocab_file_names_the_path(tmp_path):
    missing = tmp_path / "absent" / "ice_text.model"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        ChatGLMTokenizer(str(missing), num_image_tokens=0)


def test_folder_without_config_is_rejected(tmp_path, tokenizer):
    tokenizer.save_vocabulary(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="tokenizer_config.json"):
        ChatGLMTokenizer.from_folder(str(tmp_path))


def test_folder_loading_reads_num_image_tokens(tokenizer, meta):
    assert tokenizer.num_image_tokens == meta["num_image_tokens"]


def test_save_and_reload_round_trip(tmp_path, tokenizer):
    tokenizer.save_pretrained(str(tmp_path), save_json=True)
    original_model = fixture_path(*TOKENIZER_DIR, "ice_text.model")
    assert (tmp_path / "ice_text.model").read_bytes() == original_model.read_bytes()
    reloaded = ChatGLMTokenizer.from_folder(str(tmp_path))
    assert reloaded.num_image_tokens == tokenizer.num_image_tokens
    for param in CASES:
        case = param.values[0]
        assert reloaded.encode(case["text"]) == case["ids"]
        assert reloaded.tokenize(case["text"]) == case["tokens"]
        assert reloaded.decode(case["ids"]) == case["decoded"]


def test_save_vocabulary_honours_prefix(tmp_path, tokenizer):
    (path,) = tokenizer.save_vocabulary(str(tmp_path), filename_prefix="glm")
    assert os.path.basename(path) == "glm-ice_text.model"
    assert ChatGLMTokenizer(path, num_image_tokens=0).encode("你好") == tokenizer.encode("你好")


def test_hf_visualglm_folder_loads(tokenizer):
    """The tokenizer files shipped with the HF-format VisualGLM checkpoint give the same tokenizer."""
    hf_tokenizer = ChatGLMTokenizer.from_folder(str(fixture_path("visualglm", "hf", "visualglm-tiny")))
    for param in CASES:
        case = param.values[0]
        assert hf_tokenizer.encode(case["text"]) == case["ids"]


def test_registered_for_mindformers(tokenizer):
    from mindformers.models.processing_utils import ProcessorMixin
    from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

    assert MindFormerRegister.get_cls(MindFormerModuleType.TOKENIZER, "ChatGLMTokenizer") is ChatGLMTokenizer

    class TextProcessor(ProcessorMixin):
        attributes = ["tokenizer"]
        tokenizer_class = "PreTrainedTokenizer"

    assert TextProcessor(tokenizer).tokenizer is tokenizer


# --- VisualGLM references --------------------------------------------------------------------

def _reference_samples():
    return load_json("visualglm", "reference.json")["samples"]


@pytest.fixture(scope="module")
def visualglm_tokenizer():
    """The tokenizer shipped with the VisualGLM fixture (its HF folder), which its reference ids come from."""
    return ChatGLMTokenizer.from_folder(str(fixture_path("visualglm", "hf", "visualglm-tiny")))


def test_visualglm_prompt_ids(visualglm_tokenizer):
    """Prompt ids as VisualGLM's chat() builds them (text ids around pad placeholders, then [gMASK] <sop>)."""
    tokenizer = visualglm_tokenizer
    for sample in _reference_samples():
        prompt = sample["prompt_after_process_image"]
        if sample["image_placeholder_span"] is None:
            ids = tokenizer([prompt])["input_ids"][0]
        else:
            start, end = sample["image_placeholder_span"]
            split = prompt.rfind("<img>") + len("<img>")
            ids = (tokenizer.encode(prompt[:split], add_special_tokens=False)
                   + [tokenizer.pad_token_id] * (end - start)
                   + tokenizer.encode(prompt[split:], add_special_tokens=False)
                   + [tokenizer.gmask_token_id, tokenizer.bos_token_id])
            assert len(tokenizer.encode(prompt[:split], add_special_tokens=False)) == sample["pre_image"]
        assert ids == sample["input_ids"]


def test_padding_builds_reference_glm_masks(visualglm_tokenizer):
    """With padding the tokenizer adds the GLM mask and 2-D positions of the reference prompt forward."""
    tokenizer = visualglm_tokenizer
    arrays = np.load(fixture_path("visualglm", "reference.npz"))
    text_only = [sample for sample in _reference_samples() if sample["image_placeholder_span"] is None]
    if not text_only:
        pytest.skip("the VisualGLM fixture has no text-only sample (the padded tokenizer call is its prompt path)")
    for sample in text_only:
        prefix = npz_prefix(sample, arrays)
        length = sample["prompt_len"]
        encoded = tokenizer([sample["prompt"]], padding=True)
        assert encoded["input_ids"][0] == arrays[f"{prefix}_input_ids"].tolist()
        np.testing.assert_array_equal(encoded["position_ids"][0], arrays[f"{prefix}_position_ids"][:, :length])
        visible = arrays[f"{prefix}_attention_mask"][:length, :length] > 0.5
        np.testing.assert_array_equal(encoded["attention_mask"][0], ~visible[None])


def test_batch_padding_is_left_and_hidden(tokenizer):
    short_text, long_text = "你好", "问：这张图片里有什么？\n答："
    alone = tokenizer([short_text], padding=True)
    batch = tokenizer([short_text, long_text], padding=True)
    long_length = len(tokenizer.encode(long_text))
    pad = long_length - len(tokenizer.encode(short_text))
    assert pad > 0
    assert batch["input_ids"][0] == [tokenizer.pad_token_id] * pad + alone["input_ids"][0]
    mask, positions = batch["attention_mask"][0], batch["position_ids"][0]
    assert mask.shape == (1, long_length, long_length)
    assert mask[:, :pad, :].all() and mask[:, :, :pad].all()
    np.testing.assert_array_equal(mask[:, pad:, pad:], alone["attention_mask"][0])
    assert not positions[:, :pad].any()
    np.testing.assert_array_equal(positions[:, pad:], alone["position_ids"][0])


def test_pair_encoding_layout(tokenizer):
    """A second sequence follows ``<sop>`` and ends with ``<eop>``, as in the reference."""
    first, second = "问：你好", "答：你好"
    first_ids = tokenizer.encode(first, add_special_tokens=False)
    second_ids = tokenizer.encode(second, add_special_tokens=False)
    assert tokenizer.encode(first, second) == (first_ids + [tokenizer.gmask_token_id, tokenizer.bos_token_id]
                                               + second_ids + [tokenizer.eos_token_id])


def test_lower_case_and_remove_space_options(tokenizer, tokenizer_dir):
    """Both options are off in the published config; when turned on they normalise the text first."""
    normalising = ChatGLMTokenizer.from_folder(tokenizer_dir, do_lower_case=True, remove_space=True)
    assert normalising.encode("  Hello    World ") == tokenizer.encode("hello world")
    assert tokenizer.encode("  Hello    World ") != tokenizer.encode("hello world")


def test_skip_special_tokens_removes_unk_surface(tokenizer):
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(fixture_path(*TOKENIZER_DIR, "ice_text.model").read_bytes())
    unk = tokenizer.unk_token_id
    assert tokenizer.decode([unk]) == proto.trainer_spec.unk_surface  # " ⁇ " unless the model sets another
    assert tokenizer.decode([unk], skip_special_tokens=True) == ""
