"""visual_mllm through the mindformers registry: YAML routes, processor, save/reload, strict config keys.

Tiny config only (configs/visualglm_tiny); the 6B YAML is only parsed, never built.
"""
import os

import numpy as np
import pytest
import yaml

import visual_mllm
from visual_mllm import (ProcessorModelMismatchError, UnknownConfigKeyError, VisualGLMConfig,
                         VisualGLMForConditionalGeneration, VisualGLMProcessor)
from visual_mllm.llm.glm import GLMConfig
from visual_mllm.processing.image import BlipImageProcessor
from visual_mllm.processing.visualglm_prompt import VisualGLMPromptBuilder
from visual_mllm.tokenizers.chatglm import ChatGLMTokenizer
from visual_mllm.vision.eva_vit import EvaViTConfig
from visual_mllm.vision.image_encoder import ImageEncoderConfig
from visual_mllm.vision.qformer import QFormerConfig

from mindspore import Tensor
from mindformers import AutoConfig, AutoModel, AutoProcessor, MindFormerConfig
from mindformers.models.build_model import build_model
from mindformers.models.build_processor import build_processor
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_YAML = os.path.join(ROOT, "configs", "visualglm_tiny", "run_visualglm_tiny.yaml")
YAML_6B = os.path.join(ROOT, "configs", "visualglm_6b", "run_visualglm_6b.yaml")
IMAGE = os.path.join(ROOT, "examples", "images", "chelsea.png")


def read_yaml(path):
    with open(path, encoding="utf-8") as file:
        return yaml.safe_load(file)


def tiny_dict():
    return read_yaml(TINY_YAML)


def write_yaml(tmp_path, document, name="run.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def loaded():
    return visual_mllm.load_from_yaml(TINY_YAML)


def assert_tiny_sizes(config):
    expected = tiny_dict()["model"]["model_config"]
    assert isinstance(config, VisualGLMConfig)
    assert isinstance(config.llm_config, GLMConfig)
    assert isinstance(config.image_encoder_config, ImageEncoderConfig)
    assert isinstance(config.image_encoder_config.vit_config, EvaViTConfig)
    assert isinstance(config.image_encoder_config.qformer_config, QFormerConfig)
    for key, value in expected["llm_config"].items():
        assert getattr(config.llm_config, key) == value, key
    for part in ("vit_config", "qformer_config"):
        for key, value in expected["image_encoder_config"][part].items():
            assert getattr(getattr(config.image_encoder_config, part), key) == value, (part, key)
    assert config.seq_length == expected["seq_length"]


# --- building through each route ----------------------------------------------------------------------

def test_sub_configs_are_registered():
    for cls in (VisualGLMConfig, GLMConfig, ImageEncoderConfig, EvaViTConfig, QFormerConfig):
        assert MindFormerRegister.get_cls(MindFormerModuleType.CONFIG, cls.__name__) is cls
    assert MindFormerRegister.get_cls(MindFormerModuleType.MODELS, "VisualGLMForConditionalGeneration") \
        is VisualGLMForConditionalGeneration
    assert MindFormerRegister.get_cls(MindFormerModuleType.PROCESSOR, "VisualGLMProcessor") is VisualGLMProcessor
    assert MindFormerRegister.get_cls(MindFormerModuleType.PROCESSOR, "BlipImageProcessor") is BlipImageProcessor
    assert MindFormerRegister.get_cls(MindFormerModuleType.TOKENIZER, "ChatGLMTokenizer") is ChatGLMTokenizer


def test_build_model_from_mindformer_config():
    config = MindFormerConfig(TINY_YAML)
    model = build_model(config.model)
    assert type(model) is VisualGLMForConditionalGeneration
    assert_tiny_sizes(model.config)
    assert model.num_image_tokens == tiny_dict()["model"]["model_config"]["image_encoder_config"][
        "qformer_config"]["num_query_tokens"]


def test_auto_config_and_auto_model():
    config = AutoConfig.from_pretrained(TINY_YAML)
    assert_tiny_sizes(config)
    assert type(AutoModel.from_config(TINY_YAML)) is VisualGLMForConditionalGeneration
    assert type(AutoModel.from_config(config)) is VisualGLMForConditionalGeneration
    # a config instance mindformers has never seen goes through the AutoModel.register mapping
    fresh = VisualGLMConfig(**{k: tiny_dict()["model"]["model_config"][k]
                               for k in ("image_encoder_config", "llm_config", "seq_length")})
    model = AutoModel.from_config(fresh)
    assert type(model) is VisualGLMForConditionalGeneration
    assert_tiny_sizes(model.config)


def test_auto_config_overrides_are_applied():
    config = AutoConfig.from_pretrained(TINY_YAML, seq_length=64, use_past=False)
    assert (config.seq_length, config.use_past) == (64, False)


@pytest.mark.parametrize("route", ["auto", "build"])
def test_processor_from_yaml_uses_packaged_tokenizer(route):
    if route == "auto":
        processor = AutoProcessor.from_pretrained(TINY_YAML)
    else:
        processor = build_processor(MindFormerConfig(TINY_YAML).processor)
    assert type(processor) is VisualGLMProcessor
    assert type(processor.tokenizer) is ChatGLMTokenizer
    assert os.path.samefile(processor.tokenizer.vocab_file, visual_mllm.PACKAGED_VOCAB_FILE)
    assert processor.tokenizer.num_image_tokens == 0  # from the packaged tokenizer_config.json
    # an explicit vocab file keeps the reference class default offset
    assert ChatGLMTokenizer(visual_mllm.PACKAGED_VOCAB_FILE).num_image_tokens == 20000
    assert isinstance(processor.image_processor, BlipImageProcessor)
    assert processor.image_processor.image_size == [56, 56]
    with pytest.raises(ValueError, match="num_image_tokens"):  # not bound to a model yet
        processor("hello", image=IMAGE)


def test_load_from_yaml_binds_processor_to_model(loaded):
    model, processor = loaded
    assert type(model) is VisualGLMForConditionalGeneration
    assert type(processor) is VisualGLMProcessor
    assert processor.num_image_tokens == model.num_image_tokens
    assert processor.image_placeholder == model.placeholder_id
    assert processor.tokenizer.gmask_token_id == model.config.llm_config.gmask_token_id


def test_load_from_yaml_overrides(tmp_path):
    model, processor = visual_mllm.load_from_yaml(TINY_YAML, seq_length=64, llm_config={"num_layers": 2},
                                                  processor_overrides={"tokenizer": {"do_lower_case": True}})
    assert model.config.seq_length == 64
    assert model.config.llm_config.num_layers == 2
    assert model.config.llm_config.hidden_size == tiny_dict()["model"]["model_config"]["llm_config"]["hidden_size"]
    assert len(model.llm.layers) == 2
    assert processor.tokenizer.do_lower_case is True


def test_load_processor_from_yaml():
    processor = visual_mllm.load_processor_from_yaml(TINY_YAML)
    queries = tiny_dict()["model"]["model_config"]["image_encoder_config"]["qformer_config"]["num_query_tokens"]
    assert processor.num_image_tokens == queries


# --- processor -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", [
    dict(query="描述这张图片。", image=True),
    dict(query="这是什么?", image=True, history=[("你好", "你好！有什么可以帮你？")]),
    dict(query="What is in the picture?", image=True, english=True, history=[("Hi", "Hello.")]),
    dict(query="讲个笑话", image=False),
])
def test_processor_ids_match_prompt_builder(loaded, case):
    model, processor = loaded
    history = case.get("history", ())
    english = case.get("english", False)
    out = processor(case["query"], image=IMAGE if case["image"] else None, history=history, english=english)
    builder = VisualGLMPromptBuilder(processor.tokenizer, model.num_image_tokens, placeholder=model.placeholder_id)
    expected = builder.build_ids(case["query"], history, has_image=case["image"], english=english)
    assert out["input_ids"] == expected.input_ids
    assert out["image_start"] == expected.image_start
    if case["image"]:
        start = out["image_start"]
        assert out["input_ids"][start:start + model.num_image_tokens] == [model.placeholder_id] * model.num_image_tokens
        np.testing.assert_array_equal(out["pixel_values"], BlipImageProcessor(image_size=56)(IMAGE))
        assert out["pixel_values"].shape == (1, 3, 56, 56) and out["pixel_values"].dtype == np.float32
    else:
        assert out["image_start"] is None and out["pixel_values"] is None
    assert out["input_ids"][-2:] == [model.config.llm_config.gmask_token_id, model.config.llm_config.bos_token_id]


def test_processor_decode_response(loaded):
    _, processor = loaded
    out = processor("你好", image=IMAGE)
    answer = processor.tokenizer.encode("我很好,谢谢", add_special_tokens=False)
    generated = answer + [processor.tokenizer.eos_token_id, 5, 6]
    builder = VisualGLMPromptBuilder(processor.tokenizer, processor.num_image_tokens,
                                     placeholder=processor.image_placeholder)
    text = processor.decode_response(out["input_ids"], generated)
    assert text == builder.decode_response(out["input_ids"], generated)
    assert text == "我很好，谢谢"


def test_processor_fit_history(loaded):
    _, processor = loaded
    history = [("第一个问题" * 5, "回答" * 10), ("第二个问题", "好的")]
    full = processor("现在呢", image=IMAGE, history=history)
    short = processor("现在呢", image=IMAGE, history=history, max_prompt_tokens=len(full["input_ids"]) - 1)
    assert short["history"] == [history[1]]
    assert len(short["input_ids"]) < len(full["input_ids"])


def test_processor_refuses_settings_of_another_model():
    config = AutoConfig.from_pretrained(TINY_YAML)
    processor = AutoProcessor.from_pretrained(TINY_YAML)
    processor.num_image_tokens = config.image_encoder_config.qformer_config.num_query_tokens + 1
    with pytest.raises(ProcessorModelMismatchError, match="num_image_tokens"):
        processor.configure_for_model(config)
    processor = AutoProcessor.from_pretrained(TINY_YAML)
    config.llm_config.gmask_token_id += 1
    with pytest.raises(ProcessorModelMismatchError, match="gmask_token_id"):
        processor.configure_for_model(config)


def test_processor_unknown_key_is_an_error(tmp_path):
    document = tiny_dict()
    document["processor"]["num_image_tokenz"] = 8
    with pytest.raises(TypeError, match="num_image_tokenz"):
        AutoProcessor.from_pretrained(write_yaml(tmp_path, document))


def test_missing_vocab_file_is_named(tmp_path):
    document = tiny_dict()
    document["processor"]["tokenizer"]["vocab_file"] = str(tmp_path / "nowhere" / "ice_text.model")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        visual_mllm.load_from_yaml(write_yaml(tmp_path, document))


# --- save / reload ----------------------------------------------------------------------------------------

def full_logits(model, processor):
    out = processor("描述这张图片。", image=IMAGE)
    ids = out["input_ids"]
    positions, prefix = model.llm.positions.prompt([ids], len(ids))
    image_embeds = model.encode_images(out["pixel_values"])
    start = Tensor(np.asarray([out["image_start"]], np.int32))
    logits = model(Tensor(np.asarray([ids], np.int32)), Tensor(image_embeds), start,
                   Tensor(positions), Tensor(np.asarray([len(ids)], np.int32)), Tensor(prefix))
    return image_embeds, logits.asnumpy()


def test_save_and_reload_give_identical_outputs(loaded, tmp_path):
    model, processor = loaded
    # make the weights differ from what the seed would rebuild, so that equality proves they were loaded
    rng = np.random.default_rng(7)
    for name in ("image_encoder.projection.weight", "llm.word_embeddings.weight"):
        param = {p.name: p for p in model.get_parameters()}[name]
        param.set_data(Tensor(rng.normal(0, 0.05, param.shape).astype(np.float32)))
    embeds, logits = full_logits(model, processor)
    assert embeds.shape == (1, model.num_image_tokens, model.config.llm_config.hidden_size)
    assert logits.shape[-1] == model.config.llm_config.vocab_size

    yaml_path, ckpt_path = model.save_pretrained(str(tmp_path / "saved"))
    assert os.path.isfile(yaml_path) and os.path.isfile(ckpt_path)
    saved = read_yaml(yaml_path)["model"]
    assert saved["arch"]["type"] == "VisualGLMForConditionalGeneration"
    assert saved["model_config"]["llm_config"]["num_layers"] == model.config.llm_config.num_layers

    reloaded = VisualGLMForConditionalGeneration.from_pretrained(str(tmp_path / "saved"))
    assert type(reloaded) is VisualGLMForConditionalGeneration
    embeds2, logits2 = full_logits(reloaded, processor)
    np.testing.assert_array_equal(embeds2, embeds)
    np.testing.assert_array_equal(logits2, logits)
    # mindformers' AutoModel.from_pretrained(folder) reads the same layout; equal weights = equal outputs
    auto = AutoModel.from_pretrained(str(tmp_path / "saved"))
    assert type(auto) is VisualGLMForConditionalGeneration
    expected = {p.name: p.asnumpy() for p in model.get_parameters()}
    got = {p.name: p.asnumpy() for p in auto.get_parameters()}
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    # saving leaves the live config intact (mindformers' own save strips nested attributes)
    assert model.config.llm_config.to_dict() == VisualGLMConfig(**{
        k: tiny_dict()["model"]["model_config"][k] for k in ("llm_config",)}).llm_config.to_dict()


def test_from_pretrained_names_missing_file(tmp_path):
    (tmp_path / "mindspore_model.yaml").write_text("model: {}\n")
    with pytest.raises(FileNotFoundError, match="mindspore_model.ckpt"):
        VisualGLMForConditionalGeneration.from_pretrained(str(tmp_path))


# --- unknown keys -------------------------------------------------------------------------------------

def with_bad_key(where):
    document = tiny_dict()
    model_config = document["model"]["model_config"]
    if where == "top":
        model_config["seq_lenght"] = 64
        return document, "seq_lenght"
    if where == "llm":
        model_config["llm_config"]["num_layer"] = 2
        return document, "num_layer"
    if where == "image_encoder":
        model_config["image_encoder_config"]["ln_vision_epsilon"] = 1e-5
        return document, "ln_vision_epsilon"
    model_config["image_encoder_config"]["vit_config"]["depth"] = 2  # two levels down
    return document, "depth"


@pytest.mark.parametrize("where", ["top", "llm", "image_encoder", "vit"])
@pytest.mark.parametrize("route", ["build_model", "auto_config", "auto_model", "load_from_yaml"])
def test_unknown_config_key_is_an_error_naming_it(tmp_path, where, route):
    document, key = with_bad_key(where)
    path = write_yaml(tmp_path, document)
    with pytest.raises(UnknownConfigKeyError, match=key):
        if route == "build_model":
            build_model(MindFormerConfig(path).model)
        elif route == "auto_config":
            AutoConfig.from_pretrained(path)
        elif route == "auto_model":
            AutoModel.from_config(path)
        else:
            visual_mllm.load_from_yaml(path)


def test_unknown_override_key_is_an_error():
    with pytest.raises(UnknownConfigKeyError, match="num_layer"):
        visual_mllm.load_from_yaml(TINY_YAML, llm_config={"num_layer": 2})
    with pytest.raises(UnknownConfigKeyError, match="use_pst"):
        visual_mllm.load_from_yaml(TINY_YAML, use_pst=False)


# --- the 6B YAML (parsed only) ----------------------------------------------------------------------------

def test_6b_yaml_has_the_released_sizes():
    config = AutoConfig.from_pretrained(YAML_6B)
    vit = config.image_encoder_config.vit_config
    qformer = config.image_encoder_config.qformer_config
    llm = config.llm_config
    assert (vit.image_size, vit.patch_size, vit.hidden_size, vit.num_layers, vit.num_heads,
            vit.intermediate_size) == (224, 14, 1408, 39, 16, 6144)
    assert (qformer.num_query_tokens, qformer.hidden_size, qformer.num_layers, qformer.num_heads,
            qformer.intermediate_size, qformer.cross_attention_frequency,
            qformer.encoder_hidden_size) == (32, 768, 12, 12, 3072, 2, 1408)
    assert (llm.vocab_size, llm.hidden_size, llm.num_layers, llm.num_heads, llm.intermediate_size) == \
        (130528, 4096, 28, 32, 16384)
    assert (llm.bos_token_id, llm.eos_token_id, llm.pad_token_id, llm.mask_token_id, llm.gmask_token_id) == \
        (130004, 130005, 3, 130000, 130001)
    assert config.seq_length == 2048
    assert config.image_encoder_config.projection_size == llm.hidden_size
    processor = read_yaml(YAML_6B)["processor"]
    assert processor["image_processor"]["image_size"] == vit.image_size
    assert processor["tokenizer"]["num_image_tokens"] == 0
    # the placeholder paths are refused by name before any weight is allocated
    with pytest.raises(FileNotFoundError, match="vit_checkpoint"):
        config.checkpoint_files()


def test_6b_yaml_names_missing_tokenizer_before_building_the_model():
    with pytest.raises(FileNotFoundError, match="ice_text.model"):
        visual_mllm.load_from_yaml(YAML_6B)


def test_config_round_trips_through_to_dict():
    from visual_mllm.models.visualglm import VisualGLMConfig

    config = VisualGLMConfig(seq_length=96, llm_config={"num_layers": 2, "hidden_size": 32, "num_heads": 2})
    again = VisualGLMConfig(**config.to_dict())
    assert again.to_dict() == config.to_dict()
    assert again.llm_config.num_layers == 2 and again.seq_length == 96
