"""Exported graphs against eager inference, and every export/runtime error.

Tiny random model (no fixtures needed): exported graphs give the eager tokens, single and batched,
with and without the incremental graph; errors are clear. With the converted reference fixture: the
exported graphs reproduce the reference tokens of every sample.
"""
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT, fixture_path, load_json, npz_prefix

TINY_YAML = os.path.join(REPO_ROOT, "configs", "visualglm_tiny", "run_visualglm_tiny.yaml")
IMAGES = os.path.join(REPO_ROOT, "examples", "images")
REQUESTS = [("描述这张图片。", os.path.join(IMAGES, "chelsea.png")), ("你好，请介绍一下你自己。", None),
            ("这是什么？", os.path.join(IMAGES, "coffee.png"))]


def export(model, processor, yaml_path, out, batch_size, seq_length, use_past):
    from visual_mllm.export.exporter import export_model
    from visual_mllm.registry import plain, read_run_config

    section = plain(read_run_config(yaml_path).processor)
    return export_model(model, section, processor.tokenizer, str(out), batch_size, seq_length, use_past,
                        log=lambda _: None)


def greedy(model, max_new_tokens=10):
    from visual_mllm.generation.sampling import GenerationConfig

    return GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=model.config.llm_config.eos_token_id)


def prepared(processor, requests):
    from visual_mllm.generation.generator import PromptRow

    items = [processor(q, image=img) for q, img in requests]
    rows = [PromptRow(i["input_ids"], i["image_start"]) for i in items]
    shape = next(i["pixel_values"].shape[1:] for i in items if i["pixel_values"] is not None)
    pixels = np.stack([np.zeros(shape, np.float32) if i["pixel_values"] is None else i["pixel_values"][0]
                       for i in items])
    return rows, pixels


@pytest.fixture(scope="module")
def tiny():
    import mindspore as ms
    import visual_mllm

    ms.set_context(mode=ms.GRAPH_MODE)
    return visual_mllm.load_from_yaml(TINY_YAML)


@pytest.fixture(scope="module")
def tiny_export(tiny, tmp_path_factory):
    model, processor = tiny
    out = tmp_path_factory.mktemp("tiny_export") / "bs2"
    export(model, processor, TINY_YAML, out, batch_size=2, seq_length=96, use_past=True)
    return out


def test_manifest_describes_every_graph(tiny, tiny_export):
    manifest = json.loads((tiny_export / "manifest.json").read_text())
    assert set(manifest["graphs"]) == {"full", "inc", "image_encoder", "embedding"}
    assert manifest["graphs"]["full"]["file"] == "mindir_full_checkpoint_bs_2_96/rank_0_graph.mindir"
    assert manifest["graphs"]["inc"]["file"] == "mindir_inc_checkpoint_bs_2_96/rank_0_graph.mindir"
    assert manifest["graphs"]["full"]["inputs"][0] == {"name": "inputs_embeds", "dtype": "float32",
                                                       "shape": [2, 96, tiny[0].config.llm_config.hidden_size]}
    assert manifest["kv_cache"]["shape"] == list(tiny[0].llm.cache_shape(2, 96))
    assert manifest["special_ids"]["eos"] == tiny[0].config.llm_config.eos_token_id
    assert (tiny_export / manifest["tokenizer"]).is_file()


def test_exported_graphs_give_the_eager_tokens(tiny, tiny_export):
    from visual_mllm.export.runtime import ExportedModel

    model, processor = tiny
    exported = ExportedModel(str(tiny_export))
    rows, pixels = prepared(exported.load_processor(), REQUESTS)
    assert [r.ids for r in rows] == [r.ids for r in prepared(processor, REQUESTS)[0]]
    eager = [model.generate_ids([r], greedy(model), pixels[i:i + 1])[0] for i, r in enumerate(rows)]
    single = [exported.generate_ids([r], greedy(model), pixels[i:i + 1])[0] for i, r in enumerate(rows)]
    assert single == eager
    # a full batch of 2 rows of different lengths, and a partial last batch (1 row padded to 2)
    assert exported.generate_ids(rows[:2], greedy(model), pixels[:2]) == eager[:2]
    np.testing.assert_allclose(exported.encode_images(pixels), model.encode_images(pixels), atol=1e-5)


def test_full_graph_only_gives_the_same_tokens(tiny, tmp_path):
    from visual_mllm.export.runtime import ExportedModel

    model, processor = tiny
    export(model, processor, TINY_YAML, tmp_path / "full_only", batch_size=1, seq_length=64, use_past=False)
    exported = ExportedModel(str(tmp_path / "full_only"))
    assert exported.inc is None and not (tmp_path / "full_only" / "mindir_inc_checkpoint_bs_1_64").exists()
    rows, pixels = prepared(processor, REQUESTS[:1])
    assert exported.generate_ids(rows, greedy(model), pixels) == model.generate_ids(rows, greedy(model), pixels)


def test_shapes_that_were_not_exported_are_refused(tiny, tiny_export):
    from visual_mllm.export.runtime import ExportedModel, ExportMismatchError
    from visual_mllm.generation.generator import ContextOverflowError, PromptRow

    model, processor = tiny
    exported = ExportedModel(str(tiny_export))
    rows, pixels = prepared(processor, REQUESTS)
    vit = model.config.image_encoder_config.vit_config
    with pytest.raises(ExportMismatchError, match="exported for batch_size 2"):
        exported.generate_ids(rows, greedy(model), pixels)
    long_row = PromptRow(rows[1].ids[:-2] * 8 + rows[1].ids[-2:])
    with pytest.raises(ContextOverflowError, match="seq_length 96"):
        exported.generate_ids([long_row], greedy(model))
    exported_shape = [2, vit.in_channels, vit.image_size, vit.image_size]
    with pytest.raises(ExportMismatchError, match=re.escape(f"exported for {exported_shape}")):
        exported.run("image_encoder", np.zeros((2, vit.in_channels, vit.image_size // 2, vit.image_size // 2),
                                               np.float32))


def test_damaged_exports_are_refused(tiny_export, tmp_path):
    from visual_mllm.export.runtime import ExportedModel, ExportMismatchError

    copy = tmp_path / "copy"
    shutil.copytree(tiny_export, copy)
    graph = copy / "mindir_inc_checkpoint_bs_2_96" / "rank_0_graph.mindir"
    size = graph.stat().st_size
    graph.write_bytes(b"\0" * size)  # same size, not a MindIR any more
    with pytest.raises(ExportMismatchError, match="cannot load MindIR file"):
        ExportedModel(str(copy))
    graph.write_bytes(b"\0" * (size - 1))
    with pytest.raises(ExportMismatchError, match="do not belong together"):
        ExportedModel(str(copy))
    graph.unlink()
    with pytest.raises(ExportMismatchError, match="is missing"):
        ExportedModel(str(copy))
    (copy / "manifest.json").unlink()
    with pytest.raises(ExportMismatchError, match="no manifest.json"):
        ExportedModel(str(copy))


def test_weights_past_the_mindir_limit_go_to_external_files(tiny, tiny_export, tmp_path, monkeypatch):
    """Past 1 GiB of weights (MindSpore's TOTAL_SAVE, in KiB) ms.export writes them beside the graph, as a
    real-size model's graphs are written. The limit set to 0 sends the tiny model's graphs that way: the
    manifest lists the weight files, the export answers as the one-file export does, a missing one is named."""
    import mindspore.train.serialization as serialization
    from visual_mllm.export.runtime import ExportedModel, ExportMismatchError

    model, processor = tiny
    monkeypatch.setattr(serialization, "TOTAL_SAVE", 0)
    out = tmp_path / "external"
    export(model, processor, TINY_YAML, out, batch_size=2, seq_length=96, use_past=True)
    manifest = json.loads((out / "manifest.json").read_text())
    for graph in manifest["graphs"].values():
        folder = os.path.dirname(graph["file"])
        assert graph["file"] == os.path.join(folder, "rank_0_graph.mindir")
        assert [data["file"] for data in graph["external_data"]] == [os.path.join(folder, "rank_0_variables", "data_0")]
        assert graph["external_data"][0]["bytes"] > graph["bytes"]  # the weights are out of the graph file
    one_file = json.loads((tiny_export / "manifest.json").read_text())
    assert all(graph["external_data"] == [] for graph in one_file["graphs"].values())
    rows, pixels = prepared(processor, REQUESTS[:2])
    expected = ExportedModel(str(tiny_export)).generate_ids(rows, greedy(model), pixels)
    assert ExportedModel(str(out)).generate_ids(rows, greedy(model), pixels) == expected
    (out / manifest["graphs"]["full"]["external_data"][0]["file"]).unlink()
    with pytest.raises(ExportMismatchError, match="full external weights .*data_0 is missing"):
        ExportedModel(str(out))


CFG_CASES = {
    "good": ("[ascend_context]\nplugin_custom_ops=All\nprovider=ge\n[ge_session_options]\nge.exec.formatMode=1\n", None),
    "no_equals": ("[ascend_context]\nprovider ge\n", "line 2"),
    "unknown_section": ("[ascend_context]\nprovider=ge\n[ge_options]\na=1\n", "line 3"),
    "before_section": ("provider=ge\n[ascend_context]\n", "line 1"),
    "twice": ("[ascend_context]\nprovider=ge\nprovider=acl\n", "line 3"),
    "no_ascend": ("[ge_session_options]\nge.exec.formatMode=1\n", "no \\[ascend_context\\]"),
}


@pytest.mark.parametrize("case", sorted(CFG_CASES))
def test_context_cfg(case, tmp_path):
    from visual_mllm.export.context_cfg import ContextConfigError, parse_context_cfg

    text, error = CFG_CASES[case]
    path = tmp_path / "context.cfg"
    path.write_text(text)
    if error is None:
        assert parse_context_cfg(str(path))["ascend_context"]["provider"] == "ge"
    else:
        with pytest.raises(ContextConfigError, match=error):
            parse_context_cfg(str(path))


def test_shipped_context_cfg_parses():
    from visual_mllm.export.context_cfg import parse_context_cfg

    sections = parse_context_cfg(os.path.join(REPO_ROOT, "configs", "context.cfg"))
    assert sections["ge_session_options"]["ge.exec.precision_mode"] == "must_keep_origin_dtype"


# ----- against the reference fixture --------------------------------------------------------------

@pytest.fixture(scope="module")
def reference():
    return load_json("visualglm", "reference.json")


def reference_rows(reference, processor, model):
    from visual_mllm.generation.generator import PromptRow

    vit = model.config.image_encoder_config.vit_config
    blank = np.zeros((vit.in_channels, vit.image_size, vit.image_size), np.float32)  # text-only rows
    rows, pixels = [], []
    for sample in reference["samples"]:
        image = str(fixture_path("visualglm", sample["image"])) if sample["image"] else None
        item = processor(sample["query"], image=image, history=sample["history"], english=sample["english"])
        assert item["input_ids"] == sample["input_ids"], sample["name"]
        rows.append(PromptRow(item["input_ids"], item["image_start"]))
        pixels.append(None if image is None else item["pixel_values"][0])
    return rows, np.stack([blank if p is None else p for p in pixels])


@pytest.mark.parametrize("batch_size,use_past", [(1, True), (1, False), (2, True)])
def test_exported_reference_model_gives_the_reference_tokens(converted_visualglm, reference, tmp_path,
                                                             batch_size, use_past):
    import visual_mllm
    from visual_mllm.export.runtime import ExportedModel
    from visual_mllm.generation.sampling import GenerationConfig

    yaml_path = str(next(converted_visualglm.glob("*.yaml")))
    model, processor = visual_mllm.load_from_yaml(yaml_path)
    longest = max(len(s["input_ids"]) for s in reference["samples"])
    seq_length = longest + reference["n_new_tokens"]
    export(model, processor, yaml_path, tmp_path / "x", batch_size, seq_length, use_past)
    exported = ExportedModel(str(tmp_path / "x"))
    rows, pixels = reference_rows(reference, exported.load_processor(), model)
    config = GenerationConfig(max_new_tokens=reference["n_new_tokens"],
                              eos_token_id=model.config.llm_config.eos_token_id)
    # consecutive rows (of different lengths) together; a last partial batch is padded to the batch size
    outputs = []
    for start in range(0, len(rows), batch_size):
        outputs += exported.generate_ids(rows[start:start + batch_size], config, pixels[start:start + batch_size])
    assert outputs == [s["generated_ids"] for s in reference["samples"]]
    arrays = np.load(fixture_path("visualglm", "reference.npz"))
    for k, sample in enumerate(reference["samples"]):
        if sample["image"]:
            np.testing.assert_allclose(exported.encode_images(pixels[k:k + 1])[0],
                                       arrays[f"{npz_prefix(sample, arrays)}_image_embeds"], atol=1e-4)
            np.testing.assert_allclose(exported.encode_images(pixels[k:k + 1]), model.encode_images(pixels[k:k + 1]),
                                       atol=1e-5)


# ----- the command lines, as a user runs them ------------------------------------------------------

def run_script(script, cwd, *args):
    """The finished process; stdout/stderr decoded as UTF-8 without newline translation (model text may
    hold \\r or any other character)."""
    import subprocess
    import sys

    env = dict(os.environ, LOCAL_DEFAULT_PATH=str(cwd / "output"))
    result = subprocess.run([sys.executable, os.path.join(REPO_ROOT, script), *args], cwd=cwd, env=env,
                            capture_output=True, timeout=900, stdin=subprocess.DEVNULL)
    result.stdout = result.stdout.decode("utf-8", errors="replace")
    result.stderr = result.stderr.decode("utf-8", errors="replace")
    return result


def read_jsonl(path):
    """One record per line; split at \\n only (str.splitlines() would also split at characters that
    model text may hold)."""
    return [json.loads(line) for line in Path(path).read_bytes().decode("utf-8").split("\n") if line.strip()]


@pytest.fixture(scope="module")
def lite_workdir(converted_visualglm, reference, tmp_path_factory):
    """Exports the converted fixture with export_lite_model.py; writes samples.jsonl beside the fixture's
    image folder(s), so that the samples' relative image paths resolve from the JSONL file's folder."""
    folder = tmp_path_factory.mktemp("lite_cli")
    lines = []
    for s in reference["samples"]:
        fields = {"prompt": s["query"], "history": s["history"], "english": s["english"]}
        if s["image"]:
            top = Path(s["image"]).parts[0]  # e.g. images/
            if not (folder / top).exists():
                os.symlink(fixture_path("visualglm", top), folder / top)
            fields["image"] = s["image"]
        lines.append(json.dumps(fields, ensure_ascii=False))
    (folder / "samples.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    seq_length = max(len(s["input_ids"]) for s in reference["samples"]) + reference["n_new_tokens"]
    config = str(next(converted_visualglm.glob("*.yaml")))
    result = run_script("export_lite_model.py", folder, "--mode", "export", "--config", config, "--use_past", "True",
                        "--seq_length", str(seq_length), "--batch_size", "2", "--output_dir", "lite")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[1/5]" in result.stdout  # progress is shown
    return folder, seq_length


@pytest.mark.parametrize("locate", ["export_dir", "graph_paths"])
def test_lite_mode_cli_gives_the_reference_ids(lite_workdir, reference, locate):
    folder, seq_length = lite_workdir
    where = ["--export_dir", "lite"] if locate == "export_dir" else [
        "--full_model_path", f"lite/mindir_full_checkpoint_bs_2_{seq_length}/rank_0_graph.mindir",
        "--inc_model_path", f"lite/mindir_inc_checkpoint_bs_2_{seq_length}/rank_0_graph.mindir",
        "--ge_config", os.path.join(REPO_ROOT, "configs", "context.cfg")]
    result = run_script("run_infer.py", folder, "--mode", "lite", *where, "--input_file", "samples.jsonl",
                        "--output_file", f"{locate}.jsonl", "--batch_size", "2", "--do_sample", "False",
                        "--max_new_tokens", str(reference["n_new_tokens"]))
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_jsonl(folder / f"{locate}.jsonl")
    assert [r["generated_ids"] for r in records] == [s["generated_ids"] for s in reference["samples"]]
    assert [r["response"] for r in records] == [s["response"] for s in reference["samples"]]


SEQ_LENGTH_OFF = "exported seq_length + 1"  # placeholder: a length the graphs were not exported for


@pytest.mark.parametrize("flags,words", [
    (["--batch_size", "3"], "larger than the graphs take"),
    (["--seq_length", SEQ_LENGTH_OFF], "does not match the graphs"),
    (["--lora_checkpoint", "x.ckpt"], "export with export_lite_model.py --lora_checkpoint"),
    (["--ge_config", "bad.cfg"], "bad.cfg line 2"),
])
def test_lite_mode_cli_errors(lite_workdir, flags, words):
    folder, seq_length = lite_workdir
    flags = [str(seq_length + 1) if flag == SEQ_LENGTH_OFF else flag for flag in flags]
    (folder / "bad.cfg").write_text("[ascend_context]\nprovider\n")
    result = run_script("run_infer.py", folder, "--mode", "lite", "--export_dir", "lite", *flags)
    assert result.returncode == 2, result.stdout
    assert words in result.stderr and "Traceback" not in result.stderr
