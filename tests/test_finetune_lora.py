"""LoRA from configuration: targets, layers, rank/alpha, freezing and the trainable count; trainable-only
checkpoints, `load_lora_checkpoint` (strict) and merging into the base weights."""
import os

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

import visual_mllm
from visual_mllm.finetune.lora import (LoraCheckpointError, LoraConfigError, LoraSettings, apply_lora,
                                       load_lora_checkpoint, lora_targets_of, merge_lora, save_lora_checkpoint,
                                       save_merged_model)
from visual_mllm.models.weights import load_checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "visualglm_tiny", "run_visualglm_tiny.yaml")
H, QKV, VOCAB = 64, 192, 1144  # tiny GLM sizes


@pytest.fixture(autouse=True)
def pynative():
    ms.set_context(mode=ms.PYNATIVE_MODE)  # a few eager forwards of the tiny model: no compilation
    yield
    ms.set_context(mode=ms.GRAPH_MODE)


def tiny(**overrides):
    model, _ = visual_mllm.load_from_yaml(TINY, **overrides)
    return model


def logits(model):
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 700, size=(1, 20)).astype(np.int32)
    ids[0, 12], ids[0, 13] = 801, 804  # [gMASK] <sop>
    pos, prefix = model.llm.positions.prompt([list(ids[0])], 20)
    embeds = model.image_encoder(Tensor(rng.standard_normal((1, 3, 56, 56)).astype(np.float32)))
    return model(Tensor(ids), embeds, Tensor(np.array([2], np.int32)), Tensor(pos),
                 Tensor(np.array([20], np.int32)), Tensor(prefix)).asnumpy()


def reference_settings(**kw):
    base = dict(rank=10, alpha=128.0, layers=[0, 2], target_modules=["attention.query_key_value", "attention.dense"])
    base.update(kw)
    return LoraSettings(**base)


def randomise_lora(model, seed=1):
    rng = np.random.default_rng(seed)
    for p in model.get_parameters():
        if "mindpet_delta_lora" in p.name:
            p.set_data(Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.05))


def test_reference_layout_trains_only_lora_on_the_chosen_layers():
    model = tiny()
    base = logits(model)
    summary = apply_lora(model, reference_settings())
    assert lora_targets_of(model) == ["llm.layers.0.attention.query_key_value", "llm.layers.0.attention.dense",
                                      "llm.layers.2.attention.query_key_value", "llm.layers.2.attention.dense"]
    trainable = sorted(p.name for p in model.trainable_params())
    assert trainable == sorted(f"llm.layers.{i}.attention.{m}.mindpet_delta_lora_{ab}"
                               for i in (0, 2) for m in ("query_key_value", "dense") for ab in "ab")
    per_layer = 10 * (H + QKV) + 10 * (H + H)
    assert summary.trainable == summary.lora_params == 2 * per_layer
    assert "trainable parameters: 7,680 of" in summary.describe()
    names = [p.name for p in model.get_parameters()]
    assert len(names) == len(set(names)) and "llm.layers.0.attention.query_key_value.weight" in names
    np.testing.assert_array_equal(logits(model), base)  # B starts at zero: the model is unchanged


def test_projection_only_and_qformer_lora_are_configuration():
    model = tiny()
    summary = apply_lora(model, LoraSettings(enabled=False), trainable_patterns=["image_encoder.projection.*"])
    assert sorted(p.name for p in model.trainable_params()) == ["image_encoder.projection.bias",
                                                                "image_encoder.projection.weight"]
    assert summary.trainable == 32 * H + H and not summary.lora_targets
    model = tiny()
    apply_lora(model, LoraSettings(rank=4, alpha=8, target_modules=[],
                                   extra_targets=["image_encoder.qformer.layers.*.self_attn.query"]))
    assert lora_targets_of(model) == [f"image_encoder.qformer.layers.{i}.self_attn.query" for i in range(4)]


@pytest.mark.parametrize("settings, trainable, message", [
    (reference_settings(layers=[0, 3]), (), r"lora.layers \[3\] do not exist: llm.layers has layers 0..2"),
    (reference_settings(target_modules=["attention.qkv"]), (), r"match no Dense layer in llm.layers.N"),
    (reference_settings(extra_targets=["llm.nothing.*"]), (), "matches no Dense layer"),
    (reference_settings(layer_prefix="llm.blocks"), (), "not a layer list"),
    (reference_settings(), ("image_encoder.projektion.*",), "matches no parameter"),
    (LoraSettings(enabled=False), (), "no parameter is trainable"),
    (reference_settings(rank=0), (), "positive integer"),
])
def test_bad_lora_settings_are_refused(settings, trainable, message):
    with pytest.raises(LoraConfigError, match=message):
        apply_lora(tiny(), settings, trainable)


def test_checkpoint_round_trip_merge_and_split_save(tmp_path):
    model = tiny()
    apply_lora(model, reference_settings(), trainable_patterns=["image_encoder.projection.*"])
    randomise_lora(model)
    model.image_encoder.projection.bias.set_data(Tensor(np.full((H,), 0.01, np.float32)))
    want = logits(model)
    path = save_lora_checkpoint(model, str(tmp_path / "lora.ckpt"), reference_settings())
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".partial")]
    stored = ms.load_checkpoint(path)
    assert sorted(k for k in stored if k != "visual_mllm_lora") == sorted(
        p.name for p in model.trainable_params())  # trainable parameters only

    fresh = tiny()
    result = load_lora_checkpoint(fresh, path)
    assert result.rank == 10 and result.alpha == 128.0 and len(result.targets) == 4
    assert result.trainable == ["image_encoder.projection.weight", "image_encoder.projection.bias"]
    np.testing.assert_allclose(logits(fresh), want, rtol=1e-5, atol=1e-5)

    merged = tiny()
    load_lora_checkpoint(merged, path, merge=True)
    assert not lora_targets_of(merged)
    assert sorted(p.name for p in merged.get_parameters()) == sorted(p.name for p in tiny().get_parameters())
    np.testing.assert_allclose(logits(merged), want, rtol=1e-4, atol=1e-4)

    paths = save_merged_model(fresh, str(tmp_path / "merged"))
    reloaded = tiny()
    load_checkpoints(reloaded, [paths["vit"], paths["qformer"], paths["llm"]])  # strict: same names as the base
    np.testing.assert_allclose(logits(reloaded), want, rtol=1e-4, atol=1e-4)


def test_load_lora_checkpoint_is_strict(tmp_path):
    model = tiny()
    apply_lora(model, reference_settings())
    path = save_lora_checkpoint(model, str(tmp_path / "lora.ckpt"))
    with pytest.raises(LoraCheckpointError, match="not Dense layers"):
        load_lora_checkpoint(tiny(llm_config={"num_layers": 2}), path)  # layer 2 does not exist there
    with pytest.raises(LoraCheckpointError, match="wrong shape"):
        load_lora_checkpoint(tiny(llm_config={"hidden_size": 32, "num_heads": 4}), path)
    plain = str(tmp_path / "plain.ckpt")
    ms.save_checkpoint([{"name": "x", "data": Tensor(np.ones(2, np.float32))}], plain)
    with pytest.raises(LoraCheckpointError, match="not a visual_mllm LoRA checkpoint"):
        load_lora_checkpoint(tiny(), plain)
    stored = ms.load_checkpoint(path)
    meta = stored.pop("visual_mllm_lora")
    stored.pop("llm.layers.0.attention.dense.mindpet_delta_lora_b")
    cut = str(tmp_path / "cut.ckpt")
    ms.save_checkpoint([{"name": k, "data": v} for k, v in stored.items()], cut, append_dict={"visual_mllm_lora": meta})
    target = tiny()
    with pytest.raises(LoraCheckpointError, match="missing: llm.layers.0.attention.dense.mindpet_delta_lora_b"):
        load_lora_checkpoint(target, cut)
    assert not lora_targets_of(target)  # nothing was changed
    with pytest.raises(FileNotFoundError):
        load_lora_checkpoint(tiny(), str(tmp_path / "absent.ckpt"))


def test_visualglm_6b_config_has_the_reference_defaults():
    from visual_mllm.finetune.config import load_finetune_config
    from visual_mllm.finetune.lora import find_targets

    _, cfg = load_finetune_config(os.path.join(REPO, "configs", "visualglm_6b", "lora.yaml"))
    lora = cfg.lora
    assert (lora.rank, lora.alpha, lora.dropout, lora.layers) == (10, 128, 0.0, [0, 14])
    assert list(lora.target_modules) == ["attention.query_key_value", "attention.dense"] and not cfg.trainable
    assert (cfg.dataset.max_source_length, cfg.dataset.max_target_length) == (64, 256)
    opt = cfg.optimizer
    assert (opt.beta1, opt.beta2, opt.eps, opt.weight_decay, opt.grad_clip) == (0.9, 0.95, 1e-8, 0.01, 0.1)
    assert cfg.lr_args(300) == {"type": "AnnealingLR", "learning_rate": 1e-4, "warmup_steps": 6, "num_iters": 300,
                                "decay_style": "cosine", "decay_ratio": 0.1, "auto_warmup_steps": 100,
                                "auto_warmup_rate": 0.05}
    rs = cfg.runner.loss_scale
    assert (rs.init, rs.factor, rs.window) == (65536, 2, 400)
    deep = tiny(llm_config={"num_layers": 28})  # the 6B depth at toy width: LoRA lands on layers 0 and 14 only
    assert find_targets(deep, lora) == ["llm.layers.0.attention.query_key_value", "llm.layers.0.attention.dense",
                                        "llm.layers.14.attention.query_key_value", "llm.layers.14.attention.dense"]
    # at the real sizes: 2 layers x (10 x (4096 + 12288) + 10 x (4096 + 4096)) LoRA parameters
    assert 2 * (10 * (4096 + 3 * 4096) + 10 * (4096 + 4096)) == 491520


def test_unknown_finetune_keys_are_errors(tmp_path):
    from visual_mllm.finetune.config import FinetuneConfigError, load_finetune_config

    path = tmp_path / "bad.yaml"
    path.write_text(f"base_config: {TINY}\nfinetune:\n  lora: {{rank: 4, alhpa: 8}}\n", encoding="utf-8")
    with pytest.raises(FinetuneConfigError, match="alhpa"):
        load_finetune_config(str(path))
    path.write_text(f"base_config: {TINY}\nfinetune:\n  runner: {{max_step: 4}}\n", encoding="utf-8")
    with pytest.raises(FinetuneConfigError, match="max_step"):
        load_finetune_config(str(path))
