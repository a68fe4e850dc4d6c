"""Writing a model's deployment graphs: LLM prefill ("full") and one-token ("inc") graphs, the image
encoder and the embedding graph, with a manifest that describes every one of them.

Layout of the output folder (B = batch size, S = seq_length):

    manifest.json
    model.yaml                                  the run config (no checkpoint keys) + processor section
    tokenizer/<vocab file>
    mindir_full_checkpoint_bs_{B}_{S}/rank_0_graph.mindir   prefill: S-token inputs, fills the KV cache (with
                                                token_types [B,S] for decoders that take them: CogVLM)
    mindir_inc_checkpoint_bs_{B}_{S}/rank_0_graph.mindir    decode: one token per row (with --use_past)
    image_encoder_bs_{B}/rank_0_graph.mindir    the image side (ViT + ln_vision + Q-Former + projection;
                                                CogVLM: EVA2-CLIP + GLU adapter + boi/eoi)
    embedding_bs_{B}_{S}/rank_0_graph.mindir    token embedding + image splice (the only LLM weights the
                                                host needs besides the two LLM graphs)

**S is the whole context**: the prompt and the answer together must fit in S tokens. It is the length
of the prefill graph's inputs (prompts are right-padded to S) and the number of KV-cache slots.
The folder is written under a temporary name and renamed when complete.
"""
import datetime
import hashlib
import json
import os
import shutil
import tempfile

import numpy as np
import mindspore as ms
import mindformers
import yaml
from mindspore import Tensor

from .. import __version__
from ..generation.steps import DecodeStep, EmbedStep, PrefillStep
from ..layers import portable_graphs
from ..models.pretrained import CHECKPOINT_KEYS, config_to_yaml_dict

MANIFEST = "manifest.json"
RUN_CONFIG = "model.yaml"
FORMAT = "visual_mllm-export/1"
# ms.export(file_name=<folder>/rank_0) writes rank_0.mindir, or, past 1 GiB of weights (MindIR is one protobuf,
# limited to 2 GB), rank_0_graph.mindir + rank_0_variables/data_N holding the weights as external data (the
# graph names them relative to its folder: the older MindFormers port's layout). Both end up as GRAPH_FILE.
GRAPH_PREFIX = "rank_0"
GRAPH_FILE = "rank_0_graph.mindir"


def graph_dirs(batch_size, seq_length):
    return {"full": f"mindir_full_checkpoint_bs_{batch_size}_{seq_length}",
            "inc": f"mindir_inc_checkpoint_bs_{batch_size}_{seq_length}",
            "image_encoder": f"image_encoder_bs_{batch_size}",
            "embedding": f"embedding_bs_{batch_size}_{seq_length}"}


def _spec(name, array):
    return {"name": name, "dtype": str(array.dtype), "shape": list(array.shape)}


def graph_inputs(model, batch_size, seq_length):
    """{graph: [(name, zero numpy array of the exported shape)]} - the contract of every graph."""
    cfg = model.config
    hidden = cfg.llm_config.hidden_size
    rows = model.llm.positions.rows
    vit = cfg.image_encoder_config.vit_config
    b, s, q = batch_size, seq_length, model.num_image_tokens
    ints = lambda *shape: np.zeros(shape, np.int32)  # noqa: E731
    types = [("token_types", ints(b, s))] if model.llm.takes_token_types else []
    return {
        "full": [("inputs_embeds", np.zeros((b, s, hidden), np.float32)), ("position_ids", ints(b, rows, s)),
                 ("valid_length", ints(b)), ("prefix_length", ints(b))] + types,
        "inc": [("input_ids", ints(b, 1)), ("position_ids", ints(b, rows, 1)), ("valid_length", ints(b))],
        "image_encoder": [("pixel_values", np.zeros((b, vit.in_channels, vit.image_size, vit.image_size), np.float32))],
        "embedding": [("input_ids", ints(b, s)), ("image_embeds", np.zeros((b, q, hidden), np.float32)),
                      ("image_start", ints(b))],
    }


def graph_outputs(model, batch_size, seq_length):
    cfg = model.config
    hidden, vocab = cfg.llm_config.hidden_size, cfg.llm_config.vocab_size
    return {"full": [{"name": "logits", "dtype": "float32", "shape": [batch_size, vocab]}],
            "inc": [{"name": "logits", "dtype": "float32", "shape": [batch_size, vocab]}],
            "image_encoder": [{"name": "image_embeds", "dtype": "float32",
                               "shape": [batch_size, model.num_image_tokens, hidden]}],
            "embedding": [{"name": "inputs_embeds", "dtype": "float32", "shape": [batch_size, seq_length, hidden]}]}


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_entry(root, path):
    return {"file": os.path.relpath(path, root), "bytes": os.path.getsize(path), "sha256": _sha256(path)}


def _export_graph(cell, arrays, root, folder):
    """Export `cell` for `arrays` into root/folder as GRAPH_FILE; returns its manifest entry (file, bytes, sha256
    and `external_data`: the weight files MindSpore wrote beside a graph past its size limit, [] if none)."""
    os.makedirs(os.path.join(root, folder))
    prefix = os.path.join(root, folder, GRAPH_PREFIX)
    ms.export(cell, *[Tensor(a) for a in arrays], file_name=prefix, file_format="MINDIR")
    if os.path.exists(prefix + ".mindir"):  # weights inside the graph
        os.replace(prefix + ".mindir", os.path.join(root, folder, GRAPH_FILE))
    variables = prefix + "_variables"
    external = sorted(os.listdir(variables)) if os.path.isdir(variables) else []
    return dict(_file_entry(root, os.path.join(root, folder, GRAPH_FILE)),
                external_data=[_file_entry(root, os.path.join(variables, name)) for name in external])


def _run_config(model, processor_section, tokenizer, vocab_name):
    model_config = config_to_yaml_dict(model.config)
    for key in CHECKPOINT_KEYS:
        model_config.pop(key, None)
    processor = json.loads(json.dumps(processor_section))  # plain, deep copy
    section = processor.setdefault("tokenizer", {})
    section["vocab_file"] = os.path.join("tokenizer", vocab_name)
    if hasattr(tokenizer, "num_image_tokens"):
        # the ChatGLM tokenizer shifts every id by this (0 in the released config, 20000 by class
        # default): the value in use goes with the copied vocab file, which alone would not give it
        section["num_image_tokens"] = tokenizer.num_image_tokens
    return {"model": {"model_config": model_config, "arch": {"type": type(model).__name__}},
            "processor": processor}


def export_model(model, processor_section, tokenizer, output_dir, batch_size, seq_length, use_past=True,
                 log=print):
    """Write the graphs and manifest for `model` into output_dir (replaced if it exists); returns the manifest.

    processor_section: the run YAML's processor section; tokenizer: the processor's tokenizer (its
    vocab file is copied into the folder, so the export needs nothing from outside it).
    """
    if seq_length > model.config.llm_config.max_position_embeddings:
        raise ValueError(f"seq_length {seq_length} exceeds the LLM's context length "
                         f"{model.config.llm_config.max_position_embeddings}")
    if batch_size < 1 or seq_length < 2:
        raise ValueError(f"batch_size must be >= 1 and seq_length >= 2, got {batch_size} and {seq_length}")
    llm = model.llm
    cache = llm.new_cache(batch_size, seq_length) if use_past else None
    cells = {"full": PrefillStep(llm, cache), "image_encoder": model.image_encoder, "embedding": EmbedStep(llm)}
    if use_past:
        cells["inc"] = DecodeStep(llm, cache)
    inputs = graph_inputs(model, batch_size, seq_length)
    outputs = graph_outputs(model, batch_size, seq_length)
    dirs = graph_dirs(batch_size, seq_length)

    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".partial-export-", dir=parent)
    try:
        graphs = {}
        with portable_graphs(model):  # graphs that load on any machine
            for step, (name, cell) in enumerate(cells.items(), start=1):
                log(f"[{step}/{len(cells) + 1}] exporting the {name} graph ...")
                graphs[name] = dict(_export_graph(cell, [a for _, a in inputs[name]], work, dirs[name]),
                                    inputs=[_spec(n, a) for n, a in inputs[name]], outputs=outputs[name])
        log(f"[{len(cells) + 1}/{len(cells) + 1}] writing the tokenizer, run config and manifest ...")
        os.makedirs(os.path.join(work, "tokenizer"))
        vocab_name = os.path.basename(tokenizer.vocab_file)
        shutil.copyfile(tokenizer.vocab_file, os.path.join(work, "tokenizer", vocab_name))
        with open(os.path.join(work, RUN_CONFIG), "w", encoding="utf-8") as f:
            yaml.safe_dump(_run_config(model, processor_section, tokenizer, vocab_name), f, sort_keys=False,
                           allow_unicode=True)
        llm_cfg = model.config.llm_config
        manifest = {
            "format": FORMAT,
            "family": model.family,
            "model_class": type(model).__name__,
            "batch_size": batch_size,
            "seq_length": seq_length,
            "seq_length_means": "prompt + answer tokens of one row; prefill inputs are right-padded to it; "
                                "it is also the number of KV-cache slots",
            "use_past": use_past,
            "padding": "right: row b holds valid_length[b] real tokens; prefix_length[b] = its bidirectional "
                       "prefix (GLM: the tokens before <sop>)",
            "kv_cache": None if not use_past else {
                "layout": "a key and a value Parameter per layer, [batch, heads, seq_length, head_dim], float32; "
                          "prefill writes slots 0..S-1, a decode step writes slot valid_length[b]; shared by "
                          "the full and inc graphs",
                "num_layers": llm.num_layers, "shape": list(llm.cache_shape(batch_size, seq_length))},
            "graphs": graphs,
            "special_ids": {"bos": llm_cfg.bos_token_id, "eos": llm_cfg.eos_token_id, "pad": llm_cfg.pad_token_id,
                            "image_placeholder": model.placeholder_id},
            "num_image_tokens": model.num_image_tokens,
            "tokenizer": os.path.join("tokenizer", vocab_name),
            "run_config": RUN_CONFIG,
            "versions": {"visual_mllm": __version__, "mindspore": ms.__version__,
                         "mindformers": mindformers.__version__},
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        with open(os.path.join(work, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, ensure_ascii=False)
        if os.path.exists(output_dir):
            shutil.rmtree(output_dir)
        os.replace(work, output_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log(f"exported to {output_dir}")
    return manifest
