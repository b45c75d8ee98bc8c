import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_exactly_the_readme_test_command() -> None:
    commands = [line.strip() for line in (ROOT / "README.md").read_text().splitlines()[:10] if line.startswith("    ")]
    assert len(commands) == 2, "the README must open with the two set-up commands"
    assert commands[0].endswith("ticketguard demo")
    assert commands[1].endswith("python -m pytest")
    assert commands[1] in (ROOT / ".ci" / "run").read_text().splitlines()


@pytest.mark.slow
def test_the_from_python_block_runs_as_written_and_shows_ownership(tmp_path: Path, capsys, monkeypatch) -> None:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## From Python"):]
    block = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})  # noqa: S102  (the README's own example)
    assert (tmp_path / "runs" / "python" / "owner.claim.json").is_file()
    assert capsys.readouterr().out.startswith("ownership shown")


@pytest.mark.slow
def test_the_your_own_model_block_runs_with_a_users_module_beside_it(tmp_path: Path, capsys, monkeypatch) -> None:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Your own model"):]
    block = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    package = tmp_path / "mypackage"
    package.mkdir()
    (package / "nets.py").write_text((ROOT / "tests" / "zoo.py").read_text())  # a module the user wrote
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "mypackage", raising=False)
    monkeypatch.delitem(sys.modules, "mypackage.nets", raising=False)
    exec(compile(block, "README.md", "exec"), {})  # noqa: S102  (the README's own example)
    assert capsys.readouterr().out.startswith("ownership shown")
