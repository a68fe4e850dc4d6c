"""Output files written tensor by tensor, and committed all together or not at all.

* CkptWriter: MindSpore `.ckpt`. The file is one `Checkpoint` protobuf whose only field is the
  repeated `value`; serialized messages concatenate into one message, so each tensor is appended as
  its own `value` entry (split into entries of at most 512 MiB, as MindSpore writes them) straight
  from the tensor's memory. `mindspore.load_checkpoint` reads the result.
* SafetensorsWriter: the header (names, dtypes, shapes, offsets) is known from the plan, so it is
  written first and the raw bytes of each tensor follow in order.
* TorchBinWriter: a PyTorch pickle (`pytorch_model-*.bin`, LAVIS's `.pth`); torch.save needs the whole
  dict, so this one holds one shard in memory (shards are bounded by --max_shard_size).

Every writer hashes what it writes (sha256) and checks that tensors come in the planned order.
OutputFiles gives each output a temporary name beside its final one and renames them all at the end;
an error or Ctrl-C before that deletes the temporary files (and the folders made for them), so a final
name never holds half a file.
"""
import hashlib
import json
import os
import shutil
import struct

import torch

from .readers import MINDSPORE_DTYPES, SAFETENSORS_DTYPES, ConversionError, sha256_file

CKPT_SLICE_BYTES = 512 << 20
_MINDSPORE_NAMES = {dtype: name for name, dtype in MINDSPORE_DTYPES.items()}
_SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def tensor_bytes(tensor):
    """The tensor's bytes as a flat uint8 numpy array (a view when the tensor is contiguous)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy()


def _varint(value):
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number, payload):
    """A length-delimited protobuf field: key, length, payload."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


class _Writer:
    """Common part: planned entries [(name, meta tensor)], a hashed output file, order checks."""

    def __init__(self, path, entries):
        self.path = path
        self.entries = list(entries)
        self.count = 0
        self.bytes = 0
        self._digest = hashlib.sha256()
        self._file = open(path, "wb")

    def _write(self, data):
        self._digest.update(data)
        self._file.write(data)
        self.bytes += len(data)

    def _check_next(self, name, tensor):
        if self.count >= len(self.entries) or self.entries[self.count][0] != name:
            raise RuntimeError(f"{self.path}: {name} written out of the planned order")
        meta = self.entries[self.count][1]
        if tuple(tensor.shape) != tuple(meta.shape) or tensor.dtype != meta.dtype:
            raise RuntimeError(f"{self.path}: {name} is {tuple(tensor.shape)} {tensor.dtype}, "
                               f"planned {tuple(meta.shape)} {meta.dtype}")
        self.count += 1

    def add(self, name, tensor):
        self._check_next(name, tensor)
        self._add(name, tensor)

    def close(self):
        """Finish the file; returns {"bytes", "sha256", "tensors"}."""
        if self.count != len(self.entries):
            raise RuntimeError(f"{self.path}: {len(self.entries) - self.count} planned tensors not written")
        self._file.close()
        return {"bytes": self.bytes, "sha256": self._digest.hexdigest(), "tensors": self.count}

    def abort(self):
        self._file.close()


class CkptWriter(_Writer):
    """texts: {name: str} entries written after the tensors (MindSpore's `append_dict` strings)."""

    suffix = ".ckpt"

    def __init__(self, path, entries, texts=None):
        super().__init__(path, entries)
        self.texts = dict(texts or {})

    def _entry(self, name, dims, type_name, content):
        head = _field(1, name.encode("utf-8"))
        tensor = b"".join(b"\x08" + _varint(dim) for dim in dims) + _field(2, type_name.encode())
        content_head = _varint(3 << 3 | 2) + _varint(len(content))
        tensor_len = len(tensor) + len(content_head) + len(content)
        tensor_head = _varint(2 << 3 | 2) + _varint(tensor_len)
        self._write(_varint(1 << 3 | 2) + _varint(len(head) + len(tensor_head) + tensor_len) + head + tensor_head
                    + tensor + content_head)
        self._write(content)

    def _add(self, name, tensor):
        data = tensor_bytes(tensor)
        step = CKPT_SLICE_BYTES - CKPT_SLICE_BYTES % tensor.dtype.itemsize
        for start in range(0, max(len(data), 1), step):
            self._entry(name, tensor.shape, _MINDSPORE_NAMES[tensor.dtype], data[start:start + step])

    def close(self):
        for name, text in self.texts.items():  # as MindSpore stores strings: dims [0], UTF-32 numpy text
            self._entry(name, [0], "str", text.encode("utf-32-le"))
        return super().close()


class SafetensorsWriter(_Writer):
    suffix = ".safetensors"

    def __init__(self, path, entries, metadata):
        super().__init__(path, entries)
        header, offset = {"__metadata__": dict(metadata)}, 0
        for name, meta in self.entries:
            size = meta.numel() * meta.dtype.itemsize
            header[name] = {"dtype": _SAFETENSORS_NAMES[meta.dtype], "shape": list(meta.shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode("utf-8")
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
        self._write(struct.pack("<Q", len(text)) + text)

    def _add(self, name, tensor):
        self._write(tensor_bytes(tensor))


class TorchBinWriter(_Writer):
    """container: the key the state dict is saved under (LAVIS: `{'model': state_dict}`), None = the dict itself."""

    suffix = ".bin"

    def __init__(self, path, entries, container=None):
        super().__init__(path, entries)
        self._tensors = {}
        self.container = container

    def _add(self, name, tensor):
        tensor = tensor.contiguous()
        if tensor.storage_offset() or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.dtype.itemsize:
            tensor = tensor.clone()  # a view (a block of a fused weight): torch.save would write its whole storage
        self._tensors[name] = tensor

    def close(self):
        super().close()  # the planned-count check; closes the placeholder file
        torch.save(self._tensors if self.container is None else {self.container: self._tensors}, self.path)
        self._tensors.clear()
        return {"bytes": os.path.getsize(self.path), "sha256": sha256_file(self.path), "tensors": self.count}


class OutputFiles:
    """Outputs written under temporary names and renamed into place together by `commit()`.

    Use as a context manager: leaving the block without commit() (an error, Ctrl-C) closes the
    writers and deletes every temporary file. A temporary file is `.<name>.partial<ext>` beside its
    final path (same filesystem, so the rename is atomic).
    """

    def __init__(self):
        self._pending = []  # (temporary path, final path)
        self._writers = []
        self._created = []  # folders made for the outputs, removed again if nothing is committed
        self._committed = False

    def _make_folder(self, folder):
        if not os.path.isdir(folder):
            self._make_folder(os.path.dirname(folder))
            os.mkdir(folder)
            self._created.append(folder)

    def temp_for(self, final):
        folder, base = os.path.split(os.path.abspath(final))
        stem, ext = os.path.splitext(base)
        self._make_folder(folder)
        if any(final_path == os.path.abspath(final) for _, final_path in self._pending):
            raise ConversionError(f"two outputs would be written to {final}")
        temp = os.path.join(folder, f".{stem}.partial{ext}")
        self._pending.append((temp, os.path.abspath(final)))
        return temp

    def writer(self, cls, final, *args):
        writer = cls(self.temp_for(final), *args)
        self._writers.append(writer)
        return writer

    def write_text(self, final, text):
        with open(self.temp_for(final), "w", encoding="utf-8") as f:
            f.write(text)

    def copy(self, source, final):
        shutil.copyfile(source, self.temp_for(final))

    def commit(self):
        for temp, final in self._pending:
            os.replace(temp, final)
        self._committed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if not self._committed:
            for writer in self._writers:
                writer.abort()
            for temp, _ in self._pending:
                if os.path.exists(temp):
                    os.remove(temp)
            for folder in reversed(self._created):
                if not os.listdir(folder):
                    os.rmdir(folder)
        return False
