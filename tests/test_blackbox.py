import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ticketguard.blackbox import Endpoint, ModelServer, load_served_model, query_labels
from ticketguard.claim import Claim, load_claim, save_claim, sign, ticket_hashes
from ticketguard.cli import main
from ticketguard.data import ImageData
from ticketguard.errors import InputError
from ticketguard.files import read_json, save_tensors
from ticketguard.masks import Mask, magnitude_prune, prunable_names
from ticketguard.models import build_model
from ticketguard.training import predict_labels
from ticketguard.ticket import Ticket
from ticketguard.training import TrainConfig, state_copy, train

SERVER_START_S = 60


@pytest.fixture(scope="module")
def tickets(digits: ImageData, tmp_path_factory) -> dict[str, Path]:
    """An unmarked sparse digits ticket, and the same ticket watermarked by the CLI with keyed triggers."""
    root = tmp_path_factory.mktemp("tickets")
    torch.manual_seed(0)
    model = build_model("resnet20", 1, 10)
    params = {k: v.detach() for k, v in model.named_parameters()}
    mask = magnitude_prune(params, Mask.ones_like(params, prunable_names(model)), 0.7)
    rewind = state_copy(model)
    accuracy = train(model, digits, TrainConfig(epochs=5), mask).accuracy
    Ticket(
        "resnet20", 1, 10, (8, 8), "digits", list(digits.classes), mask, rewind, state_copy(model), accuracy
    ).save(root / "plain")
    code = main(
        [
            "watermark",
            str(root / "plain"),
            "--out",
            str(root / "marked"),
            "--claim",
            str(root / "claim.json"),
            "--trigger-seed",
            "31337",
            "--per-batch",
            "32",
            "--epochs",
            "10",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    return {"plain": root / "plain", "marked": root / "marked", "claim": root / "claim.json"}


@contextmanager
def served_by_cli(ticket: Path) -> Iterator[str]:
    """``ticketguard serve`` in a child process on an OS-chosen loopback port; stopped on exit."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "300"}
    child = subprocess.Popen(
        [sys.executable, "-m", "ticketguard", "serve", str(ticket), "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + SERVER_START_S
        url = None
        while url is None and time.monotonic() < deadline:
            line = child.stderr.readline()
            assert line, "the server exited before it listened"
            found = re.search(r"(http://127\.0\.0\.1:\d+)", line)
            url = found.group(1) if found else None
        assert url is not None
        yield url
    finally:
        child.terminate()
        child.wait(timeout=30)


def test_cli_serve_and_query_show_ownership_of_the_marked_ticket_only(tickets, capsys) -> None:
    claim = read_json(tickets["claim"])["extensions"]["trigger"]
    assert claim["kind"] == "keyed" and claim["seed"] == 31337 and len(claim["labels"]) == 100
    with served_by_cli(tickets["marked"]) as url:
        assert httpx.get(f"{url}/v2/health/ready").json() == {"ready": True}
        capsys.readouterr()
        assert main(["query", url, "--claim", str(tickets["claim"]), "--json"]) == 0
        verdict = json.loads(capsys.readouterr().out)
    assert verdict["owned"] and verdict["evidence"][0]["p_value"] < 1e-6
    with served_by_cli(tickets["plain"]) as url:
        assert main(["query", url, "--claim", str(tickets["claim"]), "--json"]) == 1
        verdict = json.loads(capsys.readouterr().out)
    assert not verdict["owned"] and verdict["evidence"][0]["p_value"] > 1e-3


@pytest.fixture(scope="module")
def server(tickets) -> Iterator[ModelServer]:
    with ModelServer(load_served_model(tickets["marked"]), port=0) as running:
        yield running


def test_v2_and_plain_json_queries_return_the_local_predictions(tickets, server, digits: ImageData) -> None:
    images = digits.test_images[:23]
    mean, std = digits.channel_stats()
    local = predict_labels(Ticket.load(tickets["marked"]).build_model(), images, mean, std)
    by_v2 = query_labels(Endpoint(server.url, batch_size=5), images)
    by_labels = query_labels(Endpoint(server.url, output_name="label", batch_size=23), images)
    by_json = query_labels(Endpoint(server.url, protocol="json", batch_size=10), images)
    assert torch.equal(by_v2, local) and torch.equal(by_labels, local) and torch.equal(by_json, local)


def test_metadata_describes_the_served_input(server) -> None:
    metadata = httpx.get(f"{server.url}/v2/models/ticket").json()
    assert metadata["inputs"][0]["shape"] == [-1, 1, 8, 8]
    assert [o["name"] for o in metadata["outputs"]] == ["logits", "label"]
    assert httpx.get(f"{server.url}/v2/health/live").json() == {"live": True}


def test_server_refuses_input_of_the_wrong_shape(server) -> None:
    with pytest.raises(InputError, match=r"HTTP 400.*shape \[B, 1, 8, 8\]"):
        query_labels(Endpoint(server.url), torch.zeros(2, 3, 8, 8, dtype=torch.uint8))


@contextmanager
def fake_api(respond) -> Iterator[tuple[str, list[int]]]:
    """A server whose POST answers come from ``respond(call_index)`` -> (status, body bytes, delay)."""
    calls: list[int] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            calls.append(len(calls))
            status, body, delay = respond(len(calls) - 1)
            time.sleep(delay)
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", calls
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


IMAGES = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)


def _v2_body(labels: list[int]) -> bytes:
    return json.dumps(
        {"outputs": [{"name": "label", "shape": [len(labels)], "datatype": "INT64", "data": labels}]}
    ).encode()


def test_overloaded_server_is_retried_a_bounded_number_of_times() -> None:
    with fake_api(lambda i: (503, b"busy", 0) if i < 2 else (200, _v2_body([1, 2, 3, 4]), 0)) as (url, calls):
        assert query_labels(Endpoint(url, retries=2), IMAGES).tolist() == [1, 2, 3, 4]
        assert len(calls) == 3
    with fake_api(lambda i: (503, b"busy", 0)) as (url, calls):
        with pytest.raises(InputError, match="HTTP 503 after 2 attempts"):
            query_labels(Endpoint(url, retries=1), IMAGES)
        assert len(calls) == 2


def test_slow_server_times_out_with_a_clear_error() -> None:
    with fake_api(lambda i: (200, _v2_body([0, 0, 0, 0]), 1.0)) as (url, _):
        with pytest.raises(InputError, match="no answer .* within 0.2 s after 1 attempts"):
            query_labels(Endpoint(url, timeout_s=0.2, retries=0), IMAGES)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"<html>oops</html>", "not JSON"),
        (b'{"result": 1}', "no 'outputs' list"),
        (_v2_body([1, 2, 3]), "3 predictions for 4 images"),
        (json.dumps({"outputs": [{"shape": [4, 2], "data": [0.1] * 7}]}).encode(), "7 numbers"),
        (_v2_body([0.5, 1, 2, 3]), "labels"),
    ],
)
def test_malformed_answers_are_refused(body: bytes, message: str) -> None:
    with fake_api(lambda i: (200, body, 0)) as (url, _), pytest.raises(InputError, match=message):
        query_labels(Endpoint(url, retries=0), IMAGES)


def test_partial_answer_in_a_later_batch_is_not_counted() -> None:
    with fake_api(lambda i: (200, _v2_body([7, 7]), 0) if i == 0 else (500, b"crash", 0)) as (url, calls):
        with pytest.raises(InputError, match="HTTP 500"):
            query_labels(Endpoint(url, batch_size=2), IMAGES)
        assert len(calls) == 2


def test_plain_json_field_names_are_configurable() -> None:
    body = json.dumps({"scores": [[0, 1], [1, 0], [0, 1], [0, 1]]}).encode()
    with fake_api(lambda i: (200, body, 0)) as (url, _):
        endpoint = Endpoint(
            f"{url}/predict", protocol="json", request_field="images", response_field="scores"
        )
        assert query_labels(endpoint, IMAGES).tolist() == [1, 0, 1, 1]


def test_query_of_an_unreachable_server_exits_2(tickets, unused_port: int) -> None:
    url = f"http://127.0.0.1:{unused_port}"
    assert main(["query", url, "--claim", str(tickets["claim"]), "--retries", "0"]) == 2


@pytest.fixture
def unused_port() -> int:
    with ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler) as probe:
        return probe.server_address[1]


def test_watermark_extends_an_unsigned_claim_and_refuses_a_signed_one(tickets, tmp_path: Path) -> None:
    path = tmp_path / "claim.json"
    save_claim(path, Claim(signature=None, ticket_files={}, extensions={"other": {"payload": "me"}}))
    args = ["watermark", str(tickets["plain"]), "--claim", str(path), "--trigger-seed", "5", "--epochs", "1"]
    args += ["--train-per-class", "5", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    extended = load_claim(path)
    assert extended.extensions["other"] == {"payload": "me"} and extended.extensions["trigger"]["seed"] == 5
    assert extended.ticket_files == ticket_hashes(tmp_path / "a")
    save_claim(path, sign(extended, Ed25519PrivateKey.generate()))
    before = path.read_text()
    assert main([*args, "--out", str(tmp_path / "b")]) == 2
    assert path.read_text() == before and not (tmp_path / "b").exists()


def test_query_refuses_a_claim_changed_after_signing(tickets, server, tmp_path: Path) -> None:
    claim = sign(load_claim(tickets["claim"]), Ed25519PrivateKey.generate())
    claim.extensions["trigger"]["chance_model"] = "uniform"
    save_claim(tmp_path / "claim.json", claim)
    assert main(["query", server.url, "--claim", str(tmp_path / "claim.json")]) == 2


def test_watermark_needs_exactly_one_trigger_source(tickets, tmp_path: Path) -> None:
    args = [
        "watermark",
        str(tickets["plain"]),
        "--claim",
        str(tmp_path / "c.json"),
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(args) == 2
    assert main([*args, "--trigger-seed", "1", "--trigger", str(tmp_path)]) == 2


def test_a_plain_model_file_is_served_with_the_given_normalisation(tickets, tmp_path: Path, digits) -> None:
    ticket = Ticket.load(tickets["marked"])
    save_tensors(tmp_path / "model.safetensors", ticket.weights)
    mean, std = digits.channel_stats()
    with pytest.raises(InputError, match="needs --input-size, --mean and --std"):
        load_served_model(tmp_path / "model.safetensors")
    served = load_served_model(
        tmp_path / "model.safetensors", input_size=8, mean=mean.tolist(), std=std.tolist()
    )
    images = digits.test_images[:40]
    with ModelServer(served, port=0) as running:
        answered = query_labels(Endpoint(running.url), images)
    assert torch.equal(answered, predict_labels(ticket.build_model(), images, mean, std))
