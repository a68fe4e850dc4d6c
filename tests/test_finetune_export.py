"""The finetuned demo through the exported graphs: the tiny VisualGLM with the packaged demo LoRA, exported by
`export_lite_model.py --lora_checkpoint` (LoRA merged before export), answers every training row of
examples/finetune with its label under greedy decoding through `ExportedModel` - the same check
(`finetune.evaluate.evaluate_labels`) as eager with the LoRA checkpoint and after merging
(test_finetune_run.py) - and `run_infer.py --mode lite` prints a label too."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "visualglm_tiny", "run_visualglm_tiny.yaml")
EXAMPLES = os.path.join(REPO, "examples", "finetune", "dataset.json")
BATCH = 4  # full batches of 4 rows, and a padded last one unless the row count is a multiple of 4


def run(script, args, cwd):
    """The finished process; stdout/stderr decoded as UTF-8 without newline translation (model text may
    hold \\r or any other character)."""
    env = dict(os.environ, LOCAL_DEFAULT_PATH=os.path.join(str(cwd), "log"))
    result = subprocess.run([sys.executable, os.path.join(REPO, script)] + [str(a) for a in args], cwd=cwd,
                            env=env, capture_output=True, timeout=900, stdin=subprocess.DEVNULL)
    result.stdout = result.stdout.decode("utf-8", errors="replace")
    result.stderr = result.stderr.decode("utf-8", errors="replace")
    return result


def training_records():
    """The rows of examples/finetune/dataset.json as the finetune package reads them (image paths resolved)."""
    from visual_mllm.finetune.evaluate import records_of

    return records_of(EXAMPLES)


@pytest.fixture(scope="module")
def exported_demo(tmp_path_factory):
    from visual_mllm.finetune.demo import demo_lora_checkpoint

    lora = demo_lora_checkpoint()  # the packaged file (or a build of it, once, if it is missing)
    work = tmp_path_factory.mktemp("finetune_export")
    out = work / "export"
    result = run("export_lite_model.py", ["--config", TINY, "--lora_checkpoint", lora, "--seq_length", 128,
                                          "--batch_size", BATCH, "--output_dir", out], work)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_exported_graphs_reproduce_every_training_label(exported_demo):
    import mindspore as ms

    from visual_mllm.export.runtime import ExportedModel
    from visual_mllm.finetune.evaluate import describe, evaluate_labels

    ms.set_context(mode=ms.GRAPH_MODE)
    manifest = json.loads((exported_demo / "manifest.json").read_text())
    assert set(manifest["graphs"]) == {"full", "inc", "image_encoder", "embedding"}
    exported = ExportedModel(str(exported_demo))
    assert exported.batch_size == BATCH and exported.inc is not None
    processor = exported.load_processor()  # the tokenizer copied into the export folder
    checks = evaluate_labels(exported, processor, EXAMPLES, batch_size=BATCH)
    assert len(checks) == len(training_records()) and any(c.record.image is None for c in checks)  # text-only too
    assert all(c.matches for c in checks), describe(checks)
    # and re-running the full graph for every token (no KV cache) gives the same answers
    exported.check_request(use_past=False)
    again = evaluate_labels(exported, processor, [c.record for c in checks[:BATCH]], batch_size=BATCH)
    assert [c.answer for c in again] == [c.answer for c in checks[:BATCH]]


def test_run_infer_lite_mode_answers_with_the_label(exported_demo, tmp_path):
    record = next((r for r in training_records() if r.image is not None), None)  # a row with an image
    if record is None:
        pytest.skip(f"{EXAMPLES} has no row with an image")
    result = run("run_infer.py", ["--mode", "lite", "--export_dir", exported_demo, "--image_path", record.image,
                                  "--prompt", record.prompt, "--stream", "False"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert record.label in result.stdout
