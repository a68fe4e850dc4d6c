"""The learned demo model: the tiny VisualGLM LoRA-finetuned on examples/finetune.

The tiny model's base weights are random from a fixed seed (configs/visualglm_tiny/run_visualglm_tiny.yaml);
`configs/visualglm_tiny/lora.yaml` finetunes LoRA layers (and the image projection) on the few-shot set in
examples/finetune/ - real example images with question/answer labels - until greedy decoding answers
every training question with its label. The result is one small file (~150 KB):

* shipped in the package as ``visual_mllm/assets/demo/visualglm_tiny_lora.ckpt`` (`PACKAGED_DEMO_LORA`);
* rebuilt with ``python examples/finetune/build_demo_model.py --install`` (about a minute on 2 CPU cores),
  which trains, checks every label and then replaces the packaged file;
* `demo_lora_checkpoint()` returns the packaged file, or - if it is missing - builds one once into a
  cache folder (``$VISUAL_MLLM_CACHE`` or ``~/.cache/visual_mllm``) and returns that.

The demo is then the tiny YAML + this LoRA checkpoint (`load_lora_checkpoint`): the first run_infer.py
command answers the example images with their labels instead of printing random tokens.
"""
import functools
import os
import shutil
import sys

from ..atomic import write_atomic
from ..paths import (ASSETS_DIR, DEFAULT_CONFIG as BASE_CONFIG, DEMO_LORA_CONFIG as DEMO_CONFIG, REPO_ROOT,
                     cache_dir)

PACKAGED_DEMO_LORA = os.path.join(ASSETS_DIR, "demo", "visualglm_tiny_lora.ckpt")
DEMO_DATASET = os.path.join(REPO_ROOT, "examples", "finetune", "dataset.json")


def build_demo_model(output_dir, install=False, quiet=False, progress=None):
    """Finetune the tiny model on examples/finetune into output_dir, check every label, optionally install.

    Returns (lora checkpoint path, list of LabelCheck). Raises RuntimeError if a label is not reproduced.
    """
    import mindspore as ms

    from .. import load_from_yaml
    from .evaluate import describe, evaluate_labels
    from .lora import load_lora_checkpoint
    from .trainer import RunOptions, finetune

    ms.set_context(mode=ms.GRAPH_MODE)
    result = finetune(RunOptions(config=DEMO_CONFIG, output_dir=output_dir, quiet=quiet, progress=progress))
    model, processor = load_from_yaml(BASE_CONFIG)
    load_lora_checkpoint(model, result.lora_checkpoint)
    checks = evaluate_labels(model, processor, DEMO_DATASET)
    if not quiet:
        print(describe(checks), flush=True)
    if not all(c.matches for c in checks):
        raise RuntimeError("the demo model does not reproduce every label:\n" + describe(checks))
    if install:
        os.makedirs(os.path.dirname(PACKAGED_DEMO_LORA), exist_ok=True)
        write_atomic(PACKAGED_DEMO_LORA, functools.partial(shutil.copyfile, result.lora_checkpoint))
        if not quiet:
            print(f"installed {PACKAGED_DEMO_LORA}", flush=True)
    return result.lora_checkpoint, checks


def demo_lora_checkpoint(rebuild_if_missing=True):
    """The demo LoRA checkpoint: the packaged one, else a cached build (built now if needed), else None."""
    if os.path.isfile(PACKAGED_DEMO_LORA):
        return PACKAGED_DEMO_LORA
    cached = os.path.join(cache_dir(), "demo", "lora.ckpt")
    if os.path.isfile(cached):
        return cached
    if not rebuild_if_missing or not os.path.isfile(DEMO_CONFIG):
        return None
    print("building the demo model (tiny VisualGLM finetuned on examples/finetune; about a minute) ...",
          file=sys.stderr, flush=True)
    path, _ = build_demo_model(os.path.join(cache_dir(), "demo", "run"), quiet=True, progress=False)
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    return write_atomic(cached, functools.partial(shutil.copyfile, path))


__all__ = ["build_demo_model", "demo_lora_checkpoint", "PACKAGED_DEMO_LORA", "DEMO_CONFIG", "DEMO_DATASET"]
