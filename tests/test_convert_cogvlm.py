"""convert_weight.py --model_type cogvlm: the tiny cogvlm-chat-hf fixture converted (conftest `converted_cogvlm`),
strict key accounting, the full-size shape table mapped with no weights built, and the way back to the release
layout. (Parity of the converted model with the remote code: test_cogvlm.py.)"""
import json

import numpy as np
import pytest
import yaml

from conftest import REPO_ROOT, fixture_path, load_json, run_converter

FULL_YAML = REPO_ROOT / "configs" / "cogvlm_chat_17b" / "run_cogvlm_chat_17b.yaml"


def full_table():
    """The full-size release's shape table as {key: SourceTensor} (no data)."""
    import torch
    from visual_mllm.convert.readers import SourceTensor

    lines = fixture_path("cogvlm", "shapes", "cogvlm_chat_hf_full_shapes.tsv").read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    rows = [dict(zip(header, line.split("\t"))) for line in lines[1:]]
    return {row["key"]: SourceTensor(row["shard"], tuple(json.loads(row["shape"])), getattr(torch, row["dtype"]), None)
            for row in rows}


def test_full_size_shape_table_maps_completely():
    """Every key of the real release maps onto the model of configs/cogvlm_chat_17b (or is an ignored inv_freq
    buffer), with the table's parameter count, and the sizes read from a real-size config.json are the YAML's."""
    from mindformers.models.build_config import build_model_config
    from visual_mllm import families
    from visual_mllm.convert import cogvlm_hf
    from visual_mllm.convert.job import model_parameters
    from visual_mllm.convert.keymap import plan
    from visual_mllm.convert.readers import Source
    from visual_mllm.registry import read_run_config

    record = load_json("cogvlm", "shapes", "cogvlm_chat_hf_full_shapes.json")
    tensors = full_table()
    assert len(tensors) == record["n_keys"]
    config = build_model_config(read_run_config(FULL_YAML).model.model_config)
    expected, _ = model_parameters(families.family_of(config).model_class, config)
    the_plan = plan(Source(tensors, [], "full-size table"), cogvlm_hf.rules(config), cogvlm_hf.ignored_keys(config),
                    expected, "full-size table")
    assert {name: tuple(meta.shape) for name, meta in the_plan.targets.items()} == expected
    assert the_plan.ignored == sorted(cogvlm_hf.ignored_keys(config))
    assert len(the_plan.ignored) == record["n_inv_freq_buffers"]
    assert sum(int(np.prod(shape)) for shape in expected.values()) == record["n_params"]  # 17,639,685,376

    tiny = json.loads(fixture_path("cogvlm", "cogvlm-chat-hf", "config.json").read_text())
    vocab, hidden = tensors["model.embed_tokens.weight"].shape
    positions, width = tensors["model.vision.patch_embedding.position_embedding.weight"].shape
    real = dict(tiny, vocab_size=vocab, hidden_size=hidden, num_hidden_layers=32, num_attention_heads=32,
                intermediate_size=tensors["model.layers.0.mlp.language_mlp.up_proj.weight"].shape[0],
                vision_config=dict(tiny["vision_config"], image_size=490, hidden_size=width, num_hidden_layers=63,
                                   num_heads=16, num_positions=positions,
                                   intermediate_size=tensors["model.vision.transformer.layers.0.mlp.fc1.weight"].shape[0]))
    from_json = cogvlm_hf.config_from_release(real, "real-size config.json")
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "norm_eps"):
        assert getattr(from_json.llm_config, name) == getattr(config.llm_config, name), name
    for name in ("image_size", "patch_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "norm_eps"):
        assert getattr(from_json.image_encoder_config.vit_config, name) == getattr(config.image_encoder_config.vit_config,
                                                                                   name), name


def test_converted_folder_accounts_for_every_key(converted_cogvlm):
    """Split checkpoints (EVA2-CLIP / adapter with boi, eoi / LLM / embedding), one YAML, the tokenizer files, and
    a manifest counting the 87 converted and the 3 ignored inv_freq buffers of the fixture's 90 tensors."""
    import mindspore as ms

    manifest = json.loads((converted_cogvlm / "manifest.json").read_text())
    assert manifest["source"]["keys"] == 90 and manifest["source"]["keys_converted"] == 87
    assert manifest["source"]["keys_ignored"] == [f"model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(3)]
    assert sorted(p.name for p in converted_cogvlm.glob("*.yaml")) == ["run_cogvlm.yaml"]
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        assert (converted_cogvlm / name).is_file(), name
    parts = {part: set(ms.load_checkpoint(info["path"])) for part, info in manifest["output"]["files"].items()}
    assert parts["llm_embedding"] == {"llm.embed_tokens.weight"}
    assert {"image_encoder.boi", "image_encoder.eoi"} <= parts["qformer"]
    assert all(name.startswith("image_encoder.adapter.") for name in parts["qformer"] - {"image_encoder.boi",
                                                                                        "image_encoder.eoi"})
    assert all(name.startswith("image_encoder.vit.") for name in parts["vit"])
    assert all(name.startswith("llm.") for name in parts["llm"])
    run = yaml.safe_load((converted_cogvlm / "run_cogvlm.yaml").read_text())
    assert run["processor"]["tokenizer"]["pad_token"] == "<unk>"


def test_back_to_the_release_layout_gives_the_release_tensors(converted_cogvlm, tmp_path):
    """--mindspore_config writes every tensor of the release again (inv_freq buffers included), equal to the
    fixture's, with its config.json keys."""
    from safetensors.numpy import load_file

    result = run_converter(tmp_path, "--model_type", "cogvlm", "--mindspore_config",
                           converted_cogvlm / "run_cogvlm.yaml", "--output_dir", tmp_path / "hf")
    assert result.returncode == 0, result.stderr[-3000:]
    source = fixture_path("cogvlm", "cogvlm-chat-hf")

    def tensors(folder):
        out = {}
        for path in sorted(folder.glob("*.safetensors")):
            out.update(load_file(str(path)))
        return out

    original, written = tensors(source), tensors(tmp_path / "hf")
    assert set(written) == set(original)
    for key, value in original.items():
        np.testing.assert_array_equal(written[key], value, err_msg=key)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config == json.loads((source / "config.json").read_text())


@pytest.mark.parametrize("change, message", [
    ({"template_version": "vqa"}, "template_version 'vqa'"),
    ({"architectures": ["LlamaForCausalLM"]}, "not a CogVLM"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
])
def test_refuses_configs_it_does_not_implement(change, message):
    from visual_mllm.convert import cogvlm_hf
    from visual_mllm.convert.readers import ConversionError

    config = json.loads(fixture_path("cogvlm", "cogvlm-chat-hf", "config.json").read_text())
    with pytest.raises(ConversionError, match=message):
        cogvlm_hf.config_from_release(dict(config, **change), "config.json")


def test_a_refusal_is_one_line_and_writes_nothing(tmp_path):
    """As a user runs it: exit status 2, one `error:` line, no output folder."""
    import shutil

    source = tmp_path / "release"
    shutil.copytree(fixture_path("cogvlm", "cogvlm-chat-hf"), source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps(dict(config, template_version="vqa")))
    result = run_converter(tmp_path, "--model_type", "cogvlm", "--torch_path", source, "--tokenizer",
                           fixture_path("cogvlm", "vicuna-7b-v1.5"), "--output_dir", tmp_path / "out")
    assert result.returncode == 2 and "template_version 'vqa'" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out").exists()
