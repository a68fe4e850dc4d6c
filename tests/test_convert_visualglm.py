"""convert_weight.py on every VisualGLM fixture: reference logits and tokens from the converted model,
identical tensors from every source layout, the HF round trip, SAT LoRA, the full-size shape tables,
and one clear error (exit 2, no traceback) for each kind of bad input.

Sizes, samples and expected values come from the fixture files; the SAT fp32 conversion itself (the
session fixture `converted_visualglm`) is what test_visualglm_parity.py runs its model tests on.
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
import torch

from conftest import REPO_ROOT, fixture_path, load_json, npz_prefix
from test_visualglm_parity import LOGIT_TOL, full_logits, greedy, prepare

SCRIPT = REPO_ROOT / "convert_weight.py"
YAML_6B = REPO_ROOT / "configs" / "visualglm_6b" / "run_visualglm_6b.yaml"
YAML_NAME = "run_visualglm.yaml"
LORA_RANK = 2  # of the synthetic LoRA checkpoint these tests build (the fixtures have none)


# ----------------------------------------------------------------------------------------- helpers

def run_cli(cwd, *args):
    env = dict(os.environ, LOCAL_DEFAULT_PATH=str(cwd / "log"))
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900, stdin=subprocess.DEVNULL)


def main_in_process(capsys, *args):
    """convert_weight.py's main() in this process: (exit status, stderr).

    main() returns 2 only when it caught the error and printed it as one `error: ...` line; that no
    traceback reaches the terminal is checked on the real script (a logger of an earlier in-process
    test may still write to that test's closed capture stream, which prints a logging traceback).
    """
    from visual_mllm.cli.convert import main

    status = main([str(a) for a in args])
    return status, capsys.readouterr().err


def sat_folder(name="visualglm-tiny"):
    return fixture_path("visualglm", "sat", name)


def hf_folder():
    return fixture_path("visualglm", "hf", "visualglm-tiny")


def sat_pt(folder):
    iteration = (folder / "latest").read_text().strip()
    return folder / iteration / "mp_rank_00_model_states.pt"


def sat_state(name="visualglm-tiny"):
    return dict(torch.load(sat_pt(sat_folder(name)), map_location="cpu", weights_only=True)["module"])


def sat_model_config(name="visualglm-tiny"):
    return load_json("visualglm", "sat", name, "model_config.json")


def write_sat(folder, state, model_config, **extra):
    """A SAT release layout (latest, model_config.json, 1/mp_rank_00_model_states.pt) in `folder`."""
    (folder / "1").mkdir(parents=True)
    (folder / "latest").write_text("1")
    (folder / "model_config.json").write_text(json.dumps(model_config))
    torch.save({"module": state, **extra}, folder / "1" / "mp_rank_00_model_states.pt")
    return folder


def mindspore_files(folder):
    return sorted(p for p in folder.iterdir() if p.suffix in (".ckpt", ".safetensors"))


def read_outputs(folder):
    """{file name: {parameter: numpy array}} of every MindSpore checkpoint in an output folder."""
    out = {}
    for path in mindspore_files(folder):
        params = ms.load_checkpoint(str(path), format=path.suffix[1:])
        out[path.name] = {name: p.asnumpy() for name, p in params.items() if hasattr(p, "asnumpy")}
    return out


def assert_same_outputs(got, expected):
    assert sorted(got) == sorted(expected)
    for file_name in expected:
        assert sorted(got[file_name]) == sorted(expected[file_name]), file_name
        for name, array in expected[file_name].items():
            assert got[file_name][name].dtype == array.dtype, name
            np.testing.assert_array_equal(got[file_name][name], array, err_msg=name)


def to_mindspore(source, output_dir, **kwargs):
    from visual_mllm.convert.visualglm import to_mindspore as convert

    return convert(str(source), str(output_dir), **kwargs)


@pytest.fixture(scope="module")
def cli_outputs(tmp_path_factory):
    """name -> output folder of `convert_weight.py --torch_path SRC --output_dir OUT ...`, run once per name."""
    cache = {}

    def get(name, source, *args):
        if name not in cache:
            work = tmp_path_factory.mktemp(name)
            result = run_cli(work, "--torch_path", source, "--output_dir", work / "model", *args)
            assert result.returncode == 0, result.stderr[-3000:]
            cache[name] = work / "model"
        return cache[name]

    return get


@pytest.fixture(scope="module")
def sat32_outputs(converted_visualglm):
    return read_outputs(converted_visualglm)


# ----------------------------------------------------------------------------------------- the fixtures

@pytest.mark.parametrize("fixture", ["sat_fp16", "hf"])
def test_converted_fixture_reproduces_reference_logits_and_greedy_tokens(cli_outputs, fixture):
    """SAT fp16 (against reference_fp16_weights.npz) and HF sharded (against reference.npz), through the CLI."""
    from visual_mllm import load_from_yaml
    from visual_mllm.processing.visualglm_prompt import VisualGLMPromptBuilder
    from visual_mllm.tokenizers.chatglm import ChatGLMTokenizer

    if fixture == "sat_fp16":
        out = cli_outputs(fixture, sat_folder("visualglm-tiny-fp16"))
        arrays = np.load(fixture_path("visualglm", "reference_fp16_weights.npz"))
    else:
        out = cli_outputs(fixture, hf_folder())
        arrays = np.load(fixture_path("visualglm", "reference.npz"))
    reference = load_json("visualglm", "reference.json")
    ms.set_context(mode=ms.GRAPH_MODE)
    model = load_from_yaml(out / YAML_NAME)[0]
    # the YAML holds each tower's weights as converted: float16 storage, float32 compute
    stored = {p.dtype for p in model.get_parameters() if len(p.shape) == 2}  # Linear and Embedding weights
    assert stored == ({ms.float16} if fixture == "sat_fp16" else {ms.float32}), stored
    tokenizer = ChatGLMTokenizer.from_folder(str(hf_folder()))
    builder = VisualGLMPromptBuilder(tokenizer, model.num_image_tokens, placeholder="pad")
    for sample in reference["samples"]:
        row, pixels = prepare(sample, builder, model)
        diff = np.abs(full_logits(model, row, pixels) - arrays[f"{npz_prefix(sample, arrays)}_logits"]).max()
        assert diff < LOGIT_TOL, f"{fixture} {sample['name']}: prompt logits differ by {diff}"
        expected = sample["fp16_weights"]["generated_ids"] if fixture == "sat_fp16" else sample["generated_ids"]
        assert model.generate_ids([row], greedy(reference, model), pixels)[0] == expected, sample["name"]


def test_sat_and_hf_conversions_give_identical_tensors(cli_outputs, sat32_outputs):
    assert_same_outputs(read_outputs(cli_outputs("hf", hf_folder())), sat32_outputs)


def test_fp16_source_is_written_in_fp16(cli_outputs):
    outputs = read_outputs(cli_outputs("sat_fp16", sat_folder("visualglm-tiny-fp16")))
    state = sat_state("visualglm-tiny-fp16")
    assert {a.dtype for params in outputs.values() for a in params.values()} == {np.dtype(np.float16)}
    glm = outputs["visualglm_glm.ckpt"]
    np.testing.assert_array_equal(glm["llm.lm_head.weight"], state["mixins.chatglm-final.lm_head.weight"].numpy())
    np.testing.assert_array_equal(outputs["visualglm_glm_embedding.ckpt"]["llm.word_embeddings.weight"],
                                  state["transformer.word_embeddings.weight"].numpy())


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_output_folder_manifest_and_yaml(converted_visualglm, cli_outputs):
    import yaml

    for out, source_files in ((converted_visualglm, [sat_pt(sat_folder())]),
                              (cli_outputs("hf", hf_folder()), sorted(hf_folder().glob("*.bin")))):
        assert len(list(out.glob("*.yaml"))) == 1
        manifest = json.loads((out / "manifest.json").read_text())
        assert sorted(f["path"] for f in manifest["source"]["files"]) == sorted(str(p) for p in source_files)
        for record in manifest["source"]["files"]:
            path = Path(record["path"])
            assert record["bytes"] == path.stat().st_size and record["sha256"] == sha256(path)
        source = manifest["source"]
        assert source["keys"] == source["keys_converted"] + len(source["keys_ignored"])
        assert manifest["tool_versions"]["mindspore"] == ms.__version__
        assert manifest["output"]["dtype"] == "auto" and manifest["output"]["format"] == "ckpt"
        files = manifest["output"]["files"]
        assert sorted(files) == ["llm", "llm_embedding", "qformer", "vit"]
        for part in files.values():
            path = Path(part["path"])
            assert part["bytes"] == path.stat().st_size and part["sha256"] == sha256(path)
        model_config = yaml.safe_load((out / YAML_NAME).read_text())["model"]["model_config"]
        for part, key in (("vit", "vit_checkpoint"), ("qformer", "qformer_checkpoint"), ("llm", "llm_checkpoint")):
            assert model_config[key] == files[part]["path"]
    # the HF folder has ice_text.model: copied beside the weights and named in the YAML
    out = cli_outputs("hf", hf_folder())
    tokenizer = yaml.safe_load((out / YAML_NAME).read_text())["processor"]["tokenizer"]
    assert tokenizer["vocab_file"] == str(out / "ice_text.model")
    assert (out / "ice_text.model").read_bytes() == (hf_folder() / "ice_text.model").read_bytes()


@pytest.mark.parametrize("file_format, dtype", [("ckpt", "fp16"), ("safetensors", "bf16"), ("safetensors", "fp32")])
def test_formats_and_dtypes(tmp_path, sat32_outputs, file_format, dtype):
    from visual_mllm import load_from_yaml

    yaml_path = to_mindspore(sat_folder(), tmp_path, dtype=dtype, file_format=file_format)
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    files = mindspore_files(tmp_path)
    assert {p.suffix for p in files} == {"." + file_format}
    for path in files:
        params = ms.load_checkpoint(str(path), format=file_format)
        expected = sat32_outputs[path.stem + ".ckpt"]
        assert sorted(params) == sorted(expected)
        for name, param in params.items():
            want = torch.from_numpy(expected[name]).to(torch_dtype).float().numpy()
            np.testing.assert_array_equal(ms.ops.cast(param, ms.float32).asnumpy(), want, err_msg=name)
    load_from_yaml(yaml_path)  # the model loads these files strictly


def test_ckpt_writer_slices_large_tensors_as_mindspore_does(tmp_path, monkeypatch):
    from visual_mllm.convert import writers
    from visual_mllm.convert.readers import read_mindspore_ckpt

    monkeypatch.setattr(writers, "CKPT_SLICE_BYTES", 64)  # 16 float32 values per entry
    tensors = {"a": torch.arange(100, dtype=torch.float32).reshape(10, 10), "b": torch.ones(3, dtype=torch.float16),
               "c": torch.arange(7, dtype=torch.bfloat16)}
    path = tmp_path / "t.ckpt"
    writer = writers.CkptWriter(str(path), [(n, t.to("meta")) for n, t in tensors.items()], {"note": "héllo"})
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    writer.close()
    loaded = ms.load_checkpoint(str(path))
    assert loaded["note"] == "héllo"
    ours = read_mindspore_ckpt(str(path))
    assert sorted(ours) == sorted(tensors)
    for name, tensor in tensors.items():
        np.testing.assert_array_equal(ms.ops.cast(loaded[name], ms.float32).asnumpy(), tensor.float().numpy())
        assert torch.equal(ours[name].load(), tensor)
    # and the reader reads what MindSpore itself writes
    ms.save_checkpoint([{"name": name, "data": loaded[name]} for name in tensors], str(tmp_path / "ms.ckpt"),
                       append_dict={"note": "x"})
    theirs = read_mindspore_ckpt(str(tmp_path / "ms.ckpt"))
    assert sorted(theirs) == sorted(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(theirs[name].load(), tensor)


# ----------------------------------------------------------------------------------------- layouts

def hf_variant(tmp_path, kind):
    """The HF fixture as a single .bin, or as safetensors shards + index."""
    from safetensors.torch import save_file

    folder = tmp_path / kind
    folder.mkdir()
    for name in ("config.json", "ice_text.model", "tokenizer_config.json"):
        shutil.copy(hf_folder() / name, folder / name)
    index = load_json("visualglm", "hf", "visualglm-tiny", "pytorch_model.bin.index.json")["weight_map"]
    shards = {shard: torch.load(hf_folder() / shard, weights_only=True) for shard in sorted(set(index.values()))}
    if kind == "single_bin":
        torch.save({k: v for shard in shards.values() for k, v in shard.items()}, folder / "pytorch_model.bin")
    else:
        weight_map = {}
        for k, (shard, tensors) in enumerate(shards.items()):
            name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({key: t.contiguous() for key, t in tensors.items()}, str(folder / name))
            weight_map.update({key: name for key in tensors})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("layout", ["sat_pt_file", "hf_index_file", "single_bin", "safetensors_shards"])
def test_every_source_layout_gives_the_same_tensors(tmp_path, sat32_outputs, layout):
    source = {"sat_pt_file": lambda: sat_pt(sat_folder()),
              "hf_index_file": lambda: hf_folder() / "pytorch_model.bin.index.json"}.get(layout)
    source = source() if source else hf_variant(tmp_path, layout)
    to_mindspore(source, tmp_path / "out")
    assert_same_outputs(read_outputs(tmp_path / "out"), sat32_outputs)


# ----------------------------------------------------------------------------------------- HF round trip

@pytest.mark.parametrize("file_format", ["bin", "safetensors"])
def test_round_trip_through_the_hf_format(tmp_path, capsys, converted_visualglm, sat32_outputs, file_format):
    """MindSpore -> HF gives the fixture's HF release back; converting that again gives the same MindSpore tensors."""
    from visual_mllm.convert.readers import read_safetensors, read_sharded, read_torch_pickle

    fixture_index = load_json("visualglm", "hf", "visualglm-tiny", "pytorch_model.bin.index.json")
    # a shard limit below the fixture's total size forces several shards
    shard_size = fixture_index["metadata"]["total_size"] // 3
    status, err = main_in_process(capsys, "--mindspore_config", converted_visualglm / YAML_NAME,
                                  "--output_dir", tmp_path / "hf", "--format", file_format,
                                  "--max_shard_size", shard_size)
    assert status == 0, err
    index_name = "pytorch_model.bin.index.json" if file_format == "bin" else "model.safetensors.index.json"
    reader = read_torch_pickle if file_format == "bin" else read_safetensors
    ours, shards = read_sharded(str(tmp_path / "hf" / index_name), reader)
    assert len(shards) > 1
    theirs, _ = read_sharded(str(hf_folder() / "pytorch_model.bin.index.json"), read_torch_pickle)
    assert sorted(ours) == sorted(theirs) == sorted(fixture_index["weight_map"])
    for key, tensor in theirs.items():
        got = ours[key].load()
        assert got.dtype == tensor.dtype, key
        assert torch.equal(got, tensor.load()), key
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    published = load_json("visualglm", "hf", "visualglm-tiny", "config.json")
    assert config.pop("tie_word_embeddings") is False
    config.pop("_name_or_path"), published.pop("_name_or_path")
    assert config == published
    assert (tmp_path / "hf" / "ice_text.model").is_file() and (tmp_path / "hf" / "tokenizer_config.json").is_file()
    to_mindspore(tmp_path / "hf", tmp_path / "again")
    assert_same_outputs(read_outputs(tmp_path / "again"), sat32_outputs)


def test_hf_without_the_qkv_inverse_gives_wrong_logits(tmp_path, monkeypatch):
    """Negative control: reading HF query_key_value rows as SAT's [Q; K; V] keeps every shape and breaks the model."""
    from visual_mllm import load_from_yaml
    from visual_mllm.convert import keymap, visualglm_hf
    from visual_mllm.processing.visualglm_prompt import VisualGLMPromptBuilder
    from visual_mllm.tokenizers.chatglm import ChatGLMTokenizer

    original = visualglm_hf.glm_attention
    monkeypatch.setattr(visualglm_hf, "glm_attention",
                        lambda heads: [(src, dst, keymap.IDENTITY) for src, dst, _ in original(heads)])
    yaml_path = to_mindspore(hf_folder(), tmp_path)
    ms.set_context(mode=ms.GRAPH_MODE)
    model = load_from_yaml(yaml_path)[0]
    builder = VisualGLMPromptBuilder(ChatGLMTokenizer.from_folder(str(hf_folder())), model.num_image_tokens,
                                     placeholder="pad")
    arrays = np.load(fixture_path("visualglm", "reference.npz"))
    for sample in load_json("visualglm", "reference.json")["samples"]:  # every sample: each must break
        row, pixels = prepare(sample, builder, model)
        diff = np.abs(full_logits(model, row, pixels) - arrays[f"{npz_prefix(sample, arrays)}_logits"]).max()
        assert diff > 1.0, f"{sample['name']}: logits without the inverse permutation differ by only {diff}"


# ----------------------------------------------------------------------------------------- SAT LoRA

def lora_sat(tmp_path, alpha=None):
    """The tiny SAT fixture with LoRA on the first and last GLM layers (one layer if it has only one), as
    VisualGLM's finetune script saves it."""
    state, model_config = sat_state(), sat_model_config()
    generator = torch.Generator().manual_seed(0)
    hidden, layers = model_config["hidden_size"], model_config["num_layers"]
    lora_layers = sorted({0, layers - 1})
    for i in lora_layers:
        for module, partition in (("query_key_value", 3), ("dense", 1)):
            prefix = f"transformer.layers.{i}.attention.{module}"
            for p in ("weight", "bias"):
                state[f"{prefix}.original.{p}"] = state.pop(f"{prefix}.{p}")
            out = state[f"{prefix}.original.weight"].shape[0]
            for j in range(partition):
                state[f"{prefix}.matrix_A.{j}"] = torch.randn(LORA_RANK, hidden, generator=generator)
                state[f"{prefix}.matrix_B.{j}"] = torch.randn(out // partition, LORA_RANK, generator=generator)
    model_config.update(use_lora=True, lora_rank=LORA_RANK, layer_range=lora_layers)
    if alpha is not None:
        model_config["lora_alpha"] = alpha
    return write_sat(tmp_path / "sat_lora", state, model_config), state, lora_layers


@pytest.mark.parametrize("alpha", [None, 16.0])
def test_sat_lora_is_merged_into_the_weights(tmp_path, sat32_outputs, alpha):
    folder, state, lora_layers = lora_sat(tmp_path, alpha)
    to_mindspore(folder, tmp_path / "out")
    outputs = read_outputs(tmp_path / "out")
    scaling = (alpha or 1.0) / LORA_RANK  # SAT LoraMixin's default lora_alpha is 1
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["lora"]["layers"] == lora_layers and manifest["lora"]["scaling"] == scaling
    merged = set()
    for i in lora_layers:
        for module, partition in (("query_key_value", 3), ("dense", 1)):
            prefix = f"transformer.layers.{i}.attention.{module}"
            delta = np.concatenate([state[f"{prefix}.matrix_B.{j}"].double().numpy()
                                    @ state[f"{prefix}.matrix_A.{j}"].double().numpy() for j in range(partition)])
            want = state[f"{prefix}.original.weight"].double().numpy() + scaling * delta
            name = f"llm.layers.{i}.attention.{module}.weight"
            np.testing.assert_allclose(outputs["visualglm_glm.ckpt"][name], want, rtol=1e-6, atol=1e-5)
            merged.add(name)
    for file_name, params in sat32_outputs.items():  # everything else is the base conversion
        for name, array in params.items():
            if name not in merged:
                np.testing.assert_array_equal(outputs[file_name][name], array, err_msg=name)


def test_sat_lora_kept_loads_as_a_finetune_lora_checkpoint(tmp_path, sat32_outputs):
    """--lora keep: base weights in the GLM file, LoRA as mindpet LoRADense weights in the finetune LoRA format;
    loading that into the converted model and merging gives the merged conversion."""
    lora = pytest.importorskip("visual_mllm.finetune.lora")
    from visual_mllm import load_from_yaml

    folder, _, lora_layers = lora_sat(tmp_path)
    to_mindspore(folder, tmp_path / "merged")
    yaml_path = to_mindspore(folder, tmp_path / "kept", keep_lora=True)
    kept = read_outputs(tmp_path / "kept")
    for name, array in sat32_outputs["visualglm_glm.ckpt"].items():  # base weights untouched
        np.testing.assert_array_equal(kept["visualglm_glm.ckpt"][name], array, err_msg=name)
    lora_file = tmp_path / "kept" / "visualglm_glm_lora.ckpt"
    assert all(name.endswith(lora.LORA_PARAMS) for name in kept[lora_file.name])
    ms.set_context(mode=ms.GRAPH_MODE)
    model = load_from_yaml(yaml_path)[0]
    result = lora.load_lora_checkpoint(model, str(lora_file), merge=True)
    assert sorted(result.targets) == sorted(f"llm.layers.{i}.attention.{m}" for i in lora_layers
                                            for m in ("query_key_value", "dense"))
    merged = read_outputs(tmp_path / "merged")["visualglm_glm.ckpt"]
    for param in model.get_parameters():
        if param.name in merged:
            np.testing.assert_allclose(param.asnumpy(), merged[param.name], rtol=1e-6, atol=1e-5, err_msg=param.name)


def test_kept_lora_is_refused_with_quantize(tmp_path):
    from visual_mllm.convert.readers import ConversionError

    folder, _, _ = lora_sat(tmp_path)
    with pytest.raises(ConversionError, match="--lora keep with --quantize int8.*--lora merge"):
        to_mindspore(folder, tmp_path / "kept", keep_lora=True, quantize="int8")
    assert not (tmp_path / "kept").exists()


def test_merged_finetune_converts_to_hf_and_back(tmp_path, capsys):
    """A LoRA finetune merged by run_finetune.py --merge (the demo LoRA on the tiny model) converts to the HF
    format like any other model: converting that back gives the merged tensors exactly, and the result
    still answers every training row of examples/finetune with its label."""
    from visual_mllm import load_from_yaml
    from visual_mllm.finetune.demo import DEMO_CONFIG, DEMO_DATASET, demo_lora_checkpoint
    from visual_mllm.finetune.evaluate import describe, evaluate_labels
    from visual_mllm.finetune.trainer import RunOptions, merge_only
    from visual_mllm.registry import read_run_config

    ms.set_context(mode=ms.GRAPH_MODE)
    merged = merge_only(RunOptions(config=DEMO_CONFIG, merge=True, lora_checkpoint=demo_lora_checkpoint(),
                                   output_dir=str(tmp_path), quiet=True)).merged_yaml
    status, err = main_in_process(capsys, "--mindspore_config", merged, "--output_dir", tmp_path / "hf")
    assert status == 0, err
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    llm = read_run_config(merged).model.model_config.llm_config  # the demo's sizes (configs/visualglm_tiny)
    assert (config["num_layers"], config["hidden_size"], config["vocab_size"]) == \
        (llm.num_layers, llm.hidden_size, llm.vocab_size)
    assert (tmp_path / "hf" / "pytorch_model.bin").is_file() and (tmp_path / "hf" / "ice_text.model").is_file()

    back_yaml = to_mindspore(tmp_path / "hf", tmp_path / "back")

    def tensors(folder):  # {name: array} over the split files (the embedding may be in two of them)
        out = {}
        for params in read_outputs(folder).values():
            for name, array in params.items():
                if name in out:
                    np.testing.assert_array_equal(out[name], array, err_msg=name)
                out[name] = array
        return out

    want, got = tensors(tmp_path / "merged"), tensors(tmp_path / "back")
    assert sorted(got) == sorted(want) and not any("lora" in name for name in want)
    for name, array in want.items():
        np.testing.assert_array_equal(got[name], array, err_msg=name)
    model, processor = load_from_yaml(back_yaml)
    checks = evaluate_labels(model, processor, DEMO_DATASET)
    with open(DEMO_DATASET, encoding="utf-8") as f:
        rows = len(json.load(f))
    assert len(checks) == rows and all(c.matches for c in checks), describe(checks)


# ----------------------------------------------------------------------------------------- full size

def shape_table_source(*parts):
    from visual_mllm.convert.readers import Source, SourceTensor

    path = str(fixture_path("shapes", *parts))
    tensors = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.startswith("#"):
                key, shape, dtype = line.rstrip("\n").split("\t")[:3]
                tensors[key] = SourceTensor(path, tuple(json.loads(shape)), getattr(torch, dtype), None)
    return Source(tensors, [path], path)


def test_full_size_shape_tables_map_completely():
    """Every key of the real SAT and HF releases maps onto the 6B model of configs/visualglm_6b (no weights)."""
    from mindformers.models.build_config import build_model_config
    from visual_mllm.convert import visualglm_hf, visualglm_sat
    from visual_mllm.convert.job import model_parameter_shapes
    from visual_mllm.convert.keymap import plan
    from visual_mllm.convert.readers import Source, SourceTensor
    from visual_mllm.models.visualglm import VisualGLMForConditionalGeneration
    from visual_mllm.registry import read_run_config

    no_files = {"vit_checkpoint": None, "qformer_checkpoint": None, "llm_checkpoint": None}
    config = build_model_config(read_run_config(YAML_6B, no_files).model.model_config)
    expected = model_parameter_shapes(VisualGLMForConditionalGeneration, config)
    sat = shape_table_source("visualglm_full_shapes.tsv")
    sat_plan = plan(sat, visualglm_sat.sat_rules(config), visualglm_sat.IGNORED, expected, "SAT table")
    assert {n: tuple(m.shape) for n, m in sat_plan.targets.items()} == expected
    assert sat_plan.ignored == ["mixins.chatglm-attn.rotary_emb.inv_freq"]
    hf = shape_table_source("hf_visualglm_full_shapes.tsv")
    hf_plan = plan(hf, visualglm_hf.hf_rules(config), visualglm_hf.ignored_keys(config), expected, "HF table")
    assert {n: tuple(m.shape) for n, m in hf_plan.targets.items()} == expected
    assert hf_plan.ignored == sorted(visualglm_hf.ignored_keys(config))
    # and back: our parameters give exactly the HF table's keys and shapes
    ours = Source({name: SourceTensor("model", shape, torch.float16, None) for name, shape in expected.items()},
                  [], "model")
    export = plan(ours, visualglm_hf.export_rules(config), (), None, "export").targets
    assert {n: tuple(m.shape) for n, m in export.items()} == {key: t.shape for key, t in hf.items()}


def test_sat_config_round_trips():
    from visual_mllm.convert.visualglm_sat import config_from_sat, sat_model_config as to_sat

    for name in ("visualglm-tiny", "visualglm-tiny-fp16"):
        model_config = sat_model_config(name)
        assert to_sat(config_from_sat(model_config, eos_token_id=None)) == model_config


def test_optional_mlp_widths_round_trip_as_written():
    """The MLP widths SAT defaults to 4 x hidden are written only when a release wrote them: the real
    VisualGLM config leaves the Q-Former's out, a config with another width spells it out."""
    from visual_mllm.convert.visualglm_sat import config_from_sat, sat_model_config as to_sat

    model_config = sat_model_config()
    qformer = model_config["qformer_args"]
    default = 4 * qformer["hidden_size"]
    omitted = json.loads(json.dumps(model_config))
    omitted["qformer_args"].pop("inner_hidden_size", None)
    spelled = json.loads(json.dumps(model_config))
    spelled["qformer_args"]["inner_hidden_size"] = default + 8  # not SAT's default
    for case in (omitted, spelled):
        assert to_sat(config_from_sat(case, eos_token_id=None)) == case
    assert config_from_sat(omitted, None).image_encoder_config.qformer_config.intermediate_size == default


# ----------------------------------------------------------------------------------------- failures

def break_state(tmp_path, case):
    """A SAT folder with one defect, and the words the error must contain."""
    state, model_config = sat_state(), sat_model_config()
    hidden = model_config["hidden_size"]
    if case == "missing_key":
        key = f"transformer.layers.{model_config['num_layers'] - 1}.mlp.dense_h_to_4h.weight"
        del state[key]
        expect = ["missing keys", key]
    elif case == "unexpected_key":
        key = f"transformer.layers.{model_config['num_layers']}.mlp.dense_h_to_4h.weight"
        state[key] = torch.zeros(2)
        expect = ["unexpected keys", key]
    elif case == "wrong_shape":
        key = "mixins.eva.model.vit.transformer.layers.0.mlp.dense_h_to_4h.weight"
        state[key] = state[key][:-1]
        expect = ["wrong shapes", "image_encoder.vit.blocks.0.mlp.fc1.weight", key]
    elif case == "projection":
        for p in ("weight", "bias"):
            key = f"mixins.eva.model.glm_proj.{p}"
            state[key] = torch.cat([state[key], state[key]])
        expect = ["mixins.eva.model.glm_proj.weight", f"{2 * hidden} features", f"LLM hidden size is {hidden}"]
    elif case == "not_only_tensors":
        write_sat(tmp_path / case, state, model_config, args=argparse.Namespace(lr=1e-4))
        return tmp_path / case, ["refusing", "mp_rank_00_model_states.pt", "other than tensors"]
    elif case == "tokenizer":
        model_config["gmask_token_id"] += 1
        expect = ["--tokenizer", "gmask_token_id"]
    return write_sat(tmp_path / case, state, model_config), expect


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def broken_source(tmp_path, case):
    if case in ("missing_key", "unexpected_key", "wrong_shape", "projection", "not_only_tensors", "tokenizer"):
        return break_state(tmp_path, case)
    if case == "not_a_zip_checkpoint":
        folder = tmp_path / "sat"
        shutil.copytree(sat_folder(), folder)
        sat_pt(folder).write_bytes(b"\x80\x02}q\x00.")  # a legacy (non-zip) pickle of {}
        return folder, ["not a PyTorch zip checkpoint", str(sat_pt(folder))]
    if case == "unrecognised":
        (tmp_path / "stuff").mkdir()
        (tmp_path / "stuff" / "weights.npz").write_bytes(b"nothing")
        return tmp_path / "stuff", ["cannot tell what", str(tmp_path / "stuff")]
    if case == "truncated_sat":
        folder = tmp_path / "sat"
        shutil.copytree(sat_folder(), folder)
        truncate(sat_pt(folder))
        return folder, ["truncated or corrupt", str(sat_pt(folder))]
    folder = tmp_path / "hf"
    shutil.copytree(hf_folder(), folder)
    shard = sorted(folder.glob("pytorch_model-*.bin"))[-1]
    if case == "truncated_hf_shard":
        truncate(shard)
        return folder, ["truncated or corrupt", str(shard)]
    if case == "missing_shard":
        shard.unlink()
        return folder, ["names shard", shard.name]
    if case == "truncated_safetensors":
        folder = hf_variant(tmp_path, "safetensors_shards")
        shard = sorted(folder.glob("*.safetensors"))[0]
        truncate(shard)
        return folder, ["truncated", str(shard)]
    raise AssertionError(case)


FAILURES = ["unrecognised", "not_only_tensors", "not_a_zip_checkpoint", "truncated_sat", "truncated_hf_shard", "truncated_safetensors",
            "missing_shard", "missing_key", "unexpected_key", "wrong_shape", "projection", "tokenizer"]


@pytest.mark.parametrize("case", FAILURES)
def test_bad_source_is_one_clear_error(tmp_path, capsys, case):
    source, expect = broken_source(tmp_path, case)
    status, err = main_in_process(capsys, "--torch_path", source, "--output_dir", tmp_path / "out")
    assert status == 2, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ")
    for words in expect:
        assert words in lines[-1], f"{words!r} not in: {lines[-1]}"
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_bad_input_through_the_script_exits_2_without_traceback(tmp_path):
    source, expect = broken_source(tmp_path, "truncated_sat")
    result = run_cli(tmp_path, "--torch_path", source, "--output_dir", tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and expect[1] in result.stderr
    both = run_cli(tmp_path, "--torch_path", source, "--mindspore_config", "x.yaml", "--output_dir", tmp_path)
    assert both.returncode == 2 and "exactly one" in both.stderr and "Traceback" not in both.stderr


def test_corrupt_mindspore_checkpoint_is_refused(tmp_path, capsys, converted_visualglm):
    folder = tmp_path / "ms"
    shutil.copytree(converted_visualglm, folder)
    text = (folder / YAML_NAME).read_text().replace(str(converted_visualglm), str(folder))
    (folder / YAML_NAME).write_text(text)
    truncate(folder / "visualglm_glm.ckpt")
    status, err = main_in_process(capsys, "--mindspore_config", folder / YAML_NAME, "--output_dir", tmp_path / "hf")
    assert status == 2
    assert err.strip().splitlines()[-1].startswith("error: ")
    assert str(folder / "visualglm_glm.ckpt") in err and "truncated" in err
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").iterdir())


def test_projection_mismatch_is_caught_before_any_tensor_is_read(tmp_path, monkeypatch):
    from visual_mllm.convert.readers import SourceTensor
    from visual_mllm.models.base import ProjectionMismatchError

    source, _ = break_state(tmp_path, "projection")

    def no_reading(self):
        raise AssertionError(f"tensor data read: {self.file}")

    monkeypatch.setattr(SourceTensor, "load", no_reading)
    with pytest.raises(ProjectionMismatchError):
        to_mindspore(source, tmp_path / "out")


def test_interrupted_conversion_leaves_no_half_written_file(tmp_path, converted_visualglm, monkeypatch):
    """Ctrl-C in the middle: no temporary file stays, and what the folder held before is untouched."""
    from visual_mllm.convert import writers

    out = tmp_path / "out"
    shutil.copytree(converted_visualglm, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    halfway = sum(len(params) for params in read_outputs(out).values()) // 2  # tensors the conversion writes
    calls = []
    real_add = writers.CkptWriter._add

    def interrupt(self, name, tensor):
        calls.append(name)
        if len(calls) == halfway:
            raise KeyboardInterrupt
        real_add(self, name, tensor)

    monkeypatch.setattr(writers.CkptWriter, "_add", interrupt)
    with pytest.raises(KeyboardInterrupt):
        to_mindspore(sat_folder("visualglm-tiny-fp16"), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
