"""convert_weight.py --model_type minigpt4 | minigpt4qwen --mindspore_config: the converted fixtures written back
as their release files (eva_vit_g.pth, blip2_pretrained_flant5xxl.pth, the projection file, the LLM's HF folder),
and converted again with the command the way back prints.

Fixture -> MindSpore (the session conversions of conftest) -> release -> MindSpore gives the same tensors bit
for bit and the same model config, with no --vit_num_layers (the ViT file keeps the release's extra block, as
zeros); the release files hold the fixture's tensors in the fixture's layout, config.json as the fixture's; bad
input is one error line with nothing written. No model is built with weights or compiled here.
"""
import contextlib
import io
import json
import shlex

import pytest
import torch
import yaml

from conftest import BLIP2_FAMILY_SOURCES, blip2_family_heads, fixture_path, load_json
from test_convert_visualglm import assert_same_outputs, main_in_process, read_outputs

FAMILIES = ["minigpt4", "minigpt4qwen"]
RELEASE = "release"  # the folder --mindspore_config writes


def fixture_state(family, index):
    """The state dict of the family's fixture file number `index` (0 eva, 1 blip2, 2 projection) and its container."""
    state = torch.load(fixture_path(*BLIP2_FAMILY_SOURCES[family][index]), weights_only=True)
    return (state["model"], "model") if "model" in state else (state, None)


def run_main(*args):
    """convert_weight.py's main() in this process (for module fixtures, which cannot use capsys):
    (status, stdout, stderr)."""
    from visual_mllm.cli.convert import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main([str(a) for a in args])
    return status, out.getvalue(), err.getvalue()


def release_args(family):
    """minigpt4: the defaults (one .bin); minigpt4qwen: safetensors in shards smaller than the fixture's LLM."""
    if family == "minigpt4":
        return []
    total = load_json(*BLIP2_FAMILY_SOURCES[family][3], "model.safetensors.index.json")["metadata"]["total_size"]
    return ["--format", "safetensors", "--max_shard_size", total // 3]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def output(request, family):
    """The session conversion of the family's fixture (conftest)."""
    return request.getfixturevalue(f"converted_{family}")


@pytest.fixture(scope="module")
def round_trip(family, output, tmp_path_factory):
    """(release folder, the printed command back, the folder that command converted the release into)."""
    work = tmp_path_factory.mktemp(f"reverse_{family}")
    status, stdout, err = run_main("--model_type", family, "--mindspore_config", output / f"run_{family}.yaml",
                                   "--output_dir", work / RELEASE, *release_args(family))
    assert status == 0, err
    (summary,) = [line for line in stdout.splitlines() if line.startswith("wrote ")]
    assert f"as the {family} release in {work / RELEASE}" in summary
    (back,) = [line.split(": ", 1)[1] for line in stdout.splitlines() if line.startswith("back to MindSpore: ")]
    command = shlex.split(back)
    assert command[:2] == ["python", "convert_weight.py"] and command[-2:] == ["--output_dir", "OUT"]
    status, _, err = run_main(*command[2:-1], work / "again")
    assert status == 0, err
    return work / RELEASE, command, work / "again"


# ----------------------------------------------------------------------------------------- the round trip

def test_release_converts_back_to_the_same_model(family, output, round_trip):
    _, command, again = round_trip
    assert_same_outputs(read_outputs(again), read_outputs(output))
    first, second = (yaml.safe_load((folder / f"run_{family}.yaml").read_text()) for folder in (output, again))
    for data in (first, second):
        for key in ("vit_checkpoint", "qformer_checkpoint", "llm_checkpoint"):
            data["model"]["model_config"].pop(key)
        data["processor"]["tokenizer"].pop("vocab_file")
    assert first == second
    # the flags a user gives: the heads (in no file), not the number of ViT blocks (the file keeps the extra one)
    vit_heads, qformer_heads = blip2_family_heads(family)
    assert "--vit_num_layers" not in command
    assert command[command.index("--vit_num_heads") + 1] == str(vit_heads)
    assert command[command.index("--qformer_num_heads") + 1] == str(qformer_heads)


def test_llm_folder_is_the_release_folder(family, round_trip):
    from visual_mllm import families
    from visual_mllm.convert.hf_folder import find_weights, read_source

    release, _, _ = round_trip
    source = fixture_path(*BLIP2_FAMILY_SOURCES[family][3])
    folder = release / families.get(family).conversion.release_llm
    assert json.loads((folder / "config.json").read_text()) == json.loads((source / "config.json").read_text())
    for name in ("generation_config.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                 "qwen.tiktoken"):
        if (source / name).is_file():
            assert (folder / name).read_bytes() == (source / name).read_bytes(), name
    index, single = find_weights(str(folder))
    if family == "minigpt4":
        assert index is None and single.endswith("pytorch_model.bin")
    else:
        assert index.endswith("model.safetensors.index.json")
        assert len(set(json.loads(open(index).read())["weight_map"].values())) > 1
    ours, theirs = read_source(str(folder)), read_source(str(source))
    assert sorted(ours) == sorted(theirs)
    for key, tensor in theirs.items():
        got = ours[key].load()
        assert got.dtype == tensor.dtype and torch.equal(got, tensor.load()), key


def test_image_files_have_the_lavis_layout(family, output, round_trip):
    from visual_mllm import families

    release, _, _ = round_trip
    conversion = families.get(family).conversion
    manifest = json.loads((output / "manifest.json").read_text())
    ignored = set(manifest["source"]["keys_ignored"])
    names = ("eva_vit_g.pth", "blip2_pretrained_flant5xxl.pth", conversion.release_projection)
    for index, (label, name) in enumerate(zip(("eva_vit", "qformer", "proj"), names)):
        theirs, container = fixture_state(family, index)
        saved = torch.load(release / name, weights_only=True)
        ours = saved if container is None else saved[container]
        assert container is None or list(saved) == [container], name
        # the ViT file: every key of the fixture's (the block the models skip too); the others: what was converted
        assert set(ours) == {key for key in theirs if label == "eva_vit" or f"{label}:{key}" not in ignored}, name
        for key, tensor in ours.items():
            if f"{label}:{key}" in ignored:
                assert not tensor.any(), key  # the ViT block the models skip, written as zeros
            else:
                assert tensor.dtype == theirs[key].dtype and torch.equal(tensor, theirs[key]), key
    projection = torch.load(release / conversion.release_projection, weights_only=True)["model"]
    assert sorted(projection) == [f"{conversion.projection}.bias", f"{conversion.projection}.weight"]


# ----------------------------------------------------------------------------------------- refusals

def edited_yaml(tmp_path, output, family, edit):
    """A copy of the session conversion's run YAML, its model config changed by edit(model_config, folder)."""
    data = yaml.safe_load((output / f"run_{family}.yaml").read_text())
    edit(data["model"]["model_config"], tmp_path)
    path = tmp_path / f"run_{family}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def with_k_bias(output, family):
    """An edit giving the ViT's last block a non-zero K bias (in a copy of the ViT checkpoint); its key."""
    import mindspore as ms

    def edit(model_config, folder):
        layers = model_config["image_encoder_config"]["vit_config"]["num_layers"]
        key = f"image_encoder.vit.blocks.{layers - 1}.attn.qkv.bias"
        params = {name: p.asnumpy() for name, p in ms.load_checkpoint(model_config["vit_checkpoint"]).items()}
        third = params[key].shape[0] // 3
        params[key][third] = 0.5
        path = folder / "vit_k_bias.ckpt"
        ms.save_checkpoint([{"name": name, "data": ms.Tensor(array)} for name, array in params.items()], str(path))
        model_config["vit_checkpoint"] = str(path)
        edit.key = key

    return edit


def broken(tmp_path, output, family, case):
    """(convert_weight.py arguments, words the one-line error must contain) for one kind of bad input."""
    from visual_mllm import families

    yaml_path = output / f"run_{family}.yaml"
    if case == "no_checkpoints":
        return ["--model_type", family, "--mindspore_config", families.get(family).demo_config], \
            ["names no checkpoint", "nothing to convert"]
    if case == "k_bias":
        edit = with_k_bias(output, family)
        path = edited_yaml(tmp_path, output, family, edit)
        return ["--model_type", family, "--mindspore_config", path], [edit.key, "K third is not zero", "q_bias"]
    if case == "llm_sizes":
        folder = tmp_path / "llm"
        folder.mkdir()
        config = load_json(*BLIP2_FAMILY_SOURCES[family][3], "config.json")
        config["intermediate_size"] += 2
        (folder / "config.json").write_text(json.dumps(config))
        return ["--model_type", family, "--mindspore_config", yaml_path, "--llm_path", folder], \
            ["intermediate_size", str(folder / "config.json"), "sizes"]
    if case == "other_family":
        other = FAMILIES[1 - FAMILIES.index(family)]
        return ["--model_type", other, "--mindspore_config", yaml_path], \
            [f"holds a {family} model", f"give --model_type {family}"]
    if case == "visualglm_default":
        return ["--mindspore_config", yaml_path], [f"holds a {family} model", f"give --model_type {family}"]
    if case == "source_flags":
        eva = fixture_path(*BLIP2_FAMILY_SOURCES[family][0])
        return ["--model_type", family, "--mindspore_config", yaml_path, "--eva_vit_path", eva,
                "--vit_num_layers", 3], ["--eva_vit_path, --vit_num_layers", "not with --mindspore_config"]
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["no_checkpoints", "k_bias"])
@pytest.mark.parametrize("family_name", FAMILIES)
def test_refusals_of_both_families(tmp_path, capsys, output_of, family_name, case):
    check_refusal(tmp_path, capsys, output_of(family_name), family_name, case)


@pytest.mark.parametrize("case", ["llm_sizes", "other_family", "visualglm_default", "source_flags"])
def test_refusals(tmp_path, capsys, converted_minigpt4, case):
    check_refusal(tmp_path, capsys, converted_minigpt4, "minigpt4", case)


@pytest.fixture
def output_of(request):
    return lambda name: request.getfixturevalue(f"converted_{name}")


def check_refusal(tmp_path, capsys, output, family, case):
    args, words = broken(tmp_path, output, family, case)
    status, err = main_in_process(capsys, *args, "--output_dir", tmp_path / RELEASE)
    assert status == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: ")
    for text in words:
        assert text in line, f"{text!r} not in: {line}"
    assert not (tmp_path / RELEASE).exists()


def test_an_interrupted_release_leaves_nothing(tmp_path, converted_minigpt4, monkeypatch):
    """Ctrl-C once the image files are written (still under temporary names): no file or folder is left."""
    from visual_mllm.convert import minigpt4

    def interrupt(*args, **kwargs):
        assert list((tmp_path / RELEASE).glob(".*.partial.pth"))  # the three image files, not yet renamed
        raise KeyboardInterrupt

    monkeypatch.setattr(minigpt4, "write_hf_shards", interrupt)
    with pytest.raises(KeyboardInterrupt):
        minigpt4.to_release("minigpt4", converted_minigpt4 / "run_minigpt4.yaml", tmp_path / RELEASE)
    assert not (tmp_path / RELEASE).exists()


@pytest.mark.parametrize("family_name", FAMILIES)
def test_config_json_takes_the_values_the_model_config_changed(family_name):
    """Only what the model config changed is rewritten, under the folder's own key; a size is refused."""
    from visual_mllm.convert import minigpt4
    from visual_mllm.convert.readers import ConversionError

    spec = minigpt4.Spec.of(family_name)
    folder = minigpt4.read_llm_folder(spec, fixture_path(*BLIP2_FAMILY_SOURCES[family_name][3]))
    hf = folder.config
    llm = spec.llm.read_config(hf, folder.tokenizer, folder.config_file)[0]
    assert spec.llm.release_config(hf, llm, folder.tokenizer, folder.config_file) == (hf, [])
    llm.norm_eps, llm.max_position_embeddings = 1e-5, 256
    written, changed = spec.llm.release_config(hf, llm, folder.tokenizer, folder.config_file)
    keys = {"minigpt4": ["rms_norm_eps", "max_position_embeddings"], "minigpt4qwen": ["layer_norm_epsilon", "seq_length"]}
    assert changed == keys[family_name] and set(written) == set(hf)
    assert {key: written[key] for key in changed} == dict(zip(changed, (1e-5, 256)))
    assert {key: value for key, value in written.items() if key not in changed} == \
        {key: value for key, value in hf.items() if key not in changed}
    llm.num_layers += 1
    with pytest.raises(ConversionError, match=f"num_layers {llm.num_layers} \\(config.json: {llm.num_layers - 1}\\)"):
        spec.llm.release_config(hf, llm, folder.tokenizer, folder.config_file)
