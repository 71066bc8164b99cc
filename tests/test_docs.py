"""The README and the docs site: the front door's links resolve, the library guide's snippet runs as
written, the site builds strictly, and the text speaks of the product only."""
import re
import shutil
import subprocess

import pytest
import torch
from conftest import REPO

DOCS = REPO / "docs"


def test_the_library_guide_snippet_runs(tmp_path, monkeypatch):
    text = (DOCS / "guides" / "library.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, flags=re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/guides/library.md", "exec"), {})
    state = torch.load(tmp_path / "student.pt", weights_only=True)
    assert any(k.endswith("weight") for k in state)


def test_the_readme_is_a_front_door_whose_links_resolve():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    for needed in ("make setup", "make demo", "data=image_folder", "pair.teacher=", "ray job submit", "orchestrator.compare"):
        assert needed in text, needed
    links = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text)
    assert len(links) >= 10
    for link in links:
        assert (REPO / link).exists(), link


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    makefile = (REPO / "Makefile").read_text()
    assert "make test" in ci and "make test" in (REPO / "README.md").read_text()
    assert "mkdocs build --strict" in makefile and "orchestrator.reference --check" in makefile


@pytest.mark.skipif(shutil.which("mkdocs") is None and not (REPO / ".venv" / "bin" / "mkdocs").exists(),
                    reason="mkdocs is not installed (pip install -e '.[docs]')")
def test_the_site_builds_strictly(tmp_path):
    mkdocs = shutil.which("mkdocs") or str(REPO / ".venv" / "bin" / "mkdocs")
    done = subprocess.run([mkdocs, "build", "--strict", "--quiet", "--site-dir", str(tmp_path / "site")], cwd=REPO,
                          capture_output=True, text=True, env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    api = (tmp_path / "site" / "reference" / "api" / "index.html").read_text()
    assert "stepping" in api.lower() and "BlockKD" in api  # docstrings rendered


WORDS = re.compile(r"\bissue \d|\bissues? #|\bsession\b(?!_latest)|\bwe could not\b|\blent\b|\bthe issue's\b", re.I)


def test_user_facing_text_speaks_of_the_product_only():
    files = [REPO / "README.md", *DOCS.rglob("*.md"), *(REPO / "cluster").rglob("*.md")]
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            assert not WORDS.search(line), f"{path.relative_to(REPO)}:{number}: {line}"
