"""run_infer.py --lora_checkpoint: the LoRA weights (written by the finetune package) are loaded onto the
model, so the CLI answers as the LoRA model does in-process, and not as the base model."""
import json
import os
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest

from conftest import REPO_ROOT, fixture_path, load_json

lora = pytest.importorskip("visual_mllm.finetune.lora")

DEMO_CONFIG = os.path.join(REPO_ROOT, "configs", "visualglm_tiny", "run_visualglm_tiny.yaml")
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def lora_case(tmp_path_factory):
    """(request fields, checkpoint path, base model's ids, LoRA model's ids), ids computed in-process."""
    from visual_mllm import load_from_yaml
    from visual_mllm.generation.sampling import GenerationConfig
    from visual_mllm.inference import answer
    from visual_mllm.request_file import request_from_fields

    ms.set_context(mode=ms.GRAPH_MODE)
    sample = next((s for s in load_json("visualglm", "reference.json")["samples"] if s["image"]), None)
    if sample is None:
        pytest.skip("the VisualGLM fixture has no sample with an image")
    fields = {"image": str(fixture_path("visualglm", sample["image"])), "prompt": sample["query"]}
    ids = {}
    for name in ("base", "lora"):
        model, processor = load_from_yaml(DEMO_CONFIG)  # the same seeded random weights each time
        if name == "lora":
            lora.apply_lora(model, lora.LoraSettings(rank=4))
            rng = np.random.default_rng(0)
            for param in model.get_parameters():
                if param.name.endswith(lora.LORA_PARAMS):  # B starts at 0: give the LoRA an effect
                    param.set_data(ms.Tensor(rng.normal(0, 0.5, param.shape).astype(np.float32)))
            path = str(tmp_path_factory.mktemp("lora") / "lora.ckpt")
            lora.save_lora_checkpoint(model, path)
        config = GenerationConfig(max_new_tokens=NEW_TOKENS, eos_token_id=model.config.llm_config.eos_token_id)
        ids[name] = answer(model, processor, [request_from_fields(fields)], config)[0].generated_ids
    return fields, path, ids["base"], ids["lora"]


def test_lora_checkpoint_is_applied(lora_case, tmp_path):
    fields, path, base_ids, lora_ids = lora_case
    assert base_ids != lora_ids, "the LoRA weights should change the answer"
    (tmp_path / "in.jsonl").write_text(json.dumps(fields, ensure_ascii=False) + "\n", encoding="utf-8")
    env = dict(os.environ, LOCAL_DEFAULT_PATH=str(tmp_path / "output"))
    result = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "run_infer.py"), "--lora_checkpoint", path,
                             "--input_file", "in.jsonl", "--output_file", "out.jsonl", "--do_sample", "False",
                             "--max_new_tokens", str(NEW_TOKENS)],
                            cwd=tmp_path, env=env, capture_output=True, timeout=600, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr.decode("utf-8", errors="replace")[-3000:]
    # the first record, split at \n only: the answer text may hold any other line-break character
    first_line = (tmp_path / "out.jsonl").read_bytes().decode("utf-8").split("\n")[0]
    assert json.loads(first_line)["generated_ids"] == lora_ids
