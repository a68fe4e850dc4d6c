"""A non-editable install (`pip install .`, no -e) into a fresh virtual environment runs the demo from any
folder through its installed command: the demo's YAML, LoRA, tokenizer and image ship in the package.

The new environment borrows this one's dependencies (a path line in a .pth file) instead of downloading
them, and the package is built from a copy of the sources, so that the checkout gets no build files."""
import os
import shutil
import subprocess
import sys
import sysconfig

from conftest import REPO_ROOT


def test_installed_command_runs_the_demo_from_an_empty_folder(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(REPO_ROOT / "research", source / "research", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO_ROOT / "setup.py", source / "setup.py")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(site, "borrowed_dependencies.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")  # a path line: this venv's own .pth files stay unread
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VISUAL_MLLM_HOME", "LOCAL_DEFAULT_PATH")}
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(source)],
                   check=True, env=env, cwd=tmp_path, capture_output=True)
    work = tmp_path / "work"
    work.mkdir()
    env["VISUAL_MLLM_CACHE"] = str(tmp_path / "cache")
    result = subprocess.run([str(venv / "bin" / "visual-mllm-infer"), "--max_new_tokens", "8"], cwd=work, env=env,
                            capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    request, answer = result.stdout.splitlines()
    assert request.startswith(f"[image: {site}{os.sep}visual_mllm{os.sep}assets{os.sep}demo{os.sep}chelsea.png]")
    assert answer.startswith("answer: 一只虎斑猫")
    assert os.listdir(work) == []
    # the server's command is installed too, with its web page inside the package
    assert os.path.isfile(os.path.join(site, "visual_mllm", "serve", "static", "index.html"))
    served = subprocess.run([str(venv / "bin" / "visual-mllm-server"), "--help"], cwd=work, env=env,
                            capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert served.returncode == 0 and "--max_batch_size" in served.stdout, served.stderr
