"""Finetuning data: the three dataset formats users bring, their validation, samples and batches.

Formats (``format: auto`` tells them apart by their shape):

* ``fewshot`` - VisualGLM's few-shot JSON: a list of ``{"img": ..., "prompt": ..., "label": ...}``.
  ``img`` may be null/absent for a text-only row.
* ``cc_sbu_align`` - MiniGPT-4 stage 2: ``filter_cap.json`` = ``{"annotations": [{"image_id", "caption"}]}``
  with images ``image/{image_id}.jpg`` beside it (give the JSON file or its folder). The question is
  drawn from ``instructions`` (deterministically: by the row index).
* ``conversations`` - LLaVA style: a list of ``{"image": ..., "conversations": [{"from": "human", "value":
  "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}``. Every human/gpt pair becomes one sample whose
  history is the pairs before it; the ``<image>`` tag is removed (each family's prompt puts the image where
  its format wants it).

A ``.jsonl`` file (one JSON object per line) is read as a list. Relative image paths are looked up
relative to the dataset file's folder first, then relative to the working directory (what the
reference scripts used); ``image_root`` replaces the dataset folder in that rule.

Every bad row is reported - index, and the reason - before training starts, never dropped silently:
missing or wrongly typed field, missing / unreadable image, text that cannot fit
``max_source_length`` / ``max_target_length`` (unless ``truncate: true``, the reference behaviour).

The readers give family-neutral `Record`s (question, answer, history, image); the model family's prompt
builder turns each into its training row (`PromptBuilder.training_sample`: VisualGLM's
``source + [gMASK] <sop> + target + <eop>``, MiniGPT-4's chat prompt + ``answer###``, MiniGPT4Qwen's ChatML
prompt + ``answer<|im_end|>``; labels -100 over the prompt). The prompt part (ids before the first
label) must fit ``max_source_length``, the rest ``max_target_length``. Rows are right-padded to
``max_source_length + max_target_length`` with the family's pad id (labels -100); positions and the
bidirectional prefix come from the decoder's PositionScheme (GLM: 2-D positions, the prefix is everything
before ``<sop>``; LLaMA/Qwen: 0, 1, 2, ... and no prefix).

Batches: step ``k`` of a run with global batch ``G = batch_size * world_size`` takes items
``k*G .. (k+1)*G-1`` of an endless stream of epochs, each epoch a permutation drawn from ``(seed, epoch)``.
Rank ``r`` takes its ``batch_size`` items from offset ``r*batch_size`` of that global batch. What step k
trains on is therefore a function of (seed, k) alone: a resumed run sees exactly the same batches.
"""
import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..generation.generator import token_types
from ..json_file import read_json
from ..processing.image import ImageLoadError, load_image
from ..processing.prompt import IGNORE_INDEX

FORMATS = ("fewshot", "cc_sbu_align", "conversations")
NO_IMAGE = -(1 << 20)  # image_start of a text-only row (as the generator uses)
# MiniGPT-4's stage-2 instructions (its prompts/alignment.txt) without their `<Img><ImageHere></Img>` tag:
# each family's prompt puts the image where its format wants it.
DEFAULT_INSTRUCTIONS = (
    "Describe this image in detail.",
    "Take a look at this image and describe what you notice.",
    "Please provide a detailed description of the picture.",
    "Could you describe the contents of this image for me?",
)


class DatasetFormatError(ValueError):
    """The dataset file cannot be read or is not one of the known formats."""


class DatasetValidationError(ValueError):
    """Some rows are bad; `problems` lists (row, reason) for every one of them."""

    def __init__(self, path, problems, total):
        self.path = path
        self.problems = list(problems)
        self.total = total
        if len(self.problems) == 1:  # one line
            super().__init__(f"{path}: {self.problems[0]} (1 bad row of {total}; nothing was trained)")
            return
        rows = sorted({p.row for p in self.problems}, key=str)
        lines = [f"{path}: {len(rows)} bad row(s) of {total}; fix or remove them (nothing was trained):"]
        lines += [f"  {p}" for p in self.problems]
        super().__init__("\n".join(lines))


@dataclass
class Problem:
    row: object   # the row index (int), or e.g. "3, turn 2" for a conversation pair
    reason: str

    def __str__(self):
        return f"row {self.row}: {self.reason}"


@dataclass
class Record:
    """One training example before tokenisation."""
    row: object                      # where it came from, for messages
    prompt: str
    label: str
    image: Optional[str] = None      # resolved image path, or None (text-only)
    history: List[Tuple[str, str]] = field(default_factory=list)


@dataclass
class Sample:
    """One tokenised example (unpadded)."""
    row: object
    input_ids: List[int]
    labels: List[int]
    image_start: Optional[int]
    image: Optional[str]
    record: Record

    @property
    def num_target_tokens(self):
        """Label positions that count in the loss (after the shift by one)."""
        return sum(1 for t in self.labels[1:] if t != IGNORE_INDEX)


@dataclass
class DatasetSettings:
    """The `dataset` section of the finetune YAML (see configs/*/lora.yaml)."""
    path: Optional[str] = None
    format: str = "auto"
    max_source_length: int = 64
    max_target_length: int = 256
    truncate: bool = False           # True: cut over-long text as the reference does; False: report the rows
    english: bool = False            # Q:/A: prompt format instead of 问：/答：
    shuffle: bool = True
    image_root: Optional[str] = None
    instructions: Sequence[str] = DEFAULT_INSTRUCTIONS
    cache_images: int = 512          # preprocessed images kept in memory (0 = none)

    @property
    def max_length(self):
        return int(self.max_source_length) + int(self.max_target_length)


# ----------------------------------------------------------------------------------------- reading

def _read_json(path):
    if not path.endswith(".jsonl"):
        return read_json(path, DatasetFormatError, "dataset")
    try:
        with open(path, encoding="utf-8") as f:
            rows = []
            for number, line in enumerate(f):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise DatasetFormatError(f"{path}: line {number + 1} is not valid JSON: {err}") from err
            return rows
    except UnicodeDecodeError as err:
        raise DatasetFormatError(f"{path}: not UTF-8 text: {err}") from err


def locate(path):
    """(json file, data) of a dataset path; a folder means its filter_cap.json / dataset.json."""
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in ("filter_cap.json", "dataset.json", "data.json"):
            candidate = os.path.join(path, name)
            if os.path.isfile(candidate):
                path = candidate
                break
        else:
            raise DatasetFormatError(f"{path}: a folder without filter_cap.json or dataset.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dataset not found: {path}")
    return path, _read_json(path)


def detect_format(data, path):
    if isinstance(data, dict) and "annotations" in data:
        return "cc_sbu_align"
    if isinstance(data, list):
        first = next((row for row in data if isinstance(row, dict)), None)
        if first is None:
            if not data:
                raise DatasetFormatError(f"{path}: the dataset is empty")
            raise DatasetFormatError(f"{path}: a list whose rows are not JSON objects")
        if "conversations" in first:
            return "conversations"
        return "fewshot"
    raise DatasetFormatError(f"{path}: unknown dataset layout (expected a list of rows or "
                             "{\"annotations\": [...]}); see visual_mllm/finetune/datasets.py")


class ImageResolver:
    """Finds image files: relative to the dataset folder (or image_root), else to the working directory."""

    def __init__(self, dataset_path, image_root=None):
        self.base = os.path.abspath(image_root or os.path.dirname(os.path.abspath(dataset_path)))

    def candidates(self, name):
        if os.path.isabs(name):
            return [name]
        return [os.path.join(self.base, name), os.path.abspath(name)]

    def resolve(self, name):
        """(path or None, reason if not found)."""
        options = self.candidates(name)
        for option in options:
            if os.path.isfile(option):
                return option, None
        tried = " and ".join(dict.fromkeys(options))
        return None, f"image {name!r} not found (looked for {tried})"


def check_image(path):
    """None if the image decodes completely (truncated files fail here, not half-way through training),
    else the reason."""
    try:
        load_image(path)
    except ImageLoadError as err:
        return str(err)
    return None


def _text(row, key, problems, index, required=True):
    value = row.get(key)
    if value is None:
        if required:
            problems.append(Problem(index, f"missing field {key!r}"))
        return None
    if not isinstance(value, str):
        problems.append(Problem(index, f"field {key!r} must be a string, got {type(value).__name__}"))
        return None
    if required and not value.strip():
        problems.append(Problem(index, f"field {key!r} is empty"))
        return None
    return value


def _image(row_image, resolver, problems, index):
    if row_image is None or row_image == "":
        return None, True
    if not isinstance(row_image, str):
        problems.append(Problem(index, f"image field must be a file path string, got {type(row_image).__name__}"))
        return None, False
    path, why = resolver.resolve(row_image)
    if path is None:
        problems.append(Problem(index, why))
        return None, False
    why = check_image(path)
    if why is not None:
        problems.append(Problem(index, why))
        return None, False
    return path, True


def _object_rows(rows, problems, what="a row"):
    """(index, row) of the rows that are JSON objects; every other row becomes a Problem."""
    for index, row in enumerate(rows):
        if isinstance(row, dict):
            yield index, row
        else:
            problems.append(Problem(index, f"{what} must be a JSON object, got {type(row).__name__}"))


def read_fewshot(data, resolver):
    records, problems = [], []
    for index, row in _object_rows(data, problems):
        before = len(problems)
        prompt = _text(row, "prompt", problems, index)
        label = _text(row, "label", problems, index)
        image, _ = _image(row.get("img"), resolver, problems, index)
        if len(problems) == before:
            records.append(Record(index, prompt, label, image))
    return records, problems


def read_cc_sbu_align(data, resolver, instructions):
    records, problems = [], []
    rows = data.get("annotations")
    if not isinstance(rows, list):
        return [], [Problem("-", "'annotations' must be a list")]
    if not instructions:
        return [], [Problem("-", "cc_sbu_align needs at least one instruction (dataset.instructions)")]
    for index, row in _object_rows(rows, problems, "an annotation"):
        before = len(problems)
        caption = _text(row, "caption", problems, index)
        image_id = row.get("image_id")
        image = None
        if image_id is None or (isinstance(image_id, str) and not image_id.strip()):
            problems.append(Problem(index, "missing field 'image_id'"))
        elif not isinstance(image_id, (str, int)):
            problems.append(Problem(index, f"field 'image_id' must be a string, got {type(image_id).__name__}"))
        else:
            image, _ = _image(os.path.join("image", f"{image_id}.jpg"), resolver, problems, index)
        if len(problems) == before:
            prompt = instructions[index % len(instructions)].replace("<Img><ImageHere></Img>", "").strip()
            records.append(Record(index, prompt, caption, image))
    return records, problems


def read_conversations(data, resolver):
    records, problems = [], []
    for index, row in _object_rows(data, problems):
        before = len(problems)
        turns = row.get("conversations")
        if not isinstance(turns, list) or not turns:
            problems.append(Problem(index, "missing or empty 'conversations' list"))
            continue
        image, _ = _image(row.get("image"), resolver, problems, index)
        pairs = []
        if len(turns) % 2:
            problems.append(Problem(index, f"'conversations' has {len(turns)} turns; expected human/gpt pairs"))
        for k in range(0, len(turns) - 1, 2):
            human, gpt = turns[k], turns[k + 1]
            if not (isinstance(human, dict) and isinstance(gpt, dict)):
                problems.append(Problem(index, f"turn {k // 2}: turns must be objects with 'from' and 'value'"))
                continue
            if human.get("from") != "human" or gpt.get("from") not in ("gpt", "assistant"):
                problems.append(Problem(index, f"turn {k // 2}: expected from 'human' then 'gpt', got "
                                               f"{human.get('from')!r} then {gpt.get('from')!r}"))
                continue
            q = _text(human, "value", problems, f"{index}, turn {k // 2}")
            a = _text(gpt, "value", problems, f"{index}, turn {k // 2}")
            if q is not None and a is not None:
                pairs.append((q.replace("<image>", "").strip(), a))
        if len(problems) == before:
            for k, (q, a) in enumerate(pairs):
                records.append(Record(index if len(pairs) == 1 else f"{index}, turn {k}", q, a, image,
                                      history=list(pairs[:k])))
    return records, problems


def read_records(settings: DatasetSettings, path=None):
    """(json path, format, records, problems, number of rows) of the dataset, without tokenising."""
    json_path, data = locate(path or settings.path)
    fmt = settings.format
    if fmt == "auto":
        fmt = detect_format(data, json_path)
    if fmt not in FORMATS:
        raise DatasetFormatError(f"unknown dataset format {fmt!r}; choose auto or one of {', '.join(FORMATS)}")
    resolver = ImageResolver(json_path, settings.image_root)
    if fmt == "cc_sbu_align":
        if not isinstance(data, dict):
            raise DatasetFormatError(f"{json_path}: cc_sbu_align needs {{\"annotations\": [...]}}")
        records, problems = read_cc_sbu_align(data, resolver, list(settings.instructions))
        total = len(data.get("annotations") or [])
    else:
        if not isinstance(data, list):
            raise DatasetFormatError(f"{json_path}: the {fmt} format is a JSON list of rows")
        reader = read_fewshot if fmt == "fewshot" else read_conversations
        records, problems = reader(data, resolver)
        total = len(data)
    return json_path, fmt, records, problems, total


# ----------------------------------------------------------------------------------------- samples

class SampleBuilder:
    """Training rows of records through the family's prompt builder, checked against the length limits."""

    def __init__(self, processor, settings: DatasetSettings):
        self.builder = processor.prompt_builder
        self.tokenizer = processor.tokenizer
        self.settings = settings

    def build(self, record: Record):
        """(Sample or None, list of problem reasons, list of warnings)."""
        s = self.settings
        args = (record.prompt, record.label, record.history, record.image is not None, s.english)
        row = self.builder.training_sample(*args)
        over_source, over_target = row.source_length > s.max_source_length, row.target_length > s.max_target_length
        problems, warnings = [], []
        if (over_source or over_target) and s.truncate:
            cut = self.builder.training_sample(*args, max_source_length=s.max_source_length,
                                               max_target_length=s.max_target_length)
            if over_source:
                warnings.append(f"prompt cut from {row.source_length} to {cut.source_length} tokens")
            if over_target:
                warnings.append(f"label cut from {row.target_length} to {cut.target_length} tokens")
            row = cut
        else:
            if over_source:
                problems.append(f"the prompt needs {row.source_length} tokens (image placeholders and the "
                                f"prompt format's own ids included), more than max_source_length {s.max_source_length}")
            if over_target:
                problems.append(f"the label needs {row.target_length} tokens (with the format's end ids), more "
                                f"than max_target_length {s.max_target_length}")
        answer = [int(t) for t in self.tokenizer.encode(record.label, add_special_tokens=False)]
        if not answer:
            problems.append("the label encodes to no tokens")
        if problems:
            return None, problems, warnings
        decoded = self.tokenizer.decode(answer)
        if decoded != record.label and not s.truncate:
            warnings.append(f"the tokenizer does not reproduce the label exactly (decodes to {decoded!r})")
        elif self.builder.postprocess(record.label, english=s.english) != record.label:
            warnings.append("the chat answer clean-up (e.g. stripping; VisualGLM: full-width punctuation next to "
                            "CJK) changes this label, so a chat answer cannot equal it exactly")
        if row.image_start is not None:
            count = self.builder.num_image_tokens
            span = row.input_ids[row.image_start:row.image_start + count]  # the placeholders, unless cut
            if span != [self.builder.placeholder_id] * count or row.image_start + count > row.source_length:
                return None, ["the image placeholders do not fit max_source_length"], warnings
        return Sample(record.row, row.input_ids, row.labels, row.image_start, record.image, record), [], warnings


@dataclass
class FinetuneData:
    path: str
    format: str
    samples: List[Sample]
    warnings: List[Problem]
    total_rows: int


def load_dataset(settings: DatasetSettings, processor, path=None) -> FinetuneData:
    """Read, validate and tokenise the whole dataset; DatasetValidationError lists every bad row."""
    json_path, fmt, records, problems, total = read_records(settings, path)
    builder = SampleBuilder(processor, settings)
    samples, warnings = [], []
    for record in records:
        sample, reasons, notes = builder.build(record)
        problems += [Problem(record.row, reason) for reason in reasons]
        warnings += [Problem(record.row, note) for note in notes]
        if sample is not None:
            samples.append(sample)
    if problems:
        raise DatasetValidationError(json_path, problems, total)
    if not samples:
        raise DatasetValidationError(json_path, [Problem("-", "the dataset has no rows")], total)
    return FinetuneData(json_path, fmt, samples, warnings, total)


# ----------------------------------------------------------------------------------------- batches

class BatchSource:
    """Deterministic batches of padded arrays for one rank (see the module docstring)."""

    def __init__(self, data: FinetuneData, processor, positions, settings: DatasetSettings, batch_size,
                 seed=0, rank=0, world_size=1):
        self.samples = data.samples
        self.processor = processor
        self.positions = positions
        self.settings = settings
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.length = settings.max_length
        self.pad = processor.prompt_builder.pad_id
        self._orders: Dict[int, np.ndarray] = {}
        self._pixels: Dict[str, np.ndarray] = {}
        self._image_shape = None

    @property
    def global_batch(self):
        return self.batch_size * self.world_size

    def epoch_of(self, step):
        return (step * self.global_batch) // len(self.samples)

    def _order(self, epoch):
        if epoch not in self._orders:
            n = len(self.samples)
            if self.settings.shuffle:
                self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(n)
            else:
                self._orders[epoch] = np.arange(n)
            for old in [e for e in self._orders if e < epoch - 1]:
                del self._orders[old]
        return self._orders[epoch]

    def indices(self, step, rank=None):
        """Sample indices of `rank` (default: this rank) at `step`."""
        rank = self.rank if rank is None else rank
        n = len(self.samples)
        start = step * self.global_batch + rank * self.batch_size
        return [int(self._order(p // n)[p % n]) for p in range(start, start + self.batch_size)]

    def global_indices(self, step):
        return [i for r in range(self.world_size) for i in self.indices(step, r)]

    def _pixels_of(self, path):
        if path in self._pixels:
            return self._pixels[path]
        try:
            pixels = self.processor.preprocess_image(path)[0]
        except ImageLoadError as err:  # validated before, but files can change during a long run
            raise DatasetValidationError(path, [Problem("-", str(err))], 1) from err
        if len(self._pixels) < self.settings.cache_images:
            self._pixels[path] = pixels
        self._image_shape = pixels.shape
        return pixels

    def image_shape(self):
        if self._image_shape is None:
            size = self.processor.image_processor.size_hw
            self._image_shape = (3, size[0], size[1])
        return self._image_shape

    def batch(self, step):
        """The arrays of this rank at `step` (a dict of numpy arrays)."""
        chosen = [self.samples[i] for i in self.indices(step)]
        b, length = len(chosen), self.length
        input_ids = np.full((b, length), self.pad, np.int32)
        labels = np.full((b, length), IGNORE_INDEX, np.int32)
        valid = np.zeros((b,), np.int32)
        starts = np.full((b,), NO_IMAGE, np.int32)
        for k, sample in enumerate(chosen):
            n = len(sample.input_ids)
            input_ids[k, :n] = sample.input_ids
            labels[k, :n] = sample.labels
            valid[k] = n
            if sample.image_start is not None:
                starts[k] = sample.image_start
        types = token_types(chosen, length, self.processor.prompt_builder.num_image_tokens)  # [B,S], 1 = image row
        positions, prefix = self.positions.prompt([s.input_ids for s in chosen], length, types)
        shape = self.image_shape()
        pixels = np.zeros((b,) + tuple(shape), np.float32)
        for k, sample in enumerate(chosen):
            if sample.image is not None:
                pixels[k] = self._pixels_of(sample.image)
        global_tokens = sum(self.samples[i].num_target_tokens for i in self.global_indices(step))
        return {"input_ids": input_ids, "labels": labels, "pixel_values": pixels, "image_start": starts,
                "position_ids": positions.astype(np.int32), "valid_length": valid,
                "prefix_length": prefix.astype(np.int32), "token_types": types,
                # each rank divides its summed token losses by this; the data-parallel gradient mean then
                # gives exactly the mean over every target token of the global batch
                "token_scale": np.float32(max(global_tokens, 1) / self.world_size),
                "rows": [s.row for s in chosen]}


BATCH_KEYS = ("input_ids", "labels", "pixel_values", "image_start", "position_ids", "valid_length",
              "prefix_length", "token_types", "token_scale")

__all__ = ["DatasetSettings", "DatasetValidationError", "DatasetFormatError", "Problem", "Record", "Sample",
           "FinetuneData", "load_dataset", "read_records", "BatchSource", "BATCH_KEYS", "IGNORE_INDEX",
           "FORMATS", "DEFAULT_INSTRUCTIONS"]
