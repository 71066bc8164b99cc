"""The README's "use bkd_core in your own loop" section runs as written."""
import re

import torch

from conftest import REPO


def test_readme_library_snippet_runs(tmp_path, monkeypatch):
    text = (REPO / "README.md").read_text()
    section = text.split("## Use bkd_core in your own loop", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    state = torch.load(tmp_path / "student.pt", weights_only=True)
    assert any(k.endswith("weight") for k in state)


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci and "make test" in (REPO / "README.md").read_text()
