from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_exactly_the_readme_test_command() -> None:
    commands = [line.strip() for line in (ROOT / "README.md").read_text().splitlines()[:10] if line.startswith("    ")]
    assert len(commands) == 2, "the README must open with the two set-up commands"
    assert commands[0].endswith("ticketguard demo")
    assert commands[1].endswith("python -m pytest")
    assert commands[1] in (ROOT / ".ci" / "run").read_text().splitlines()
