"""Reading a JSON file a user handed us, with errors that name the file and the line."""
import json
import os


def read_json(path, error, what="file"):
    """The JSON value in `path`. A missing file, invalid JSON or text that is not UTF-8 raises
    `error` (an exception class) with a one-line message naming `what`, the path and, for JSON, the line."""
    if not os.path.isfile(path):
        raise error(f"{what} {path} not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise error(f"{what} {path} is not valid JSON: line {err.lineno}: {err.msg}") from err
    except UnicodeDecodeError as err:
        raise error(f"{what} {path} is not UTF-8 text: {err}") from err
