import collections
import json
import os

import pytest
import torch

from ticketguard.core.errors import InputError
from ticketguard.core.files import (
    atomic_path,
    check_json,
    load_tensors,
    prepare_output,
    read_json,
    save_tensors,
    staged_folder,
)


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/ticketguard-pwned",))


def test_checkpoint_with_pickled_code_is_refused_not_executed(tmp_path) -> None:
    torch.save({"weight": torch.ones(2), "evil": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(InputError, match="refused"):
        load_tensors(tmp_path / "evil.pt")
    assert not os.path.exists("/tmp/ticketguard-pwned")


def test_wrapped_state_dicts_are_unwrapped_and_non_tensors_refused(tmp_path) -> None:
    torch.save({"state_dict": {"module.w": torch.ones(2)}}, tmp_path / "wrapped.pt")
    assert list(load_tensors(tmp_path / "wrapped.pt")) == ["w"]
    torch.save(collections.OrderedDict(w=torch.ones(1), step=3), tmp_path / "mixed.pt")
    with pytest.raises(InputError, match="not named tensors"):
        load_tensors(tmp_path / "mixed.pt")


def test_malformed_safetensors_gets_a_clear_error(tmp_path) -> None:
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(InputError, match="not a readable safetensors"):
        load_tensors(tmp_path / "bad.safetensors")


def test_atomic_write_leaves_nothing_when_interrupted(tmp_path) -> None:
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_saved_tensors_are_contiguous_copies(tmp_path) -> None:
    tensor = torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last)
    save_tensors(tmp_path / "t.safetensors", {"x": tensor})
    assert torch.equal(load_tensors(tmp_path / "t.safetensors")["x"], tensor)


def test_a_file_that_is_no_checkpoint_is_reported_as_unreadable_not_as_code(tmp_path) -> None:
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(InputError, match="not a readable torch file") as caught:
        load_tensors(tmp_path / "notes.pt")
    assert "refused" not in str(caught.value) and len(str(caught.value)) < 200


def test_staged_folder_replaces_a_folder_whole_or_not_at_all(tmp_path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), staged_folder(target) as staging:
        (staging / "new.txt").write_text("half")
        raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (target / "old.txt").read_text() == "old"
    with staged_folder(target) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in target.iterdir()] == ["new.txt"]


def test_output_check_clears_leftovers_and_keeps_real_files(tmp_path) -> None:
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / ".w.safetensors.a1.tmp").write_bytes(b"half")
    (tmp_path / ".out.b2.tmp").mkdir()
    prepare_output(out, force=False, folder=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and not any(out.iterdir())
    (out / "mine.txt").write_text("keep")
    with pytest.raises(InputError, match="not empty"):
        prepare_output(out, force=False, folder=True)
    with pytest.raises(InputError, match="is a folder"):
        prepare_output(out, force=True)
    assert (out / "mine.txt").read_text() == "keep"


def test_json_checks_want_real_integers_finite_numbers_and_shallow_nesting(tmp_path) -> None:
    with pytest.raises(InputError, match="3.0 is not of type 'integer'"):
        check_json({"n": 3.0}, {"properties": {"n": {"type": "integer"}}}, "x")
    with pytest.raises(InputError, match="holds the number nan"):
        check_json([1, [float("nan")]], {}, "x")
    with pytest.raises(InputError, match="nests deeper"):
        check_json(json.loads("[" * 40 + "]" * 40), {}, "x")
    (tmp_path / "big.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(InputError, match="deeper than Python can read"):
        read_json(tmp_path / "big.json")
