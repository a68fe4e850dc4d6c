"""Exported graphs against eager graph mode, on a mid-size VisualGLM (random weights).

Rows: export time; one decode step through the MindIR runtime (the exported inc graph in a GraphCell)
and through eager graph mode (DecodeStep); the image-encoder graph against the eager towers; and the
resident memory of a whole request (image + 8 answer tokens) in eager mode and in lite mode, each
measured in a fresh process.
"""
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import numpy as np
import yaml

from benchmarks.common import Row, Section, Settings, time_call

TITLE = "exported MindIR graphs vs eager graph mode"


@dataclass
class Sizes:
    image_size: int
    vit_hidden: int
    vit_layers: int
    llm_hidden: int
    llm_layers: int
    seq_length: int


FULL = Sizes(image_size=224, vit_hidden=384, vit_layers=6, llm_hidden=1024, llm_layers=8, seq_length=256)
QUICK = Sizes(image_size=56, vit_hidden=64, vit_layers=2, llm_hidden=128, llm_layers=2, seq_length=64)


def run_config(s):
    heads = lambda width: max(1, width // 64)  # noqa: E731
    return {
        "model": {
            "model_config": {
                "type": "VisualGLMConfig", "seq_length": s.seq_length, "use_past": True, "seed": 0,
                "image_encoder_config": {
                    "vit_config": {"image_size": s.image_size, "patch_size": 14, "hidden_size": s.vit_hidden,
                                   "num_layers": s.vit_layers, "num_heads": heads(s.vit_hidden),
                                   "intermediate_size": 4 * s.vit_hidden},
                    "qformer_config": {"num_query_tokens": 32, "hidden_size": s.vit_hidden, "num_layers": 4,
                                       "num_heads": heads(s.vit_hidden), "intermediate_size": 4 * s.vit_hidden,
                                       "encoder_hidden_size": s.vit_hidden}},
                # the tiny packaged tokenizer's ids (vocab 1144)
                "llm_config": {"vocab_size": 1144, "hidden_size": s.llm_hidden, "num_layers": s.llm_layers,
                               "num_heads": heads(s.llm_hidden), "intermediate_size": 4 * s.llm_hidden,
                               "bos_token_id": 804, "eos_token_id": 805, "pad_token_id": 3,
                               "mask_token_id": 800, "gmask_token_id": 801}},
            "arch": {"type": "VisualGLMForConditionalGeneration"}},
        "processor": {"type": "VisualGLMProcessor",
                      "image_processor": {"type": "BlipImageProcessor", "image_size": s.image_size},
                      "tokenizer": {"type": "ChatGLMTokenizer", "vocab_file": None}},
    }


MEMORY_PROBE = """
import sys
import mindspore as ms
ms.set_context(mode=ms.GRAPH_MODE)
import visual_mllm
from visual_mllm.generation.sampling import GenerationConfig
from visual_mllm.inference import ChatRequest, answer
mode, target, image = sys.argv[1:4]
if mode == "eager":
    model, processor = visual_mllm.load_from_yaml(target)
else:
    from visual_mllm.export.runtime import ExportedModel
    model = ExportedModel(target)
    processor = model.load_processor()
answer(model, processor, [ChatRequest("describe", image)], GenerationConfig(max_new_tokens=8))
# VmHWM: this process's own peak (ru_maxrss would include the parent's size at fork time)
with open("/proc/self/status", encoding="utf-8") as status:
    print("peak_mb", int(status.read().split("VmHWM:")[1].split()[0]) / 1024)
"""


def peak_memory_mb(mode, target, image, workdir):
    probe = os.path.join(workdir, "memory_probe.py")  # graph mode needs a source file
    with open(probe, "w", encoding="utf-8") as f:
        f.write(MEMORY_PROBE)
    out = subprocess.run([sys.executable, probe, mode, target, image], capture_output=True, text=True,
                         cwd=workdir, check=True).stdout
    return float(out.split("peak_mb")[-1])


def run(settings: Settings) -> Section:
    import time

    import mindspore as ms
    from mindspore import Tensor

    import visual_mllm
    from visual_mllm.export.exporter import export_model
    from visual_mllm.export.runtime import ExportedModel
    from visual_mllm.generation.steps import DecodeStep, PrefillStep

    sizes = QUICK if settings.quick else FULL
    section = Section("export_lite")
    section.config.append(
        f"- export_lite model: ViT {sizes.vit_layers}x{sizes.vit_hidden} at {sizes.image_size} px, Q-Former 4 "
        f"layers, GLM {sizes.llm_layers}x{sizes.llm_hidden}, seq_length {sizes.seq_length}, batch 1, fp32")
    image = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                         "examples", "images", "chelsea.png")
    with tempfile.TemporaryDirectory() as work:
        yaml_path = os.path.join(work, "model.yaml")
        with open(yaml_path, "w", encoding="utf-8") as f:
            yaml.safe_dump(run_config(sizes), f)
        model, processor = visual_mllm.load_from_yaml(yaml_path)
        start = time.perf_counter()
        export_model(model, run_config(sizes)["processor"], processor.tokenizer, os.path.join(work, "x"), 1,
                     sizes.seq_length, log=lambda _: None)
        export_s = time.perf_counter() - start
        exported = ExportedModel(os.path.join(work, "x"))

        llm = model.llm
        cache = llm.new_cache(1, sizes.seq_length)
        prefill, decode = PrefillStep(llm, cache), DecodeStep(llm, cache)
        prompt = sizes.seq_length // 2
        embeds = np.random.default_rng(0).normal(size=(1, sizes.seq_length, sizes.llm_hidden)).astype(np.float32)
        positions = np.zeros((1, 2, sizes.seq_length), np.int32)
        positions[0, 0] = np.arange(sizes.seq_length)
        valid, prefix = np.array([prompt], np.int32), np.array([prompt - 1], np.int32)
        prefill(Tensor(embeds), Tensor(positions), Tensor(valid), Tensor(prefix))
        exported.run("full", embeds, positions, valid, prefix)
        exported.backend.after_prefill(exported.full, exported.inc)
        token, step_pos = np.array([[5]], np.int32), np.array([[[prompt - 2], [2]]], np.int32)
        eager_t = time_call(lambda: decode(Tensor(token), Tensor(step_pos), Tensor(valid)).asnumpy(),
                            settings.reps, settings.warmup)
        mindir_t = time_call(lambda: exported.run("inc", token, step_pos, valid), settings.reps, settings.warmup)

        pixels = processor.image_processor(image)
        tower_t = time_call(lambda: model.encode_images(pixels), settings.slow_reps, settings.warmup)
        graph_t = time_call(lambda: exported.encode_images(pixels), settings.slow_reps, settings.warmup)
        diff = float(np.abs(model.encode_images(pixels) - exported.encode_images(pixels)).max())
        del exported, model
        eager_mb = peak_memory_mb("eager", yaml_path, image, work)
        lite_mb = peak_memory_mb("lite", os.path.join(work, "x"), image, work)
        graph_mb = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(os.path.join(work, "x"))
                       for f in files) / 1e6

    add = section.rows.append
    add(Row("export time, all graphs", export_s * 1e3, "ms", 1, f"full + inc + image encoder + embedding; "
                                                               f"{graph_mb:.0f} MB written"))
    add(Row.timed("decode step, eager graph mode", eager_t, "ms/token", f"DecodeStep, {sizes.seq_length}-slot cache"))
    add(Row.timed("decode step, MindIR runtime", mindir_t, "ms/token", "exported inc graph in a GraphCell"))
    add(Row("MindIR / eager decode", mindir_t.ms / eager_t.ms, "x", notes="1 = the same speed"))
    add(Row.timed("image encoding, eager towers", tower_t, "ms", "ImageEncoder cell in graph mode"))
    add(Row.timed("image encoding, exported graph", graph_t, "ms", f"max |diff| vs eager {diff:.1e}"))
    add(Row("image graph / eager towers", graph_t.ms / tower_t.ms, "x"))
    add(Row("peak RSS, eager request", eager_mb, "MB", 1, "fresh process: load YAML, 1 image, 8 tokens"))
    add(Row("peak RSS, lite-mode request", lite_mb, "MB", 1, "fresh process: load exported folder, same request"))
    add(Row("lite / eager peak RSS", lite_mb / eager_mb, "x", notes="< 1: lite mode needs less memory"))
    section.notes.append(
        "On CPU the MindIR runtime loads the full and the inc graph as two GraphCells, and each holds its own "
        "copy of the LLM weights, so lite mode needs more host memory than eager mode here. On Ascend, MindSpore "
        "Lite builds both graphs in one ModelGroup that shares weights and KV cache on the device, and the host "
        "keeps only the tokenizer and the inputs.")
    return section
