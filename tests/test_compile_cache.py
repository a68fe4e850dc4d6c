"""The compile cache's folders: one per run description, the least recently used pruned (no MindSpore run;
tests/test_cli.py runs the demo twice through the cache)."""
import os

from visual_mllm import compile_cache


def test_one_folder_per_run_description_and_old_folders_pruned(tmp_path, monkeypatch):
    monkeypatch.setenv("VISUAL_MLLM_CACHE", str(tmp_path))
    for name in ("MS_COMPILER_CACHE_PATH", "MS_COMPILER_CACHE_ENABLE"):  # set by enable: undone after the test
        monkeypatch.setenv(name, "")
    run = {"batch_size": 1, "requests": [{"prompt": "a"}]}
    first = compile_cache.enable(run)
    assert os.environ["MS_COMPILER_CACHE_PATH"] == first and os.environ["MS_COMPILER_CACHE_ENABLE"] == "1"
    assert compile_cache.folder_for(dict(run)) == first
    assert compile_cache.folder_for({**run, "batch_size": 2}) != first
    assert compile_cache.folder_for({**run, "requests": [{"prompt": "b"}]}) != first
    others = [compile_cache.enable({"n": n}) for n in range(compile_cache.KEEP - 1)]
    assert sorted(os.listdir(tmp_path / "compile")) == sorted(map(os.path.basename, others + [first]))
    os.utime(first, ns=(1, 1))  # used longest ago
    newest = compile_cache.enable({"n": "one more"})
    assert sorted(os.listdir(tmp_path / "compile")) == sorted(map(os.path.basename, others + [newest]))
