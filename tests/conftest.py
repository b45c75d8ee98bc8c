"""Shared fixtures: the real digits data, a real CIFAR-10 JPEG subset and the Adi trigger set from ../shared.

The shared data sets are not part of a clone: where ``../shared/datasets`` is missing, the tests that need
them skip and say why. CI sets REQUIRE_SHARED_DATA (see .ci/run), which turns each such skip into a failure.
"""

from __future__ import annotations

import http.server
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from local_tsa import Authority, Behaviour, make_authority

from ticketguard.artifacts.ticket import Ticket
from ticketguard.core.masks import Mask, magnitude_prune, prunable_names
from ticketguard.data import ImageData, load_dataset
from ticketguard.data.cifar import load_image_folder
from ticketguard.models import build_model
from ticketguard.protect import TriggerConfig, keyed_trigger_for, protect
from ticketguard.search.config import SearchConfig
from ticketguard.search.imp import find_extreme_ticket
from ticketguard.training.loop import TrainConfig, evaluate, state_copy, train

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
CIFAR_JPEG = SHARED / "cifar10-jpeg" / "cifar10-jpeg.tar.gz"
ADI_TRIGGER_SET = SHARED / "adi-trigger-set"
REQUIRE_SHARED_DATA = "TICKETGUARD_REQUIRE_SHARED_DATA"
QUICK_SEARCH = SearchConfig(ratios=(0.5,), max_rounds=1, rewind_epoch=1, train=TrainConfig(epochs=4))


def shared_data(path: Path) -> Path:
    """``path`` under ../shared/datasets; a clear skip where it is missing, a failure where CI requires it."""
    if not path.exists():
        reason = f"needs the shared data set {path.relative_to(SHARED)} under {SHARED}, not in this checkout"
        if os.environ.get(REQUIRE_SHARED_DATA):
            pytest.fail(f"{reason} ({REQUIRE_SHARED_DATA} is set: CI must run every test)")
        pytest.skip(reason)
    return path


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def digits() -> ImageData:
    return load_dataset("digits")


@pytest.fixture(scope="session")
def cifar_jpeg_subset() -> ImageData:
    """40 training and 40 test images per class of the real CIFAR-10 JPEGs."""
    return load_image_folder(shared_data(CIFAR_JPEG), name="cifar10", per_class=40)


@pytest.fixture(scope="session")
def adi_trigger_set() -> Path:
    """Adi et al.'s trigger-set folder (pics/ and label files)."""
    return shared_data(ADI_TRIGGER_SET)


@pytest.fixture(scope="session")
def protected_owner(digits: ImageData, tmp_path_factory: pytest.TempPathFactory) -> tuple[Ticket, Path, ImageData]:
    """A protected digits ticket at 50 % of the weights (QR signature + keyed trigger set), its claim on disk,
    and the data it was trained on."""
    root = tmp_path_factory.mktemp("owner")
    data = digits.subset(80, 30, 0)
    ticket = find_extreme_ticket(data, QUICK_SEARCH, root / "search")
    protected = protect(ticket, data, signature="OWNER-1", trigger=TriggerConfig(keyed_trigger_for(ticket, 9), 16))
    protected.save(root / "protected", root / "claim.json")
    return protected.ticket, root / "claim.json", data


def trained_ticket(data: ImageData, seed: int, density: float = 0.3) -> Ticket:
    """A small real ticket: one epoch of training on digits, magnitude-pruned, rewind = initialisation."""
    torch.manual_seed(seed)
    model = build_model("resnet20", 1, 10)
    rewind = state_copy(model)
    train(model, data, TrainConfig(epochs=1, seed=seed))
    trained = state_copy(model)
    mask = magnitude_prune(trained, Mask.ones_like(trained, prunable_names(model)), 1 - density)
    mask.apply_(model)
    return Ticket(
        "resnet20",
        1,
        10,
        (8, 8),
        "digits",
        list(data.classes),
        mask,
        rewind,
        state_copy(model),
        evaluate(model, data),
    )


def untrained_ticket() -> Ticket:
    """A digits ResNet-20 ticket, untrained, at a random 30 % mask (``sparse_model``): made in a moment."""
    _, weights, mask = sparse_model("resnet20", 1)
    return Ticket("resnet20", 1, 10, (8, 8), "digits", [str(i) for i in range(10)], mask, weights, weights, 0.5)


def randomise_batchnorm(model: torch.nn.Module) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, so that transforms through BatchNorm are tested."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)


def sparse_model(
    name: str, in_channels: int, seed: int = 0
) -> tuple[torch.nn.Module, dict[str, torch.Tensor], Mask]:
    """A random model with non-trivial BatchNorm statistics and a random 30 % mask, in eval mode."""
    torch.manual_seed(seed)
    model = build_model(name, in_channels, 10)
    randomise_batchnorm(model)
    generator = torch.Generator().manual_seed(seed)
    shapes = {name: model.get_parameter(name).shape for name in prunable_names(model)}
    mask = Mask({name: torch.rand(shape, generator=generator) < 0.3 for name, shape in shapes.items()})
    mask.apply_(model)
    return model.eval(), {k: v.clone() for k, v in model.state_dict().items()}, mask


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Alignment is many small matrix products; on a shared CPU extra threads only wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def authority(tmp_path: Path) -> Authority:
    """A fresh CA and TSA certificate (see local_tsa.py)."""
    return make_authority(tmp_path / "tsa")


@pytest.fixture
def serve() -> Iterator[Callable[[Behaviour], str]]:
    """Start an HTTP server on 127.0.0.1 that answers each POST with ``behaviour``; yield its URL."""
    servers: list[http.server.ThreadingHTTPServer] = []
    released = threading.Event()

    def start(behaviour: Behaviour) -> str:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                behaviour(self, self.rfile.read(int(self.headers["Content-Length"])))

            def log_message(self, *args: object) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        server.released = released
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{server.server_address[1]}/tsa"

    yield start
    released.set()
    for server in servers:
        server.shutdown()
        server.server_close()
