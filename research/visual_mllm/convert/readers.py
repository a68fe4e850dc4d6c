"""Checkpoint files as {key: SourceTensor}, without reading any tensor data.

Every reader maps its files into memory and describes each tensor by shape and dtype; the bytes are
read only when a tensor is loaded, one at a time. Pages of a mapped file are file-backed: the kernel
can drop them at any time, so a 15.6 GB source never costs 15.6 GB of RAM.

`safetensors_layout` / `mindspore_ckpt_layout` / `checkpoint_layout` give only where each tensor's
bytes are in its file (`TensorLayout`), from the headers, for callers that read the bytes themselves
(models.weights loads checkpoints into a model that way, one tensor at a time).

Formats: PyTorch pickles (`.pt`, `.pth`, `.bin`; `torch.load(weights_only=True, mmap=True)`, so no
code in the file runs), safetensors, MindSpore `.ckpt`, and sharded sets described by an index json
(`{"weight_map": {key: shard file}}`). Bad input raises ConversionError naming the file.
"""
import hashlib
import json
import mmap
import os
import pickle
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, NamedTuple, Tuple

import torch

from .. import json_file
from ..models.weights import summarise

# dtype names of the file formats
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
MINDSPORE_DTYPES = {"Float64": torch.float64, "Float32": torch.float32, "Float16": torch.float16,
                    "BFloat16": torch.bfloat16, "Int64": torch.int64, "Int32": torch.int32, "Int16": torch.int16,
                    "Int8": torch.int8, "UInt8": torch.uint8, "Bool": torch.bool}


class ConversionError(ValueError):
    """A source or output that cannot be converted; the message names the file and the keys."""


def names(keys):
    """'a, b, c ... and 12 more' for conversion error messages."""
    return summarise(keys, limit=8)


@dataclass(frozen=True)
class SourceTensor:
    """One tensor of a source file: shape and dtype known, data read by `load()`."""

    file: str
    shape: Tuple[int, ...]
    dtype: torch.dtype
    _load: Callable[[], torch.Tensor]

    def load(self):
        return self._load()

    def meta(self):
        """A data-less tensor of the same shape and dtype (for planning)."""
        return torch.empty(self.shape, dtype=self.dtype, device="meta")

    @property
    def nbytes(self):
        count = 1
        for dim in self.shape:
            count *= dim
        return count * self.dtype.itemsize


class Source(Mapping):
    """{key: SourceTensor} of one checkpoint (one file or several shards), keys in file order."""

    def __init__(self, tensors, files, description):
        self.tensors = dict(tensors)
        self.files = list(files)
        self.description = description

    def __getitem__(self, key):
        return self.tensors[key]

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self):
        return len(self.tensors)


def _check_file(path):
    if not os.path.isfile(path):
        raise ConversionError(f"checkpoint file not found: {path}")
    if os.path.getsize(path) == 0:
        raise ConversionError(f"{path} is empty")


def read_json(path):
    """A JSON file; a missing or malformed one is a ConversionError naming it."""
    return json_file.read_json(path, ConversionError)


def _first_line(err):
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ----------------------------------------------------------------------------------------- PyTorch pickles

def read_torch_pickle(path, container=None):
    """The state dict in a PyTorch pickle as {key: SourceTensor}, memory-mapped.

    container: the key of the dict that holds the state dict (SAT: "module", LAVIS: "model"), or
    None when the file is the state dict itself.
    """
    _check_file(path)
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # torch.save's zip format is the only one that can be mapped
            raise ConversionError(
                f"cannot read {path}: not a PyTorch zip checkpoint (another file type, or the legacy pre-1.6 "
                f"torch.save format, which cannot be memory-mapped: re-save it with a current torch)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower():
            raise ConversionError(
                f"refusing {path}: the pickle holds objects other than tensors and plain containers, and "
                f"loading it could run code (torch.load weights_only=True: {_first_line(err)})") from None
        raise ConversionError(f"cannot read {path}: not a PyTorch checkpoint or corrupt ({_first_line(err)})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise ConversionError(f"cannot read {path}: truncated or corrupt PyTorch checkpoint "
                              f"({_first_line(err)})") from None
    if container is not None:
        if not isinstance(obj, Mapping) or container not in obj:
            found = sorted(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
            raise ConversionError(f"{path}: expected a dict with the state dict under {container!r}, found {found}")
        obj = obj[container]
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path}: expected a state dict (a dict of tensors), found {type(obj).__name__}")
    tensors = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"{path}: {key!r} is a {type(value).__name__}, not a tensor")
        tensors[key] = SourceTensor(path, tuple(value.shape), value.dtype, lambda value=value: value)
    return tensors


# ----------------------------------------------------------------------------------------- mapped formats

def _mapped(path):
    """A private read-only-in-practice mapping of the whole file as a writable memoryview.

    ACCESS_COPY (copy-on-write) gives torch.frombuffer a writable buffer without copying anything;
    nothing ever writes to it, so every page stays file-backed.
    """
    with open(path, "rb") as f:
        return memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY))


def _tensor_at(buffer, offset, shape, dtype):
    count = 1
    for dim in shape:
        count *= dim
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype, count=count, offset=offset).reshape(shape)


class TensorLayout(NamedTuple):
    """Where one tensor is in its file: shape, dtype and the byte spans ((start, stop), ...) whose
    contents concatenate to its data (MindSpore splits a large tensor into several entries)."""

    shape: Tuple[int, ...]
    dtype: torch.dtype
    spans: Tuple[Tuple[int, int], ...]

    @property
    def nbytes(self):
        return sum(stop - start for start, stop in self.spans)


def _spans_tensor(buffer, layout):
    """The tensor a layout describes, on the mapped file (a view unless it is split in several spans)."""
    if len(layout.spans) == 1:
        return _tensor_at(buffer, layout.spans[0][0], layout.shape, layout.dtype)
    flat = torch.cat([_tensor_at(buffer, start, ((stop - start) // layout.dtype.itemsize,), layout.dtype)
                      for start, stop in layout.spans])
    return flat.reshape(layout.shape)


def _sources(path, layouts):
    """{key: SourceTensor} of the layouts of a file, read from one mapping of it."""
    buffer = _mapped(path)
    return {key: SourceTensor(path, layout.shape, layout.dtype, lambda layout=layout: _spans_tensor(buffer, layout))
            for key, layout in layouts.items()}


def safetensors_layout(path):
    """{key: TensorLayout} of a safetensors file in data order, from its header (checked against the
    file size); no tensor data is read."""
    _check_file(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConversionError(f"cannot read {path}: truncated safetensors file")
        header_len = struct.unpack("<Q", head)[0]
        if header_len > size - 8:
            raise ConversionError(f"cannot read {path}: truncated or not a safetensors file "
                                  f"(header of {header_len} bytes in a {size}-byte file)")
        try:
            header = json.loads(f.read(header_len))
        except ValueError as err:
            raise ConversionError(f"cannot read {path}: corrupt safetensors header ({_first_line(err)})") from None
    header.pop("__metadata__", None)
    data_start, data_size = 8 + header_len, size - 8 - header_len
    layouts = {}
    for key, info in header.items():
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise ConversionError(f"{path}: {key} has an unsupported dtype {info.get('dtype')!r}")
        shape = tuple(info["shape"])
        begin, end = info["data_offsets"]
        source = SourceTensor(path, shape, dtype, None)
        if end > data_size:
            raise ConversionError(f"cannot read {path}: truncated ({key} ends at byte {end} of the data, "
                                  f"which has {data_size})")
        if end - begin != source.nbytes:
            raise ConversionError(f"cannot read {path}: corrupt header ({key} {shape} {dtype} "
                                  f"needs {source.nbytes} bytes, its offsets span {end - begin})")
        layouts[key] = TensorLayout(shape, dtype, ((data_start + begin, data_start + end),))
    return dict(sorted(layouts.items(), key=lambda item: item[1].spans[0][0]))


def read_safetensors(path):
    """A safetensors file as {key: SourceTensor} (mapped; the header is checked against the file size)."""
    return _sources(path, safetensors_layout(path))


def _varint(buffer, pos, end, path):
    value, shift = 0, 0
    while True:
        if pos >= end:
            raise ConversionError(f"cannot read {path}: truncated or corrupt MindSpore checkpoint")
        byte = buffer[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(buffer, pos, end, path):
    """(field number, wire type, value or (start, end) of a length-delimited field) of one message."""
    while pos < end:
        key, pos = _varint(buffer, pos, end, path)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buffer, pos, end, path)
            yield number, wire, value
        elif wire == 2:
            length, pos = _varint(buffer, pos, end, path)
            if pos + length > end:
                raise ConversionError(f"cannot read {path}: truncated MindSpore checkpoint")
            yield number, wire, (pos, pos + length)
            pos += length
        else:
            raise ConversionError(f"cannot read {path}: not a MindSpore checkpoint (protobuf wire type {wire})")


CKPT_CRC_TRAILER = 17  # MindSpore's optional b"crc_num" + 10 bytes at the end of a .ckpt


def mindspore_ckpt_layout(path):
    """{name: TensorLayout} of a MindSpore .ckpt, parsed entry by entry on the mapped file; only the
    entries' headers are touched, and the mapping is closed before returning.

    The file is a `Checkpoint` protobuf: repeated `value {tag, tensor {dims, tensor_type,
    tensor_content}}`; a large tensor is stored as consecutive entries with the same tag whose
    contents concatenate. Text entries (tensor_type "str") are not tensors and are left out.
    """
    _check_file(path)
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        with memoryview(mapping) as buffer:
            return _ckpt_layout(path, buffer)
    finally:
        try:
            mapping.close()
        except BufferError:  # a view still held by an error's traceback: unmapped when collected
            pass


def _ckpt_layout(path, buffer):
    end = len(buffer)
    if end >= CKPT_CRC_TRAILER and bytes(buffer[end - CKPT_CRC_TRAILER:end - 10]) == b"crc_num":
        end -= CKPT_CRC_TRAILER
    entries = {}  # name -> (dims, type, [(start, stop)])
    last = None
    for number, wire, span in _fields(buffer, 0, end, path):
        if number != 1 or wire != 2:
            raise ConversionError(f"cannot read {path}: not a MindSpore checkpoint")
        name, dims, type_name, content = None, [], None, None
        for vnumber, vwire, vvalue in _fields(buffer, *span, path):
            if vnumber == 1 and vwire == 2:
                name = bytes(buffer[vvalue[0]:vvalue[1]]).decode("utf-8")
            elif vnumber == 2 and vwire == 2:
                for tnumber, twire, tvalue in _fields(buffer, *vvalue, path):
                    if tnumber == 1 and twire == 0:
                        dims.append(tvalue)
                    elif tnumber == 1 and twire == 2:  # packed dims
                        pos = tvalue[0]
                        while pos < tvalue[1]:
                            dim, pos = _varint(buffer, pos, tvalue[1], path)
                            dims.append(dim)
                    elif tnumber == 2 and twire == 2:
                        type_name = bytes(buffer[tvalue[0]:tvalue[1]]).decode("utf-8")
                    elif tnumber == 3 and twire == 2:
                        content = tvalue
            elif vnumber == 3:
                raise ConversionError(f"{path}: map parameters are not supported")
        if name is None or type_name is None or content is None:
            raise ConversionError(f"cannot read {path}: corrupt MindSpore checkpoint entry")
        if type_name == "str":  # a text entry (MindSpore's append_dict), not a tensor
            last = name
            continue
        if type_name not in MINDSPORE_DTYPES:
            raise ConversionError(f"{path}: {name} has an unsupported tensor type {type_name!r}")
        if name == last:
            entries[name][2].append(content)
        elif name in entries:
            raise ConversionError(f"cannot read {path}: {name} appears twice")
        else:
            entries[name] = (tuple(dims) if dims != [0] else (), MINDSPORE_DTYPES[type_name], [content])
        last = name
    layouts = {}
    for name, (shape, dtype, chunks) in entries.items():
        layout = TensorLayout(shape, dtype, tuple(chunks))
        needed = SourceTensor(path, shape, dtype, None).nbytes
        if layout.nbytes != needed:
            raise ConversionError(f"cannot read {path}: {name} {shape} {dtype} needs {needed} bytes, "
                                  f"the file holds {layout.nbytes}")
        layouts[name] = layout
    return layouts


def read_mindspore_ckpt(path):
    """A MindSpore .ckpt as {name: SourceTensor} (see `mindspore_ckpt_layout`), data read from a mapping."""
    return _sources(path, mindspore_ckpt_layout(path))


def checkpoint_layout(path):
    """{name: TensorLayout} of a `.safetensors` file, or else of a MindSpore `.ckpt`."""
    return safetensors_layout(path) if path.endswith(".safetensors") else mindspore_ckpt_layout(path)


# ----------------------------------------------------------------------------------------- sharded sets

def read_sharded(index_path, read_shard):
    """All shards of an index json (`weight_map`: key -> shard file beside it) as one {key: SourceTensor}.

    Every shard must hold exactly the keys the index gives it. Returns (tensors, shard paths).
    """
    index = read_json(index_path)
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise ConversionError(f"{index_path} is not a shard index json (no weight_map)")
    weight_map = index["weight_map"]
    folder = os.path.dirname(os.path.abspath(index_path))
    by_shard = {}
    for key, shard in weight_map.items():
        by_shard.setdefault(shard, set()).add(key)
    tensors, paths = {}, []
    for shard, keys in by_shard.items():
        path = os.path.join(folder, shard)
        if not os.path.isfile(path):
            raise ConversionError(f"{index_path} names shard {shard}, which is not in {folder}")
        found = read_shard(path)
        if set(found) != keys:
            raise ConversionError(f"{path} does not hold the keys {os.path.basename(index_path)} gives it: "
                                  f"missing {names(keys - set(found)) or 'none'}; "
                                  f"not in the index {names(set(found) - keys) or 'none'}")
        tensors.update(found)
        paths.append(path)
    return tensors, paths


def sha256_file(path, chunk=16 << 20, stop=None):
    """Hex sha256 of a file; `stop` (a threading.Event) ends it early, returning None."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            if stop is not None and stop.is_set():
                return None
            block = f.read(chunk)
            if not block:
                return digest.hexdigest()
            digest.update(block)
