"""read_json: the one-line errors every user-supplied JSON file gets (rank tables, manifests, datasets)."""
import pytest

from visual_mllm.json_file import read_json


class Bad(ValueError):
    pass


def test_reads_a_file(tmp_path):
    (tmp_path / "a.json").write_text('{"x": [1, 2]}', encoding="utf-8")
    assert read_json(str(tmp_path / "a.json"), Bad) == {"x": [1, 2]}


@pytest.mark.parametrize("content, expected", [
    (None, "thing {path} not found"),
    (b'{\n  "x": 1,\n  oops\n}', "thing {path} is not valid JSON: line 3: "),
    (b'{"x": "\xff"}', "thing {path} is not UTF-8 text"),
])
def test_errors_name_the_file_and_line(tmp_path, content, expected):
    path = tmp_path / "t.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(Bad) as info:
        read_json(str(path), Bad, "thing")
    assert str(info.value).startswith(expected.format(path=path)), str(info.value)
