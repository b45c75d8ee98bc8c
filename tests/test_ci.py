"""CI and a fresh clone: tests on the shared data skip, saying why, without it; CI never lets them skip."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REQUIRE_SHARED_DATA, SHARED, shared_data

ROOT = Path(__file__).resolve().parents[1]


def test_missing_shared_data_skips_with_its_path_on_a_fresh_clone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(REQUIRE_SHARED_DATA, raising=False)
    with pytest.raises(pytest.skip.Exception, match="shared data set no-such-set under .*not in this checkout"):
        shared_data(SHARED / "no-such-set")


def test_missing_shared_data_fails_where_ci_requires_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REQUIRE_SHARED_DATA, "1")
    with pytest.raises(pytest.fail.Exception, match="CI must run every test"):
        shared_data(SHARED / "no-such-set")


def test_ci_checks_the_shared_data_and_requires_it_before_the_test_command() -> None:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    test_command = next(i for i, line in enumerate(lines) if line.endswith("python -m pytest"))
    checks = "\n".join(lines[:test_command])
    assert "../shared/datasets/cifar10-jpeg" in checks and "../shared/datasets/adi-trigger-set" in checks
    assert "exit 1" in checks
    assert f"export {REQUIRE_SHARED_DATA}=1" in lines[:test_command]
