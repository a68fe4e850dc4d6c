"""Running exported graphs: one interface, two backends.

* `LiteBackend` - MindSpore Lite (`mindspore_lite`), used when it is importable: Ascend servers. The
  full and inc graphs are built in one ModelGroup sharing weights (and so the KV cache); the context
  comes from a `context.cfg`.
* `MindIRBackend` - MindSpore's own MindIR runtime (`mindspore.load` + `nn.GraphCell`): everywhere
  else, CPU included. Each loaded graph holds its own parameters, so after a prefill the KV cache is
  copied from the full graph into the inc graph.

`ExportedModel` offers what inference needs from a model (`config`, `encode_images`, `engine`,
`generate_ids`), so the same request handling, generation loop and sampling run on exported graphs.
Lite mode never builds the eager LLM: the host only runs graphs.
"""
import os

import numpy as np

from ..generation.generator import generate
from ..json_file import read_json
from .context_cfg import parse_context_cfg
from .exporter import FORMAT, MANIFEST


class ExportMismatchError(ValueError):
    """Inputs, files or settings that do not match what was exported."""


class MindIRBackend:
    name = "mindspore"

    def load(self, path):
        import mindspore as ms

        try:
            return ms.nn.GraphCell(ms.load(path))
        except Exception as err:  # MindSpore raises RuntimeError/ValueError for corrupt files
            raise ExportMismatchError(f"cannot load MindIR file {path}: {str(err).splitlines()[0]}") from err

    def load_pair(self, full_path, inc_path):
        return self.load(full_path), (self.load(inc_path) if inc_path else None)

    def run(self, graph, arrays):
        import mindspore as ms

        out = graph(*[ms.Tensor(a) for a in arrays])
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return [o.asnumpy() for o in outs]

    def after_prefill(self, full, inc):
        """Give the inc graph the cache the full graph has just written."""
        if inc is None:
            return
        source = {p.name: p for p in full.get_parameters() if "kv_cache" in p.name}
        for param in inc.get_parameters():
            if param.name in source:
                param.set_data(source[param.name].copy())


class LiteBackend:
    name = "mindspore_lite"

    def __init__(self, ge_config=None, device_target="Ascend", device_id=0):
        import mindspore_lite as mslite  # only present where the Lite wheel is installed

        self.mslite = mslite
        self.ge_config = ge_config
        self.context = mslite.Context()
        self.context.target = [device_target.lower()]
        if device_target.lower() == "ascend":
            self.context.ascend.device_id = device_id
            if ge_config:
                provider = parse_context_cfg(ge_config)["ascend_context"].get("provider")
                if provider:
                    self.context.ascend.provider = provider

    def _build(self, model, path):
        try:
            model.build_from_file(path, self.mslite.ModelType.MINDIR, self.context, self.ge_config)
        except Exception as err:
            raise ExportMismatchError(f"MindSpore Lite cannot build {path}: {err}") from err
        return model

    def load(self, path):
        return self._build(self.mslite.Model(), path)

    def load_pair(self, full_path, inc_path):
        if not inc_path:
            return self.load(full_path), None
        group = self.mslite.ModelGroup(self.mslite.ModelGroupFlag.SHARE_WEIGHT)  # weights and KV cache
        full, inc = self.mslite.Model(), self.mslite.Model()
        group.add_model([full, inc])
        return self._build(full, full_path), self._build(inc, inc_path)

    def run(self, graph, arrays):
        inputs = graph.get_inputs()
        for tensor, array in zip(inputs, arrays):
            tensor.set_data_from_numpy(np.ascontiguousarray(array))
        return [o.get_data_to_numpy() for o in graph.predict(inputs)]

    def after_prefill(self, full, inc):
        """Nothing to do: the ModelGroup shares the cache."""


def pick_backend(ge_config=None, device_target="CPU", device_id=0):
    """MindSpore Lite when importable, else MindSpore's MindIR runtime."""
    try:
        import mindspore_lite  # noqa: F401
    except ImportError:
        if ge_config:
            parse_context_cfg(ge_config)  # still report a malformed file
        return MindIRBackend()
    return LiteBackend(ge_config, device_target, device_id)


def _check_shapes(graph_name, spec, arrays, manifest):
    for want, array in zip(spec["inputs"], arrays):
        if list(array.shape) != want["shape"]:
            raise ExportMismatchError(
                f"{graph_name} graph input {want['name']} has shape {list(array.shape)} but the graph was "
                f"exported for {want['shape']} (batch_size {manifest['batch_size']}, seq_length "
                f"{manifest['seq_length']}): export again with the sizes you need")


def _pad_batch(array, batch):
    """Repeat the last row so that a smaller batch fills the exported batch size."""
    if array.shape[0] == batch:
        return array
    return np.concatenate([array, np.repeat(array[-1:], batch - array.shape[0], axis=0)], axis=0)


class ExportedEngine:
    """The generation engine (see generation/generator.py) over exported graphs."""

    def __init__(self, exported):
        self.x = exported
        self.positions = exported.positions
        self.seq_length = exported.manifest["seq_length"]
        self.pad_token_id = exported.manifest["special_ids"]["pad"]
        self.use_past = exported.inc is not None
        self.batch = None

    def padded_length(self, longest, max_new_tokens):
        return self.seq_length

    def start(self, batch, length):  # the exported cache holds seq_length slots, whatever `length` needs
        if batch > self.x.batch_size:
            raise ExportMismatchError(f"a batch of {batch} rows but the graphs were exported for batch_size "
                                      f"{self.x.batch_size}")
        self.batch = batch

    def embed(self, ids, image_embeds, starts):
        if image_embeds is None:
            image_embeds = np.zeros((ids.shape[0], self.x.num_image_tokens, self.x.hidden_size), np.float32)
        return self.x.run("embedding", ids, image_embeds.astype(np.float32), starts)

    def prefill(self, inputs_embeds, position_ids, valid_length, prefix_length, types):
        extra = (types,) if self.x.takes_token_types else ()
        logits = self.x.run("full", inputs_embeds, position_ids, valid_length, prefix_length, *extra)
        self.x.backend.after_prefill(self.x.full, self.x.inc)
        return logits

    def decode(self, ids, position_ids, valid_length):
        return self.x.run("inc", ids, position_ids, valid_length)


class ExportedModel:
    """A folder written by `export_model`, loaded for inference."""

    def __init__(self, export_dir, backend=None, full_path=None, inc_path=None, manifest=None):
        from mindformers.models.build_config import build_model_config

        from ..families import get as get_family
        from ..registry import read_run_config

        self.export_dir = export_dir
        self.manifest = manifest or read_manifest(export_dir)
        graphs = self.manifest["graphs"]
        self.batch_size = self.manifest["batch_size"]
        self.backend = backend or MindIRBackend()
        self.run_config_path = os.path.join(export_dir, self.manifest["run_config"])
        run_config = read_run_config(self.run_config_path, {"seq_length": self.manifest["seq_length"]})
        self.config = build_model_config(run_config.model.model_config)
        self.positions = get_family(self.manifest["family"]).model_class.position_scheme(self.config.llm_config)
        self.hidden_size = self.config.llm_config.hidden_size
        self.num_image_tokens = self.manifest["num_image_tokens"]
        # the full graph's inputs say whether the decoder routes by token types (CogVLM)
        self.takes_token_types = any(spec["name"] == "token_types" for spec in graphs["full"]["inputs"])
        full_path = full_path or os.path.join(export_dir, graphs["full"]["file"])
        inc_path = inc_path or (os.path.join(export_dir, graphs["inc"]["file"]) if "inc" in graphs else None)
        self.full, self.inc = self.backend.load_pair(full_path, inc_path)
        self.graphs = {"full": self.full, "inc": self.inc,
                       "image_encoder": self.backend.load(os.path.join(export_dir, graphs["image_encoder"]["file"])),
                       "embedding": self.backend.load(os.path.join(export_dir, graphs["embedding"]["file"]))}
        self._engine = ExportedEngine(self)

    @classmethod
    def locate(cls, export_dir=None, full_path=None, inc_path=None, backend=None):
        """Open an export by its folder, or by the seed-era graph paths (the manifest is found beside them)."""
        if export_dir is None:
            if not os.path.isfile(full_path):
                raise ExportMismatchError(f"--full_model_path: not found: {full_path}")
            export_dir = os.path.dirname(os.path.dirname(os.path.abspath(full_path)))
            if not os.path.isfile(os.path.join(export_dir, MANIFEST)):
                raise ExportMismatchError(f"no {MANIFEST} beside {full_path} (looked in {export_dir}): pass the "
                                          "folder export_lite_model.py wrote, unchanged")
        manifest = read_manifest(export_dir)
        for name, path in (("full", full_path), ("inc", inc_path)):
            if path is not None:
                expected = manifest["graphs"].get(name)
                if expected is None or os.path.getsize(path) != expected["bytes"]:
                    raise ExportMismatchError(f"{path} is not the {name} graph listed in {export_dir}/{MANIFEST}")
        return cls(export_dir, backend, full_path, inc_path, manifest)

    def check_request(self, batch_size=None, seq_length=None, use_past=None):
        """Refuse run settings the graphs were not exported for, saying what was exported."""
        exported = f"(exported: batch_size {self.batch_size}, seq_length {self.manifest['seq_length']}, " \
                   f"incremental graph {'yes' if self.inc is not None else 'no'})"
        if batch_size is not None and batch_size > self.batch_size:
            raise ExportMismatchError(f"--batch_size {batch_size} is larger than the graphs take {exported}")
        if seq_length is not None and seq_length != self.manifest["seq_length"]:
            raise ExportMismatchError(f"--seq_length {seq_length} does not match the graphs {exported}")
        if use_past and self.inc is None:
            raise ExportMismatchError(f"--use_past True needs the incremental graph {exported}")
        if use_past is False:
            self._engine.use_past = False  # re-run the full graph for every token

    def load_processor(self):
        """The processor the model was exported with (tokenizer copied into the export folder)."""
        from ..registry import load_processor_from_yaml

        vocab = os.path.join(self.export_dir, self.manifest["tokenizer"])
        return load_processor_from_yaml(self.run_config_path, {"tokenizer": {"vocab_file": vocab}})

    def run(self, name, *arrays):
        rows = arrays[0].shape[0]
        padded = [_pad_batch(np.asarray(a), self.batch_size) for a in arrays]
        _check_shapes(name, self.manifest["graphs"][name], padded, self.manifest)
        return self.backend.run(self.graphs[name], padded)[0][:rows]

    def encode_images(self, pixel_values):
        pixel_values = np.asarray(pixel_values, np.float32)
        return np.concatenate([self.run("image_encoder", pixel_values[i:i + self.batch_size])
                               for i in range(0, len(pixel_values), self.batch_size)])

    def engine(self, use_past=None):
        if use_past and self.inc is None:
            raise ExportMismatchError("use_past needs the incremental graph: export with --use_past True")
        return self._engine

    def generate_ids(self, rows, generation_config, pixel_values=None, streamer=None, use_past=None):
        image_embeds = None if pixel_values is None else self.encode_images(pixel_values)
        return generate(self.engine(use_past), rows, generation_config, image_embeds, streamer)


def read_manifest(export_dir):
    path = os.path.join(export_dir, MANIFEST)
    if not os.path.isfile(path):
        raise ExportMismatchError(f"{export_dir} has no {MANIFEST}: it is not a folder written by export_lite_model.py")
    manifest = read_json(path, ExportMismatchError, "manifest")
    if manifest.get("format") != FORMAT:
        raise ExportMismatchError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    for name, graph in manifest["graphs"].items():
        for entry, what in [(graph, "graph")] + [(data, "external weights") for data in graph.get("external_data", [])]:
            file = os.path.join(export_dir, entry["file"])
            if not os.path.isfile(file):
                raise ExportMismatchError(f"manifest lists the {name} {what} {entry['file']} but {file} is missing")
            if os.path.getsize(file) != entry["bytes"]:
                raise ExportMismatchError(f"{file} has {os.path.getsize(file)} bytes but the manifest says "
                                          f"{entry['bytes']}: the {what} and the manifest do not belong together")
    return manifest

