"""write_atomic: the file appears whole or not at all; a failed write leaves the old file and no temporary."""
import pytest

from visual_mllm.atomic import write_atomic, write_text_atomic


def test_the_file_is_replaced_whole(tmp_path):
    path = tmp_path / "out.json"
    write_text_atomic(path, "old")
    assert write_text_atomic(path, "new") == path and path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_text("old")
    seen = []

    def write(tmp):
        seen.append(tmp)
        assert tmp.endswith(".ckpt")  # the extension is kept (MindSpore and PIL read it)
        with open(tmp, "w") as f:
            f.write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, write)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt"] and seen
