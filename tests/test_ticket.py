from pathlib import Path

import pytest
import torch

from ticketguard.artifacts.ticket import MASK_FILE, WEIGHTS_FILE, Ticket
from ticketguard.core.errors import InputError
from ticketguard.core.files import save_tensors
from ticketguard.core.masks import Mask, magnitude_prune, prunable_names
from ticketguard.models import build_model


def make_ticket() -> Ticket:
    model = build_model("resnet20", 1, 10)
    rewind = {k: v.clone() for k, v in model.state_dict().items()}
    params = {k: v.detach() for k, v in model.named_parameters()}
    mask = magnitude_prune(params, Mask.ones_like(params, prunable_names(model)), 0.5)
    mask.apply_(model)
    return Ticket("resnet20", 1, 10, (8, 8), "digits", [str(i) for i in range(10)], mask, rewind,
                  model.state_dict(), accuracy=0.9, metadata={"note": "x"})


def test_ticket_round_trips_bit_for_bit(tmp_path: Path) -> None:
    ticket = make_ticket()
    ticket.save(tmp_path / "t")
    loaded = Ticket.load(tmp_path / "t")
    assert loaded.mask == ticket.mask
    assert all(torch.equal(loaded.weights[k], ticket.weights[k]) for k in ticket.weights)
    assert all(torch.equal(loaded.rewind[k], ticket.rewind[k]) for k in ticket.rewind)
    assert loaded.accuracy == 0.9 and loaded.metadata == {"note": "x"} and loaded.input_size == (8, 8)
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == [
        "mask.safetensors", "rewind.safetensors", "ticket.json", "weights.safetensors"]


def test_tampered_tensor_file_is_refused(tmp_path: Path) -> None:
    ticket = make_ticket()
    ticket.save(tmp_path)
    weights = dict(ticket.weights)
    weights["fc.weight"] = weights["fc.weight"] + 1
    save_tensors(tmp_path / WEIGHTS_FILE, weights)
    with pytest.raises(InputError, match="sha256"):
        Ticket.load(tmp_path)


def test_missing_manifest_and_missing_files_are_reported(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a ticket folder"):
        Ticket.load(tmp_path)
    make_ticket().save(tmp_path)
    (tmp_path / MASK_FILE).unlink()
    with pytest.raises(InputError, match="missing"):
        Ticket.load(tmp_path)


def test_mask_of_the_wrong_shape_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    ticket = make_ticket()
    ticket.mask = Mask({"blocks.0.conv1.weight": torch.ones(16, 16, 1, 1)})
    with pytest.raises(InputError, match="shape"):
        ticket.save(tmp_path / "t")
    assert not (tmp_path / "t").exists()
