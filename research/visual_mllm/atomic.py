"""Writing a file so that it appears whole or not at all (a leaf module).

`write_atomic(path, write)` calls `write(temporary_path)` for a temporary name beside `path` that keeps
its extension (MindSpore appends ".ckpt" to names without it, PIL picks the format from it), then
renames it over `path`. After an error or Ctrl-C the temporary file is removed and an older `path` is
left as it was.
"""
import os


def write_atomic(path, write):
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, ".partial." + name)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_text_atomic(path, text):
    """write_atomic for UTF-8 text."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as file:
            file.write(text)
    return write_atomic(path, write)
