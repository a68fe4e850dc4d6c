"""Image preprocessing and VisualGLM prompt building against the VisualGLM reference fixtures.

Every sample (prompts, history, language, expected ids, pixel values, responses) is read from
shared/fixtures/visualglm; the expected values were produced by the real reference code.
Tests needing the ChatGLM tokenizer skip until research/visual_mllm/tokenizers/chatglm.py exists.
"""
import numpy as np
import pytest
from PIL import Image

from conftest import fixture_path, load_json, npz_prefix
from visual_mllm.processing.image import (CLIP_MEAN, CLIP_STD, BlipImageProcessor, ImageLoadError,
                                          load_image)
from visual_mllm.processing.prompt import PromptBuilder, PromptTooLongError, prompt_budget
from visual_mllm.processing.visualglm_prompt import VisualGLMPromptBuilder, process_response


# --- fixture helpers ---------------------------------------------------------------------------------

def reference():
    return load_json("visualglm", "reference.json")


def samples():
    return reference()["samples"]


def image_samples():
    return [s for s in samples() if s["image"] is not None]


def an_image_path():
    """The image file of the first sample that has one (the tests that use it need any real image)."""
    found = image_samples()
    if not found:
        pytest.skip("the fixture has no sample with an image")
    return fixture_path("visualglm", found[0]["image"])


def sat_config():
    return load_json("visualglm", "sat", "visualglm-tiny", "model_config.json")


def num_image_tokens():
    return int(sat_config()["image_length"])


def reference_npz():
    return np.load(fixture_path("visualglm", "reference.npz"))


def has_image(sample):
    return sample["image"] is not None


@pytest.fixture(scope="module", params=[("tokenizer", "chatglm"), ("visualglm", "hf", "visualglm-tiny")],
                ids=["tokenizer-chatglm", "hf-visualglm-tiny"])
def tokenizer(request):
    """The project's ChatGLM-6B tokenizer, built from a fixture folder (skips while it is not written)."""
    module = pytest.importorskip(
        "visual_mllm.tokenizers.chatglm",
        reason="research/visual_mllm/tokenizers/chatglm.py (ChatGLMTokenizer) is not there yet")
    cls = module.ChatGLMTokenizer
    folder = str(fixture_path(*request.param))
    if hasattr(cls, "from_folder"):  # reads tokenizer_config.json (num_image_tokens 0)
        return cls.from_folder(folder)
    return cls.from_pretrained(folder)


@pytest.fixture(scope="module")
def sat_builder(tokenizer):
    return VisualGLMPromptBuilder(tokenizer, num_image_tokens(), placeholder="pad")


# --- pixel values ------------------------------------------------------------------------------------

def image_processor():
    return BlipImageProcessor(image_size=sat_config()["eva_args"]["image_size"])


def test_default_normalisation_is_the_reference_one():
    pre = reference()["image_preprocess"]
    np.testing.assert_array_equal(np.float32(CLIP_MEAN), np.float32(pre["mean"]))
    np.testing.assert_array_equal(np.float32(CLIP_STD), np.float32(pre["std"]))
    proc = BlipImageProcessor()
    assert proc.mean == list(pre["mean"]) and proc.std == list(pre["std"])


def test_pixel_values_match_reference():
    proc = image_processor()
    npz = reference_npz()
    height, width = sat_config()["eva_args"]["image_size"]
    checked = 0
    for sample in image_samples():
        path = fixture_path("visualglm", sample["image"])
        out = proc(str(path))
        expected = npz[f"{npz_prefix(sample, npz)}_pixel_values"]
        assert out.dtype == np.float32 and out.shape == expected.shape == (1, 3, height, width), sample["name"]
        diff = float(np.abs(out - expected).max())
        assert diff <= 1e-6, f"{sample['name']}: max |diff| {diff}"
        checked += 1
    assert checked > 0


def test_pixel_values_same_for_every_input_kind():
    proc = image_processor()
    npz = reference_npz()
    paths, expected = [], []
    for sample in image_samples():
        path = fixture_path("visualglm", sample["image"])
        paths.append(path)
        expected.append(npz[f"{npz_prefix(sample, npz)}_pixel_values"][0])
        uint8 = np.asarray(Image.open(path).convert("RGB"))
        for kind, item in [("Path", path), ("PIL", Image.open(path)), ("uint8", uint8),
                           ("float", uint8.astype(np.float32) / 255.0), ("list", [str(path)])]:
            out = proc(item)
            assert float(np.abs(out[0] - expected[-1]).max()) <= 1e-6, f"{sample['name']} as {kind}"
    batch = proc([str(p) for p in paths])
    assert batch.shape[0] == len(paths)
    np.testing.assert_allclose(batch, np.stack(expected), atol=1e-6, rtol=0)


def test_pixel_values_of_grey_and_rgba_arrays():
    height, width = sat_config()["eva_args"]["image_size"]
    proc = image_processor()
    grey = np.arange(height * width, dtype=np.uint8).reshape(height, width)
    out = proc(grey)
    assert out.shape == (1, 3, height, width)
    # a grey image has the same raw value in each channel, so (x*std + mean) agrees across channels
    raw = out[0] * np.float32(CLIP_STD)[:, None, None] + np.float32(CLIP_MEAN)[:, None, None]
    np.testing.assert_allclose(raw[0], raw[1], atol=1e-6)
    rgba = np.dstack([np.stack([grey] * 3, -1), np.zeros_like(grey)])
    np.testing.assert_array_equal(proc(rgba), out)  # alpha dropped as convert("RGB") does


def test_non_square_size_is_height_width():
    proc = BlipImageProcessor(image_size=(20, 30))
    path = an_image_path()
    assert proc(str(path)).shape == (1, 3, 20, 30)


def test_processor_config_round_trip(tmp_path):
    proc = BlipImageProcessor(image_size=sat_config()["eva_args"]["image_size"], resample="bilinear")
    proc.save_pretrained(str(tmp_path))
    again = BlipImageProcessor.from_pretrained(str(tmp_path))
    assert (again.size_hw, again.mean, again.std, again.resample) == \
        (proc.size_hw, proc.mean, proc.std, proc.resample)


def test_processor_is_registered():
    from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
    assert MindFormerRegister.get_cls(MindFormerModuleType.PROCESSOR, "BlipImageProcessor") is BlipImageProcessor


# --- image errors ------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    path = tmp_path / "no_such_picture.png"
    with pytest.raises(ImageLoadError, match="no_such_picture.png.*not found"):
        image_processor()(str(path))


def test_corrupt_file(tmp_path):
    path = tmp_path / "garbage.png"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 512, dtype=np.uint8).tobytes())
    with pytest.raises(ImageLoadError, match="garbage.png.*corrupt"):
        image_processor()(path)


def test_truncated_file(tmp_path):
    source = an_image_path().read_bytes()
    path = tmp_path / "cut_short.png"
    path.write_bytes(source[: len(source) // 2])
    with pytest.raises(ImageLoadError, match="cut_short.png.*(truncated|damaged|corrupt)"):
        image_processor()(str(path))


def test_unsupported_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("this is not an image\n", encoding="utf-8")
    with pytest.raises(ImageLoadError, match="notes.txt.*unsupported"):
        load_image(path)


def test_directory_and_bad_inputs(tmp_path):
    proc = image_processor()
    with pytest.raises(ImageLoadError, match="directory"):
        proc(str(tmp_path))
    with pytest.raises(ImageLoadError, match="channel-first"):
        proc(np.zeros((3, 20, 20), dtype=np.uint8))
    with pytest.raises(ImageLoadError, match=r"\[0, 1\]"):
        proc(np.full((4, 4, 3), 2.0))
    with pytest.raises(ImageLoadError, match="unsupported image input"):
        proc(42)
    with pytest.raises(ValueError):
        BlipImageProcessor(image_size=(0, 10))
    assert issubclass(ImageLoadError, ValueError)


# --- prompt text -------------------------------------------------------------------------------------

def test_prompt_text_matches_reference():
    builder = VisualGLMPromptBuilder(tokenizer=None, num_image_tokens=num_image_tokens(), placeholder=0)
    for sample in samples():
        prompt = builder.build_prompt(sample["query"], sample["history"], has_image=has_image(sample),
                                      english=sample["english"])
        assert prompt == sample["prompt_after_process_image"], sample["name"]
        if has_image(sample):  # the reference prompt is the same text with the image path inside <img></img>
            assert prompt == sample["prompt"].replace(sample["image"], "", 1), sample["name"]


def test_english_prompt_uses_q_a_markers():
    builder = VisualGLMPromptBuilder(tokenizer=None, num_image_tokens=num_image_tokens(), placeholder=0)
    with_history = [s for s in samples() if s["history"]]
    if not with_history:
        pytest.skip("the fixture has no sample with history")
    for sample in with_history:  # every earlier turn, however many the sample has
        prompt = builder.build_prompt(sample["query"], sample["history"], has_image=True, english=True)
        turns = "".join(f"Q:{old_q}\nA:{old_a}\n" for old_q, old_a in sample["history"])
        assert prompt == f"<img></img>{turns}Q:{sample['query']}\nA:", sample["name"]


def test_builder_interface():
    assert issubclass(VisualGLMPromptBuilder, PromptBuilder)
    for name in ("build_prompt", "build_ids", "postprocess", "fit_history"):
        assert callable(getattr(PromptBuilder, name))


# --- prompt ids (real tokenizer) ---------------------------------------------------------------------

def test_prompt_ids_match_reference(tokenizer):
    npz = reference_npz()
    n_img = num_image_tokens()
    for placeholder, key in (("pad", "input_ids"), ("unk", "hf_input_ids")):
        builder = VisualGLMPromptBuilder(tokenizer, n_img, placeholder=placeholder)
        for sample in samples():
            ids = builder.build_ids(sample["query"], sample["history"], has_image=has_image(sample),
                                    english=sample["english"])
            assert ids.input_ids == sample[key], f"{sample['name']} ({placeholder} placeholders)"
            assert ids.prompt == sample["prompt_after_process_image"]
            assert len(ids) == sample["prompt_len"]
            assert ids.pre_image == sample["pre_image"] == int(npz[f"{npz_prefix(sample, npz)}_pre_image"])
            if has_image(sample):
                assert ids.image_start == sample["pre_image"]
                assert list(ids.image_span) == sample["image_placeholder_span"]
            else:
                assert ids.image_start is None and sample["image_placeholder_span"] is None
            if placeholder == "pad":
                assert ids.input_ids == npz[f"{npz_prefix(sample, npz)}_input_ids"].tolist()


# --- post-processing ---------------------------------------------------------------------------------

def test_response_matches_reference(sat_builder):
    for sample in samples():
        response = sat_builder.decode_response(sample["input_ids"], sample["generated_ids"],
                                               english=sample["english"])
        assert response == sample["response"], sample["name"]
        fp16 = sample["fp16_weights"]
        assert sat_builder.decode_response(sample["input_ids"], fp16["generated_ids"],
                                           english=sample["english"]) == fp16["response"]


def test_response_stops_at_eop(sat_builder, tokenizer):
    for sample in samples():
        generated = list(sample["generated_ids"])
        cut = len(generated) // 2
        with_eop = generated[:cut] + [tokenizer.eos_token_id] + generated[cut:]
        english = sample["english"]
        assert sat_builder.decode_response(sample["input_ids"], with_eop, english=english) == \
            sat_builder.decode_response(sample["input_ids"], generated[:cut], english=english), sample["name"]


def test_process_response_rules():
    # the ChatGLM-6B clean-up: ASCII , ! : ; ? next to a CJK ideograph become full width
    assert process_response("  你好,世界!  ") == "你好，世界！"
    assert process_response("答案:是;对吗?") == "答案：是；对吗？"
    assert process_response("a,b: c; d? e!") == "a,b: c; d? e!"      # no CJK neighbour: unchanged
    assert process_response(",中") == "，中"                          # mark before a CJK character
    assert process_response("[[训练时间]]发布") == "2023年发布"
    builder = VisualGLMPromptBuilder(tokenizer=None, num_image_tokens=1, placeholder=0)
    assert builder.postprocess("问：你是谁?\n答：我是模型,你好") == "我是模型，你好"
    assert builder.postprocess("Q:who?\nA: fine, thanks ", english=True) == "fine, thanks"


# --- history fitting ---------------------------------------------------------------------------------

def conversation():
    """A history of one turn per fixture sample, made of their own queries and answers."""
    return [(s["query"], s["response"]) for s in samples()]


def test_history_truncation_drops_oldest_first(sat_builder):
    history = conversation()
    query = samples()[-1]["query"]
    full = sat_builder.build_ids(query, history, has_image=True)
    kept, ids = sat_builder.fit_history(query, history, len(full), has_image=True)
    assert kept == history and ids.input_ids == full.input_ids
    for n_kept in range(len(history) - 1, -1, -1):
        expected = sat_builder.build_ids(query, history[len(history) - n_kept:], has_image=True)
        kept, ids = sat_builder.fit_history(query, history, len(expected), has_image=True)
        assert kept == history[len(history) - n_kept:], n_kept
        assert ids.input_ids == expected.input_ids
        assert len(ids) <= len(expected)


def test_prompt_too_long_says_by_how_much(sat_builder):
    history = conversation()
    query = samples()[0]["query"]
    bare = sat_builder.build_ids(query, [], has_image=True)
    over = 3
    with pytest.raises(PromptTooLongError, match=f"over by {over} token") as info:
        sat_builder.fit_history(query, history, len(bare) - over, has_image=True)
    assert info.value.over_by == over and info.value.needed == len(bare)
    assert isinstance(info.value, ValueError)


def test_prompt_budget():
    cfg = sat_config()
    assert prompt_budget(cfg["max_sequence_length"], 16) == cfg["max_sequence_length"] - 16
    with pytest.raises(PromptTooLongError, match="no room"):
        prompt_budget(cfg["max_sequence_length"], cfg["max_sequence_length"])
