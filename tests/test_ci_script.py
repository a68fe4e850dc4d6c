"""`.ci/run` runs the README's set-up commands as written: the README's first code block, line for line."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def readme_setup_commands():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    fences = [i for i, line in enumerate(lines) if line.startswith("```")]
    return [line for line in lines[fences[0] + 1:fences[1]] if line.strip()]


def ci_commands():
    lines = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line.startswith("python")]


def test_ci_runs_the_readme_commands():
    readme = readme_setup_commands()
    assert len(readme) == 2 and readme[1].endswith("python -m pytest tests -q"), readme
    assert ci_commands() == readme


def test_ci_installs_the_browser_the_page_test_drives():
    """tests/test_server_page.py skips without /usr/bin/chromium: CI, on a fresh machine, must install it."""
    page_test = (REPO / "tests" / "test_server_page.py").read_text(encoding="utf-8")
    assert 'CHROMIUM = "/usr/bin/chromium"' in page_test
    script = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert "[ -x /usr/bin/chromium ] ||" in script and "apt-get install -y -qq chromium" in script
