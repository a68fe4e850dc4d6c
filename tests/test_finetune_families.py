"""Finetuning MiniGPT-4 and MiniGPT4Qwen: each family's training rows (its chat prompt, then its reference
target), the README command training the tiny LoRA config (the loss falls, the LoRA checkpoint makes
run_infer.py answer with the training labels; CogVLM too, its rows: test_cogvlm.py), a malformed row refused by name, and the real-size configs
(sizes of the released checkpoints, LoRA targets that exist)."""
import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from mindformers.models.build_config import build_model_config

import visual_mllm
from conftest import fixture_path
from visual_mllm import families
from visual_mllm.finetune.config import load_finetune_config
from visual_mllm.finetune.datasets import IGNORE_INDEX, BatchSource, load_dataset, read_records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = ["minigpt4", "minigpt4qwen"]


def tiny_yaml(family):
    return os.path.join(REPO, "configs", f"{family}_tiny", f"run_{family}_tiny.yaml")


def lora_yaml(family):
    return os.path.join(REPO, "configs", f"{family}_tiny", "lora.yaml")


def expected_target(family, processor, label):
    """The family's reference training target of an answer (see processing/<family>_prompt.py)."""
    tok = processor.tokenizer
    if family == "minigpt4":  # MiniGPT-4 stage 2: tokenizer(answer + end_sym "###", no BOS)
        return tok(label + "###", add_special_tokens=False)["input_ids"]
    return tok(label)["input_ids"] + [tok.im_end_id]  # MiniGPT4Qwen: ChatML answer + <|im_end|>


@pytest.mark.parametrize("family", FAMILIES)
def test_training_rows_are_the_chat_prompt_then_the_reference_target(family):
    run_config, cfg = load_finetune_config(lora_yaml(family))
    processor = visual_mllm.load_processor_from_yaml(tiny_yaml(family))
    builder = processor.prompt_builder
    data = load_dataset(cfg.dataset, processor)
    assert data.format == {"minigpt4": "cc_sbu_align", "minigpt4qwen": "conversations"}[family]
    assert not data.warnings
    for sample in data.samples:
        record = sample.record
        prompt = builder.build_ids(record.prompt, record.history, has_image=record.image is not None)
        n = len(prompt.input_ids)
        assert sample.input_ids[:n] == prompt.input_ids            # the prompt exactly as inference builds it
        assert sample.input_ids[n:] == expected_target(family, processor, record.label)
        assert sample.labels == [IGNORE_INDEX] * n + sample.input_ids[n:]   # trained on the target only
        assert sample.image_start == prompt.image_start
    # cc_sbu_align rows take MiniGPT-4's stage-2 instructions by row index; conversations give one row per answer
    records = [s.record for s in data.samples]
    if family == "minigpt4":
        assert [r.prompt for r in records][:2] == ["Describe this image in detail.",
                                                   "Take a look at this image and describe what you notice."]
    else:
        assert records[1].history == [("What animal is in the picture?", "A tabby cat.")]
    # truncate: true cuts the end of the target (as the references' tokenizer / row truncation does)
    first = data.samples[0]
    cut = builder.training_sample(first.record.prompt, first.record.label, first.record.history,
                                  has_image=True, max_source_length=200, max_target_length=5)
    assert cut.target_length == 5 and cut.input_ids == first.input_ids[:cut.source_length + 5]

    # batches: causal positions and no bidirectional prefix, from the model class's position scheme
    llm_config = build_model_config(run_config.model.model_config).llm_config
    positions = families.get(family).model_class.position_scheme(llm_config)
    source = BatchSource(data, processor, positions, cfg.dataset, batch_size=2, seed=0)
    batch = source.batch(0)
    chosen = [data.samples[i] for i in source.indices(0)]
    for k, sample in enumerate(chosen):
        length = len(sample.input_ids)
        assert batch["valid_length"][k] == length and batch["prefix_length"][k] == 0
        assert list(batch["position_ids"][k, 0, :length]) == list(range(length))
        assert (batch["input_ids"][k, length:] == builder.pad_id).all()
        assert (batch["labels"][k, length:] == IGNORE_INDEX).all()


def run(script, args, cwd):
    env = dict(os.environ, LOCAL_DEFAULT_PATH=os.path.join(cwd, "log"))
    return subprocess.run([sys.executable, os.path.join(REPO, script)] + args, cwd=cwd, env=env,
                          capture_output=True, timeout=900, stdin=subprocess.DEVNULL)


def text(stream):
    return stream.decode("utf-8", errors="replace")


@pytest.mark.parametrize("family", FAMILIES + ["cogvlm"])  # CogVLM: LoRA on both experts of every layer
def test_readme_command_trains_the_tiny_config_and_run_infer_answers_with_the_labels(family, tmp_path):
    out = tmp_path / "out"
    trained = run("run_finetune.py", ["--config", f"configs/{family}_tiny/lora.yaml", "--output_dir", str(out),
                                      "--progress", "False"], REPO)
    assert trained.returncode == 0, text(trained.stderr)[-3000:]
    with open(out / "train_log.csv", encoding="utf-8") as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f)]
    assert len(losses) == 80 and losses[-1] < 0.05 < 5.0 < losses[0]   # the loss falls
    lora = str(out / "lora.ckpt")

    _, cfg = load_finetune_config(lora_yaml(family))
    records = read_records(cfg.dataset)[2]
    # two rows without history (what run_infer.py --prompt sends): one with its image, and the last row
    chosen = [r for r in records if not r.history][::-1][:2]
    args = ["--config", tiny_yaml(family), "--lora_checkpoint", lora, "--do_sample", "False",
            "--max_new_tokens", "48"]
    for record in chosen:
        args += ["--image_path", record.image or "none", "--prompt", record.prompt]
    infer = run("run_infer.py", args, str(tmp_path))
    assert infer.returncode == 0, text(infer.stderr)[-3000:]
    answers = [line[len("answer: "):] for line in text(infer.stdout).splitlines() if line.startswith("answer: ")]
    assert answers == [r.label for r in chosen], text(infer.stdout)

    from visual_mllm.finetune.evaluate import evaluate_labels

    model, processor = visual_mllm.load_from_yaml(tiny_yaml(family))  # the base model answers otherwise
    assert not any(check.matches for check in evaluate_labels(model, processor, chosen, max_new_tokens=48))


def bad_dataset(family, folder):
    """A copy of the family's example dataset with one malformed row: (path to pass, the row's index, the
    reason, the JSON file the message names, the number of rows)."""
    examples = os.path.join(REPO, "examples", "finetune")
    if family == "minigpt4":
        root = folder / "cc_sbu_align"
        shutil.copytree(os.path.join(examples, "cc_sbu_align"), root)
        data = json.loads((root / "filter_cap.json").read_text(encoding="utf-8"))
        data["annotations"][2] = {"image_id": "3"}  # no caption
        (root / "filter_cap.json").write_text(json.dumps(data), encoding="utf-8")
        return str(root), 2, "missing field 'caption'", str(root / "filter_cap.json"), 4
    rows = json.loads(open(os.path.join(examples, "conversations.json"), encoding="utf-8").read())
    for row in rows:
        if row.get("image"):
            row["image"] = os.path.normpath(os.path.join(examples, row["image"]))
    rows[1]["conversations"] = []
    path = folder / "conversations.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    return str(path), 1, "missing or empty 'conversations' list", str(path), 5


@pytest.mark.parametrize("family", FAMILIES)
def test_a_malformed_row_is_refused_naming_it(family, tmp_path):
    dataset, row, reason, json_path, total = bad_dataset(family, tmp_path)
    out = tmp_path / "out"
    result = run("run_finetune.py", ["--config", lora_yaml(family), "--dataset", dataset, "--output_dir", str(out),
                                     "--progress", "False"], str(tmp_path))
    assert result.returncode == 2, text(result.stderr)[-3000:]
    errors = [line for line in text(result.stderr).splitlines() if line.startswith("error:")]
    assert errors == [f"error: {json_path}: row {row}: {reason} (1 bad row of {total}; nothing was trained)"], \
        text(result.stderr)[-3000:]
    assert not os.path.exists(out / "lora.ckpt") and not os.path.exists(out / "train_log.csv")


REAL_SIZES = {  # folder: (family, LLM hidden size, layers, fixture shape table of its LLM or None)
    "minigpt4_vicuna_7b": ("minigpt4", 4096, 32, ("minigpt4", "shapes", "vicuna7b_full_shapes.tsv")),
    "minigpt4_vicuna_13b": ("minigpt4", 5120, 40, None),
    "minigpt4qwen_7b": ("minigpt4qwen", 4096, 32, ("minigpt4qwen", "shapes", "qwen7b_chat_full_shapes.tsv")),
    "minigpt4qwen_14b": ("minigpt4qwen", 5120, 40, None),
}


def table_numel(parts):
    """Parameters of a full-size shape table (rotary inv_freq buffers are no parameters)."""
    with open(fixture_path(*parts), encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f][1:]
    return sum(int(np.prod(json.loads(shape))) for key, shape, *_ in rows if not key.endswith("inv_freq"))


@pytest.mark.parametrize("folder", sorted(REAL_SIZES))
def test_real_size_configs_have_the_released_sizes_and_their_lora_targets(folder):
    from mindspore.nn.utils import no_init_parameters

    from visual_mllm.finetune.lora import find_targets

    family, hidden, layers, table = REAL_SIZES[folder]
    run_config, cfg = load_finetune_config(os.path.join(REPO, "configs", folder, "lora.yaml"))
    config = build_model_config(run_config.model.model_config)
    assert families.family_of(config).name == family
    assert config.checkpoint_files() == []  # checkpoint keys null: the user sets what convert_weight.py wrote
    llm = config.llm_config
    assert (llm.hidden_size, llm.num_layers, config.image_encoder_config.projection_size) == (hidden, layers, hidden)
    assert cfg.dataset.max_length <= llm.max_position_embeddings
    with no_init_parameters():  # shapes only: no weights are allocated
        model = families.get(family).model_class(config)
    llm_numel = sum(int(np.prod(p.shape)) for p in model.get_parameters() if p.name.startswith("llm."))
    if table is not None:
        assert llm_numel == table_numel(table)
    targets = find_targets(model, cfg.lora)
    assert len(targets) == layers * len(cfg.lora.target_modules)
    assert cfg.trainable == ["image_encoder.projection.*"]
