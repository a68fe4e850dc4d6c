"""convert_weight.py --model_type minigpt4 | minigpt4qwen on the tiny fixtures: the converted YAML reproduces
the reference image-side tensors, prompt logits and greedy answers (every turn, with and without the KV
cache, one by one and in one batch); .bin and safetensors LLM folders give the same tensors; the full-size
shape tables map completely; and each kind of bad input is one clear error with nothing written.

Every size, prompt, image and expected value comes from the fixture files (the attention heads, in no
weight file, from each fixture's own records: conftest.blip2_family_heads). Tolerances: 1e-4 for the
image-side tensors and MiniGPT4Qwen's logits (fp32; the fixture's own KV-cache-vs-no-cache agreement is
1e-5), 1e-3 for MiniGPT-4's logits, which are ~5x larger (std 15.9, max |78|; the fixture README's
stated tolerance "~1e-3 (the logits are large)", its own float64 check agrees to 1.5e-4).
"""
import dataclasses
import functools
import json
from pathlib import Path
from typing import List, Optional

import mindspore as ms
import numpy as np
import pytest
import torch

from conftest import (BLIP2_FAMILY_SOURCES, blip2_family_args, blip2_family_heads, fixture_path, load_json, npz_prefix,
                      run_converter, steps_where_margins_allow)
from test_convert_visualglm import assert_same_outputs, main_in_process, read_outputs
from test_family_prompts import untagged
from test_visualglm_parity import full_logits

FAMILIES = ["minigpt4", "minigpt4qwen"]
TOWER_TOL = 1e-4
LOGIT_TOL = {"minigpt4": 1e-3, "minigpt4qwen": 1e-4}
LABELS = ("eva_vit", "qformer", "proj", "llm")  # the sources, as the manifest names them


# ----------------------------------------------------------------------------------------- the references

@dataclasses.dataclass
class Turn:
    """One recorded conversation turn: the request our contract sends, and what the reference generated."""

    name: str
    request: object  # visual_mllm.inference.ChatRequest
    generated_ids: List[int]
    answer: str
    npz: Optional[str]  # the sample's prefix in reference.npz when its tensors are of this turn
    margins: List[float]  # the reference's top1 - top2 logit at each greedy step


def reference(family):
    return load_json(family, "reference.json")


def turns(family):
    """Every turn of every sample. History questions carry no image tag: our contract places the image."""
    from visual_mllm.inference import ChatRequest

    out = []
    for sample in reference(family)["samples"]:
        image = str(fixture_path(family, sample["image"])) if sample["image"] else None
        if family == "minigpt4":
            answers = [turn["answer"] for turn in sample["turns"]]
            for number, (question, turn) in enumerate(zip(sample["questions"], sample["turns"])):
                history = list(zip(sample["questions"][:number], answers[:number]))
                recorded = number == sample["recorded_turn"]
                out.append(Turn(f"{sample['name']} turn {number}", ChatRequest(question, image, history),
                                turn["generated_ids"], turn["answer"], npz_prefix(sample) if recorded else None,
                                turn["margins"]))
        else:
            history = [(untagged(q), a) for q, a in sample["history"]]
            out.append(Turn(sample["name"], ChatRequest(untagged(sample["query"]), image, history),
                            sample["generated_ids"], sample["response"], npz_prefix(sample), sample["margins"]))
    return out


def new_tokens(family):
    data = reference(family)
    return data["n_new_tokens"] if family == "minigpt4" else data["meta"]["generation_config"]["max_new_tokens"]


def greedy(family, model):
    from visual_mllm.generation.sampling import GenerationConfig

    return GenerationConfig(max_new_tokens=new_tokens(family), eos_token_id=model.config.llm_config.eos_token_id)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def output(request, family):
    return request.getfixturevalue(f"converted_{family}")


@pytest.fixture(scope="module")
def loaded(family, output):
    """(model, processor) through the YAML the converter wrote, as run_infer.py loads it."""
    from visual_mllm import load_from_yaml

    ms.set_context(mode=ms.GRAPH_MODE)
    return load_from_yaml(output / f"run_{family}.yaml")


# ----------------------------------------------------------------------------------------- the model

def test_image_side_and_prompt_logits(family, loaded):
    from mindspore import Tensor
    from visual_mllm.generation.generator import PromptRow

    model, processor = loaded
    arrays = np.load(fixture_path(family, "reference.npz"))
    recorded = [turn for turn in turns(family) if turn.npz]
    assert recorded
    for turn in recorded:
        request, prefix = turn.request, turn.npz
        pixels = None
        if request.image:
            pixels = processor.preprocess_image(request.image)
            np.testing.assert_array_equal(pixels, arrays[f"{prefix}_pixel_values"], err_msg=turn.name)
            got = model.image_encoder.encode_with_intermediates(Tensor(pixels))
            for name, tensor in zip(("vit_out", "qformer_out", "image_embeds"), got):
                diff = np.abs(tensor.asnumpy()[0] - arrays[f"{prefix}_{name}"]).max()
                assert diff < TOWER_TOL, f"{turn.name}: {name} differs by {diff}"
        ids = processor.prompt_builder.build_ids(request.prompt, request.history, has_image=pixels is not None)
        diff = np.abs(full_logits(model, PromptRow(ids.input_ids, ids.image_start), pixels)
                      - arrays[f"{prefix}_logits"]).max()
        assert diff < LOGIT_TOL[family], f"{turn.name}: prompt logits differ by {diff}"


@pytest.mark.parametrize("use_past", [True, False], ids=["kv_cache", "no_cache"])
def test_greedy_answers_one_by_one(family, loaded, use_past):
    from visual_mllm.inference import answer

    model, processor = loaded
    for turn in turns(family):
        (result,) = answer(model, processor, [turn.request], greedy(family, model), use_past=use_past)
        assert result.generated_ids == turn.generated_ids, turn.name
        assert result.response == turn.answer, turn.name


@pytest.mark.parametrize("use_past", [True, False], ids=["kv_cache", "no_cache"])
def test_batch_of_every_turn_equals_one_by_one(family, loaded, use_past):
    from visual_mllm.inference import answer

    model, processor = loaded
    every = turns(family)
    results = answer(model, processor, [turn.request for turn in every], greedy(family, model), use_past=use_past)
    assert len({len(result.input_ids) for result in results}) > 1  # rows of different lengths: padding matters
    for turn, result in zip(every, results):
        assert (result.generated_ids, result.response) == (turn.generated_ids, turn.answer), turn.name


def test_int8_weights_give_the_reference_tokens_where_margins_allow(family, output, loaded):
    """The LLM's Linears quantised to int8 as the converted checkpoint loads: the prompt-logit error against the
    reference is measured on the recorded turns (every prompt position) and bounded; then every turn's greedy
    tokens (one batch) equal the reference's at each step up to the first whose recorded top1-top2 margin is not
    above twice that error (a rounding could flip that step; nothing after it is comparable)."""
    from visual_mllm import load_from_yaml
    from visual_mllm.generation.generator import PromptRow
    from visual_mllm.inference import answer
    from visual_mllm.registry import precision_overrides

    processor = loaded[1]
    quantized, _ = load_from_yaml(output / f"run_{family}.yaml", **precision_overrides(quantize="int8"))
    arrays = np.load(fixture_path(family, "reference.npz"))
    error = 0.0
    for turn in [turn for turn in turns(family) if turn.npz]:
        request = turn.request
        pixels = processor.preprocess_image(request.image) if request.image else None
        ids = processor.prompt_builder.build_ids(request.prompt, request.history, has_image=pixels is not None)
        expected = arrays[f"{turn.npz}_logits"]  # [S, V]
        turn_error = float(np.abs(full_logits(quantized, PromptRow(ids.input_ids, ids.image_start), pixels)
                                  - expected).max())
        # per-channel int8 of the fixture's weights: a small fraction of the logit range, never most of it
        assert turn_error < 0.1 * (expected.max() - expected.min()), f"{turn.name}: int8 logit error {turn_error}"
        error = max(error, turn_error)
    every = turns(family)
    results = answer(quantized, processor, [turn.request for turn in every], greedy(family, quantized))
    checked = 0
    for turn, result in zip(every, results):
        checked += len(steps_where_margins_allow(turn.name, result.generated_ids, turn.generated_ids, turn.margins,
                                                 error, "int8"))
    assert checked, "no greedy step had a margin above twice the int8 logit error"


# ----------------------------------------------------------------------------------------- the output folder

def state_keys(family, index):
    """The keys of the family's source file number `index` (0 eva, 1 blip2, 2 projection)."""
    state = torch.load(fixture_path(*BLIP2_FAMILY_SOURCES[family][index]), weights_only=True)
    return set(state["model"] if "model" in state else state)


def reference_loads(family):
    """{label: keys the reference model loads from that file} of the tiny fixture, as its records say."""
    data = reference(family)
    if family == "minigpt4":
        return {"eva_vit": state_keys(family, 0) - set(data["checks"]["loading"]["eva_file_keys_unused"]),
                "qformer": set(data["file_contents"]["blip2_pretrained"]["loaded_by_minigpt4"])}
    facts = data["meta"]["load_facts"]
    return {"eva_vit": state_keys(family, 0) - set(facts["eva_vit_g.pth"]["unexpected_keys"]),
            "qformer": set(facts["blip2_pretrained_flant5xxl.pth"]["used"]),
            "proj": set(facts["model.pth"]["keys"])}


def assert_converts_what_the_reference_loads(loads, used, ignored, what):
    """We convert exactly the keys the reference code loads, except buffers it loads and never uses
    (position_ids, inv_freq), which we ignore."""
    assert used <= loads, f"{what}: converted but not loaded by the reference: {sorted(used - loads)}"
    assert loads - used <= ignored, f"{what}: loaded by the reference but neither converted nor ignored"
    assert all(key.endswith(("position_ids", "inv_freq")) for key in loads - used), what


def key_paths(tree, prefix=""):
    """Every key of a nested dict as a dotted path."""
    paths = set()
    for key, value in tree.items():
        paths.add(prefix + key)
        if isinstance(value, dict):
            paths |= key_paths(value, f"{prefix}{key}.")
    return paths


def lookup(tree, path):
    return functools.reduce(lambda node, key: node[key], path.split("."), tree)


def test_output_folder_manifest_and_yaml(family, output):
    import yaml
    from visual_mllm import families

    model_class = families.get(family).model_class
    data = yaml.safe_load((output / f"run_{family}.yaml").read_text())
    # the shape of the family's tiny run YAML (nested configs may leave out their `type`), plus the checkpoints
    demo = yaml.safe_load(Path(families.get(family).demo_config).read_text())
    nested_types = {path for path in key_paths(demo) if path.endswith(".type") and path.count(".") > 2}
    assert key_paths(demo) - nested_types <= key_paths(data)
    for path in ("model.arch.type", "model.model_config.type", "processor.type", "processor.image_processor.type",
                 "processor.tokenizer.type"):
        assert lookup(data, path) == lookup(demo, path), path
    assert [p.name for p in output.glob("*.yaml")] == [f"run_{family}.yaml"]
    manifest = json.loads((output / "manifest.json").read_text())
    source = manifest["source"]
    assert source["keys"] == source["keys_converted"] + len(source["keys_ignored"])
    ignored = {label: {k.split(":", 1)[1] for k in source["keys_ignored"] if k.startswith(label + ":")}
               for label in LABELS}
    for label, loads in reference_loads(family).items():
        keys = state_keys(family, LABELS.index(label))
        assert manifest["keys_by_source"][label]["keys"] == len(keys)
        assert_converts_what_the_reference_loads(loads, keys - ignored[label], ignored[label], f"{family} {label}")
    files = manifest["output"]["files"]
    llm_name = model_class.split_files["llm"]
    assert {part: Path(info["path"]).name for part, info in files.items()} == dict(
        {part: name + ".ckpt" for part, name in model_class.split_files.items()},
        llm_embedding=f"{llm_name}_embedding.ckpt")
    model_config = data["model"]["model_config"]
    for part, key in (("vit", "vit_checkpoint"), ("qformer", "qformer_checkpoint"), ("llm", "llm_checkpoint")):
        assert model_config[key] == files[part]["path"]
    # the embedding-only file holds the decoder's embedding table under its own name, as the LLM file does
    outputs = read_outputs(output)
    (embedding,) = outputs[f"{llm_name}_embedding.ckpt"].items()
    np.testing.assert_array_equal(embedding[1], outputs[f"{llm_name}.ckpt"][embedding[0]])
    llm_config = model_config["llm_config"]
    assert embedding[1].shape == (llm_config["vocab_size"], llm_config["hidden_size"])
    # the tokenizer of the LLM folder, copied and named in the YAML
    vocab = Path(data["processor"]["tokenizer"]["vocab_file"])
    llm_folder = fixture_path(*BLIP2_FAMILY_SOURCES[family][3])
    assert vocab.parent == output and vocab.read_bytes() == (llm_folder / vocab.name).read_bytes()
    assert (output / "tokenizer_config.json").read_bytes() == (llm_folder / "tokenizer_config.json").read_bytes()


def test_bin_and_safetensors_vicuna_give_identical_tensors(tmp_path, capsys, converted_minigpt4):
    bin_folder = fixture_path("minigpt4", "vicuna-tiny-bin")
    status, err = main_in_process(capsys, *blip2_family_args("minigpt4", llm_path=bin_folder),
                                  "--output_dir", tmp_path / "out")
    assert status == 0, err
    assert_same_outputs(read_outputs(tmp_path / "out"), read_outputs(converted_minigpt4))


# ----------------------------------------------------------------------------------------- full size

def table(*parts, column=None):
    """A shape table as {key: SourceTensor} (no data), or {key: value of `column`}."""
    from visual_mllm.convert.readers import SourceTensor

    path = fixture_path(*parts)
    lines = path.read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    rows = [dict(zip(header, line.split("\t"))) for line in lines[1:]]
    if column:
        return {row["key"]: row[column] for row in rows}
    # the assembled model's table has no dtype column; a dtype changes nothing in the mapping
    return {row["key"]: SourceTensor(str(path), tuple(json.loads(row["shape"])),
                                     getattr(torch, row.get("dtype", "float32")), None) for row in rows}


FULL_TABLES = {  # eva, blip2, projection (from the assembled model's table or model.pth's), LLM
    "minigpt4": (("minigpt4", "shapes", "eva_vit_g_full_shapes.tsv"),
                 ("minigpt4", "shapes", "blip2_pretrained_flant5xxl_full_shapes.tsv"),
                 ("minigpt4", "shapes", "minigpt4_vicuna7b_model_shapes.tsv"),
                 ("minigpt4", "shapes", "vicuna7b_full_shapes.tsv")),
    "minigpt4qwen": (("minigpt4qwen", "shapes", "eva_vit_g_full_shapes.tsv"),
                     ("minigpt4qwen", "shapes", "blip2_pretrained_flant5xxl_full_shapes.tsv"),
                     ("minigpt4qwen", "shapes", "minigpt4qwen_model_pth_full_shapes.tsv"),
                     ("minigpt4qwen", "shapes", "qwen7b_chat_full_shapes.tsv")),
}
# where the assembled MiniGPT-4 table says each key comes from, and the prefix MiniGPT-4 gives it
ASSEMBLED_FROM = {"eva_vit": ("eva_vit_g.pth", "visual_encoder."), "qformer": ("blip2_pretrained_flant5xxl.pth", ""),
                  "proj": ("pretrained_minigpt4.pth", ""), "llm": ("llama (HF dir)", "llama_model.")}


def full_size_llm_config(family, tiny, llm):
    """The tiny config.json with every field a shape fixes taken from the full-size table. Heads shape
    nothing here (no grouped-query attention): the tiny config's divide the full width too."""
    if family == "minigpt4":
        vocab, hidden = llm["model.embed_tokens.weight"].shape
        return dict(tiny, vocab_size=vocab, hidden_size=hidden,
                    intermediate_size=llm["model.layers.0.mlp.up_proj.weight"].shape[0],
                    num_hidden_layers=sum(k.endswith("input_layernorm.weight") for k in llm))
    vocab, hidden = llm["transformer.wte.weight"].shape
    return dict(tiny, vocab_size=vocab, hidden_size=hidden, kv_channels=hidden // tiny["num_attention_heads"],
                intermediate_size=2 * llm["transformer.h.0.mlp.w1.weight"].shape[0],
                num_hidden_layers=sum(k.endswith("ln_1.weight") for k in llm))


@pytest.mark.parametrize("family", FAMILIES)
def test_full_size_shape_tables_map_completely(family):
    """The real files' keys map onto the released model (ViT-g 39 blocks, bert-base Q-Former, 7B LLM: the
    converter's default heads and blocks) with no weights built, and the ignored keys are the ones the
    real code leaves unused."""
    from visual_mllm.convert import minigpt4
    from visual_mllm.convert.job import model_parameters
    from visual_mllm.convert.readers import Source

    spec = minigpt4.Spec.of(family)
    eva, blip2, proj, llm = (table(*parts) for parts in FULL_TABLES[family])
    if family == "minigpt4":
        origin = table(*FULL_TABLES[family][2], column="source_file")
        proj = {key: tensor for key, tensor in proj.items() if origin[key] == ASSEMBLED_FROM["proj"][0]}
    sources = {label: Source(tensors, [], f"{label} table") for label, tensors in zip(LABELS, (eva, blip2, proj, llm))}
    tiny = minigpt4.read_llm_folder(spec, fixture_path(*BLIP2_FAMILY_SOURCES[family][3]))
    folder = dataclasses.replace(tiny, config=full_size_llm_config(family, tiny.config, llm), source=sources["llm"])
    config, the_plan, _ = minigpt4.conversion_plan(spec, sources, folder, minigpt4.Options())
    expected, _ = model_parameters(spec.family.model_class, config)
    assert {name: tuple(meta.shape) for name, meta in the_plan.targets.items()} == expected
    blocks = 1 + max(int(key.split(".")[1]) for key in eva if key.startswith("blocks."))
    assert config.image_encoder_config.vit_config.num_layers == blocks - 1
    used = {label: {k.split(":", 1)[1] for k in the_plan.used_keys if k.startswith(label + ":")} for label in LABELS}
    ignored = {label: {k.split(":", 1)[1] for k in the_plan.ignored if k.startswith(label + ":")} for label in LABELS}
    assert ignored["eva_vit"] == {key for key in eva if key.startswith(f"blocks.{blocks - 1}.")}
    if family == "minigpt4":  # what the assembled MiniGPT-4 model takes from each file
        for label, (file_name, prefix) in ASSEMBLED_FROM.items():
            loads = {key[len(prefix):] for key, name in origin.items() if name == file_name}
            assert_converts_what_the_reference_loads(loads, used[label], ignored[label], label)
    else:
        assert ignored["llm"] == set() and used["proj"] == {key for key in proj if key.startswith(spec.projection)}


# ----------------------------------------------------------------------------------------- refusals

def save_like(path, state, source):
    """`state` saved at `path` in the container layout of the fixture file `source`."""
    original = torch.load(source, weights_only=True)
    torch.save({"model": state} if "model" in original else state, path)
    return path


def edited(tmp_path, family, index, edit):
    """A copy of the family's source file number `index` (0 eva, 1 blip2, 2 projection) changed by edit(state)."""
    source = fixture_path(*BLIP2_FAMILY_SOURCES[family][index])
    original = torch.load(source, weights_only=True)
    state = dict(original["model"] if "model" in original else original)
    edit(state)
    return save_like(tmp_path / source.name, state, source)


def doubled_projection(tmp_path, family):
    """The family's projection with twice the output rows, and the words the refusal must say."""
    from visual_mllm import families

    name = families.get(family).conversion.projection
    hidden = load_json(*BLIP2_FAMILY_SOURCES[family][3], "config.json")["hidden_size"]

    def double(state):
        for p in ("weight", "bias"):
            state[f"{name}.{p}"] = torch.cat([state[f"{name}.{p}"]] * 2)

    path = edited(tmp_path, family, 2, double)
    return path, [f"{name}.weight", f"{2 * hidden} features", f"LLM hidden size is {hidden}",
                  "13B projection with a 7B LLM"]


def broken(tmp_path, family, case):
    """(convert_weight.py arguments, words the one-line error must contain) for one kind of bad input."""
    sources = BLIP2_FAMILY_SOURCES[family]
    if case == "projection_width":
        path, words = doubled_projection(tmp_path, family)
        return blip2_family_args(family, proj_path=path), words
    if case == "blip2_as_eva":
        return blip2_family_args(family, eva_vit_path=fixture_path(*sources[1])), \
            ["--eva_vit_path", "is the BLIP-2 checkpoint", "give it to --qformer_path", "expects the EVA ViT-g weights"]
    if case == "other_family_projection":
        other = FAMILIES[1 - FAMILIES.index(family)]
        return blip2_family_args(family, proj_path=fixture_path(*BLIP2_FAMILY_SOURCES[other][2])), \
            ["--proj_path", f"--model_type {other}"]
    if case == "other_family_llm":
        other = FAMILIES[1 - FAMILIES.index(family)]
        return blip2_family_args(family, llm_path=fixture_path(*BLIP2_FAMILY_SOURCES[other][3])), \
            ["--llm_path", f"--model_type {family} expects"]
    if case == "missing_key":
        used = reference(family)
        layers = used["sizes"]["vit"]["used_blocks"] if family == "minigpt4" else used["meta"]["sizes"]["vit"]["depth"]
        key = f"blocks.{layers - 1}.mlp.fc1.weight"
        path = edited(tmp_path, family, 0, lambda state: state.pop(key))
        return blip2_family_args(family, eva_vit_path=path), ["missing keys", key, "--eva_vit_path"]
    if case == "unexpected_key":
        key = "Qformer.bert.encoder.layer.0.attention.self.extra.weight"
        path = edited(tmp_path, family, 1, lambda state: state.__setitem__(key, torch.zeros(2)))
        return blip2_family_args(family, qformer_path=path), ["unexpected keys", key, "--qformer_path"]
    if case == "lora_in_projection":  # peft's names in a projection file trained with LoRA on the LLM
        key = "llm_model.base_model.model.transformer.h.0.attn.c_attn.lora_A.default.weight"
        path = edited(tmp_path, family, 2, lambda state: state.__setitem__(key, torch.zeros(2, 2)))
        return blip2_family_args(family, proj_path=path), ["--proj_path", "LoRA weights", key, "merge_and_unload"]
    if case == "heads_not_given":
        args = blip2_family_args(family)
        return args[:args.index("--vit_num_heads")], ["--vit_num_heads"]
    raise AssertionError(case)


CASES = ["projection_width", "blip2_as_eva", "other_family_projection", "other_family_llm", "missing_key",
         "unexpected_key", "lora_in_projection", "heads_not_given"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_clear_error_and_nothing_is_written(tmp_path, capsys, family, case):
    args, words = broken(tmp_path, family, case)
    status, err = main_in_process(capsys, *args, "--output_dir", tmp_path / "out")
    assert status == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: ")
    for text in words:
        assert text in line, f"{text!r} not in: {line}"
    assert not (tmp_path / "out").exists()


def test_projection_width_is_refused_before_any_tensor_is_read(tmp_path, monkeypatch):
    from visual_mllm.convert import minigpt4
    from visual_mllm.convert.readers import SourceTensor
    from visual_mllm.models.base import ProjectionMismatchError

    family = "minigpt4"
    path, _ = doubled_projection(tmp_path, family)
    eva, blip2, _, llm = (fixture_path(*parts) for parts in BLIP2_FAMILY_SOURCES[family])

    def no_reading(self):
        raise AssertionError(f"tensor data read: {self.file}")

    monkeypatch.setattr(SourceTensor, "load", no_reading)
    vit_heads, qformer_heads = blip2_family_heads(family)
    with pytest.raises(ProjectionMismatchError):
        minigpt4.to_mindspore(family, eva, blip2, path, llm, tmp_path / "out",
                              options=minigpt4.Options(vit_num_heads=vit_heads, qformer_num_heads=qformer_heads))
    assert not (tmp_path / "out").exists()


def test_the_script_exits_2_without_traceback(tmp_path):
    args, words = broken(tmp_path, "minigpt4", "blip2_as_eva")
    result = run_converter(tmp_path, *args, "--output_dir", tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and words[0] in result.stderr
    mixed = run_converter(tmp_path, *args, "--torch_path", "x", "--output_dir", tmp_path / "out")
    assert mixed.returncode == 2 and "--torch_path: only with --model_type visualglm" in mixed.stderr


def test_each_job_refuses_the_other_jobs_flags(tmp_path, capsys):
    from visual_mllm import families

    lavis = " or ".join(f.name for f in families.with_conversion("lavis"))
    status, err = main_in_process(capsys, "--eva_vit_path", "x", "--torch_path", "y", "--output_dir", tmp_path)
    assert status == 2 and f"--eva_vit_path: only with --model_type {lavis}" in err
    for family in FAMILIES:
        status, err = main_in_process(capsys, *blip2_family_args(family), "--lora", "keep", "--output_dir", tmp_path)
        assert status == 2 and "--lora: only with --model_type visualglm" in err
    assert not any(tmp_path.iterdir())
