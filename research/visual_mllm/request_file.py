"""Requests as JSON objects: reading a JSONL file of them, and writing one result record per request.

One request per line:

    {"image": "path or omitted for text-only", "prompt": "...", "history": [["q", "a"], ...], "english": false,
     "template": "vqa"}

("template": a prompt template of the model's family, e.g. CogVLM's chat / vqa / base; omitted = the family's
default, or run_infer.py's --template.)

Relative image paths are taken from the JSONL file's folder. Blank lines are skipped. A result record
is the request's fields as given plus "response", "generated_ids" and "timings".
"""
import json
import os
from typing import List, Tuple

from .inference import ChatRequest, ChatResult

REQUEST_FIELDS = ("image", "prompt", "history", "english", "template")


class RequestFileError(ValueError):
    """A request file or one of its lines is not usable; the message names the file and line."""


def request_from_fields(fields, base_dir=".", origin=None, default_english=False, default_template=None) -> ChatRequest:
    """A ChatRequest from a dict of REQUEST_FIELDS; ValueError (prefixed with `origin`) if it is malformed
    or its image file does not exist."""
    where = f"{origin}: " if origin else ""
    if not isinstance(fields, dict):
        raise RequestFileError(f"{where}expected a JSON object with {', '.join(REQUEST_FIELDS)}, "
                               f"got {type(fields).__name__}")
    unknown = sorted(set(fields) - set(REQUEST_FIELDS))
    if unknown:
        raise RequestFileError(f"{where}unknown field(s) {', '.join(unknown)} (allowed: {', '.join(REQUEST_FIELDS)})")
    prompt = fields.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise RequestFileError(f"{where}\"prompt\" must be a non-empty string")
    image = fields.get("image")
    if image is not None:
        if not isinstance(image, str) or not image:
            raise RequestFileError(f"{where}\"image\" must be a file path (omit it or use null for text-only)")
        image = os.path.join(base_dir, os.path.expanduser(image))
        if not os.path.isfile(image):
            raise RequestFileError(f"{where}image file not found: {image}")
    history = fields.get("history", [])
    if not isinstance(history, list) or not all(
            isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn) for turn in history):
        raise RequestFileError(f"{where}\"history\" must be a list of [question, answer] string pairs")
    english = fields.get("english", default_english)
    if not isinstance(english, bool):
        raise RequestFileError(f"{where}\"english\" must be true or false")
    template = fields.get("template", default_template)
    if template is not None and (not isinstance(template, str) or not template):
        raise RequestFileError(f"{where}\"template\" must be a template name (a string) or null")
    return ChatRequest(prompt=prompt, image=image, history=[tuple(turn) for turn in history], english=english,
                       origin=origin, template=template)


def read_requests(path, default_english=False, default_template=None) -> List[Tuple[dict, ChatRequest]]:
    """(fields as given, ChatRequest) for every non-blank line of a JSONL file, in order."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--input_file: file not found: {path}")
    base_dir = os.path.dirname(os.path.abspath(path))
    out = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            origin = f"{path} line {number}"
            try:
                fields = json.loads(line)
            except json.JSONDecodeError as err:
                raise RequestFileError(f"{origin}: not valid JSON ({err.msg} at column {err.colno})") from err
            out.append((fields, request_from_fields(fields, base_dir, origin, default_english, default_template)))
    if not out:
        raise RequestFileError(f"{path}: no requests (the file has no non-blank lines)")
    return out


def result_record(fields: dict, result: ChatResult) -> dict:
    """The output record of one request: its fields, then response, generated_ids and timings."""
    record = dict(fields)
    record["response"] = result.response
    record["generated_ids"] = [int(i) for i in result.generated_ids]
    record["timings"] = result.timings.as_dict() if result.timings is not None else None
    return record


# Characters that json.dumps(ensure_ascii=False) leaves raw but that str.splitlines() (and JavaScript)
# treat as line breaks: escaped, so that a record stays one line for every JSONL reader.
_LINE_BREAKS = {"\u0085": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def write_record(file, record):
    """Append `record` as one JSONL line (UTF-8 text; model output may hold any character)."""
    text = json.dumps(record, ensure_ascii=False)
    for char, escaped in _LINE_BREAKS.items():
        text = text.replace(char, escaped)
    file.write(text + "\n")
    file.flush()
