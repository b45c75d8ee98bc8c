import contextlib
import dataclasses
import http.client
import json
import os
import re
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from local_tsa import tsa_answering
from test_forgery import forged_folder_claim
from torch import nn

from ticketguard.artifacts.ticket import Ticket
from ticketguard.cli import main
from ticketguard.core.errors import InputError
from ticketguard.core.files import read_json, save_tensors
from ticketguard.core.masks import Mask, magnitude_prune, prunable_names
from ticketguard.data import ImageData
from ticketguard.models import build_model
from ticketguard.training.loop import TrainConfig, predict_labels, state_copy, train
from ticketguard.verification.blackbox import (
    Endpoint,
    ModelServer,
    ServedModel,
    ServerLimits,
    load_served_model,
    query_labels,
)
from ticketguard.verification.claim import load_claim, save_claim, sign, ticket_hashes
from ticketguard.verification.verify import verify_endpoint

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


def test_query_refuses_a_forged_folder_claim_labelled_with_the_apis_own_answers(tickets, digits, tmp_path,
                                                                               authority, serve, capsys) -> None:
    """A forger labels random images with the served model's answers and dates his claim 2020: 100/100 agree,
    yet folder labels are free to choose, so without a trusted time they never decide. Stamped now, the same
    claim holds, but only against copies published after its stamp, and the verdict says so."""
    claim = forged_folder_claim(Ticket.load(tickets["plain"]).weights, digits, tmp_path)
    (tmp_path / "chain.pem").write_bytes(authority.tsa_pem + authority.ca_pem)
    with ModelServer(load_served_model(tickets["plain"]), port=0) as running:
        capsys.readouterr()
        assert main(["query", running.url, "--claim", str(claim), "--json"]) == 1
        verdict = json.loads(capsys.readouterr().out)
        assert main(["timestamp", str(claim), "--tsa", serve(tsa_answering(authority))]) == 0
        assert main(["query", running.url, "--claim", str(claim), "--tsa-cert", str(tmp_path / "chain.pem"),
                     "--json"]) == 0
        stamped = json.loads(capsys.readouterr().out)
    evidence = verdict["evidence"][0]
    assert not verdict["owned"] and evidence["details"]["agreed"] == 100 and not evidence["decides_alone"]
    assert stamped["trusted_time"]["holds_against"].startswith("copies first published after")


def relabelled_served(ticket: Path, order: torch.Tensor) -> ServedModel:
    """The ticket served with its classifier rows permuted: its API answers order^-1 of the ticket's labels."""
    served = load_served_model(ticket)
    with torch.no_grad():
        served.model.fc.weight.copy_(served.model.fc.weight[order])
        served.model.fc.bias.copy_(served.model.fc.bias[order])
    return served


def test_query_shows_a_relabelled_copy_of_the_marked_ticket_and_not_a_relabelled_innocent(tickets) -> None:
    order = torch.randperm(10, generator=torch.Generator().manual_seed(5))
    found = {}
    for name in ("marked", "plain"):
        with ModelServer(relabelled_served(tickets[name], order), port=0) as running:
            found[name] = verify_endpoint(Endpoint(running.url), tickets["claim"])
    marked, plain = (found[name].evidence[0] for name in ("marked", "plain"))
    assert found["marked"].owned and marked.details["relabelled"] and marked.p_value < 1e-6
    assert marked.details["as_labelled"]["p_value"] > 1e-3  # read as labelled, the relabelled copy looks innocent
    assert not found["plain"].owned and plain.p_value > 1e-3


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
    with (
        fake_api(lambda i: (200, _v2_body([0, 0, 0, 0]), 1.0)) as (url, _),
        pytest.raises(InputError, match="no complete answer .* within 0.2 s after 1 attempts"),
    ):
        query_labels(Endpoint(url, timeout_s=0.2, retries=0), IMAGES)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"<html>oops</html>", "not JSON"),
        (b'{"result": 1}', "no 'outputs' list"),
        (_v2_body([1, 2, 3]), "3 predictions for 4 images"),
        (json.dumps({"outputs": [{"shape": [4, 2], "data": [0.1] * 7}]}).encode(), "7 numbers"),
        (_v2_body([0.5, 1, 2, 3]), "labels"),
        (json.dumps({"outputs": [{"shape": [2**32, 2**32], "data": []}]}).encode(), "holds 0 numbers"),
        (json.dumps({"outputs": [{"shape": [-2, -2], "data": [1, 2, 3, 4]}]}).encode(), "non-negative"),
        (b'{"outputs": [{"shape": [4], "data": [NaN, 1, 2, 3]}]}', "not finite"),
        (b'{"outputs": [{"shape": [4, 2], "data": [1, Infinity, 0, 1, 0, 1, 0, 1]}]}', "not finite"),
        (_v2_body([1e300, 1, 2, 3]), "class indices"),
        (b"[" * 20_000 + b"]" * 20_000, "not JSON"),
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


def test_watermark_extends_the_claim_of_embed_and_refuses_a_signed_one(tickets, tmp_path: Path) -> None:
    path = tmp_path / "claim.json"
    assert (
        main(
            [
                "embed",
                str(tickets["plain"]),
                "--payload",
                "ME",
                "--no-train",
                "--out",
                str(tmp_path / "s"),
                "--claim",
                str(path),
            ]
        )
        == 0
    )
    args = ["watermark", str(tmp_path / "s"), "--claim", str(path), "--trigger-seed", "5", "--epochs", "1"]
    args += ["--train-per-class", "5", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0  # the signature in the mask passes the self-check
    extended = load_claim(path)
    assert extended.signature.payload == "ME" and extended.trigger.source["seed"] == 5
    assert extended.ticket_files == ticket_hashes(tmp_path / "a")
    save_claim(path, sign(extended, Ed25519PrivateKey.generate()))
    before = path.read_text()
    assert main([*args, "--out", str(tmp_path / "b")]) == 2
    assert path.read_text() == before and not (tmp_path / "b").exists()


def test_query_refuses_a_claim_changed_after_signing(tickets, server, tmp_path: Path) -> None:
    claim = sign(load_claim(tickets["claim"]), Ed25519PrivateKey.generate())
    claim.trigger = dataclasses.replace(claim.trigger, chance_model="uniform")
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


# Hostile peers. Every test runs on loopback with short timeouts and bounded loops, and takes well under 5 s.


@pytest.mark.parametrize(
    "setting",
    [
        {"timeout_s": 0},
        {"timeout_s": float("inf")},
        {"timeout_s": float("nan")},
        {"query_timeout_s": -1},
        {"retries": 12},
        {"retries": -1},
        {"batch_size": 0},
        {"batch_size": 100_000},
        {"pixel_max": 2},
    ],
)
def test_endpoint_refuses_unsafe_settings(setting: dict[str, float]) -> None:
    with pytest.raises(InputError):
        Endpoint("http://127.0.0.1:1", **setting)


@contextmanager
def raw_server(answer: Callable[[socket.socket], None]) -> Iterator[str]:
    """A loopback server that reads the first segment of each request, then hands the connection to ``answer``."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    stopped = threading.Event()

    def serve_one(connection: socket.socket) -> None:
        with connection, contextlib.suppress(OSError):
            connection.settimeout(5)
            connection.recv(1 << 20)
            answer(connection)

    def accept() -> None:
        while not stopped.is_set():
            with contextlib.suppress(TimeoutError):
                threading.Thread(target=serve_one, args=(listener.accept()[0],), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stopped.set()
        thread.join()
        listener.close()


def dripping(head: bytes) -> Callable[[socket.socket], None]:
    """Send ``head``, then one more byte every 50 ms for up to 5 s: each read succeeds, the answer never ends."""

    def answer(connection: socket.socket) -> None:
        connection.sendall(head)
        for _ in range(100):
            time.sleep(0.05)
            connection.sendall(b" ")

    return answer


@pytest.mark.parametrize(
    "head",
    [b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", b"HTTP/1.1 200 OK\r\nX-Slow: "],
    ids=["body", "headers"],
)
def test_a_server_dripping_its_answer_is_cut_at_the_deadline(head: bytes) -> None:
    with raw_server(dripping(head)) as url:
        started = time.monotonic()
        with pytest.raises(InputError, match="no complete answer .* within 0.5 s after 1 attempts"):
            query_labels(Endpoint(url, timeout_s=0.5, retries=0), IMAGES)
        assert time.monotonic() - started < 1.5


def test_retries_and_back_off_stop_at_the_query_deadline() -> None:
    with fake_api(lambda i: (503, b"busy", 0)) as (url, calls):
        started = time.monotonic()
        with pytest.raises(InputError, match="HTTP 503 after [1-4] attempts"):
            query_labels(Endpoint(url, retries=5, query_timeout_s=0.5), IMAGES)
        assert time.monotonic() - started < 1.0 and len(calls) < 6
    with fake_api(lambda i: (200, _v2_body([1]), 0.3)) as (url, calls):
        with pytest.raises(InputError, match=r"within 0\.\d+ s after 1 attempts"):
            query_labels(Endpoint(url, batch_size=1, retries=0, query_timeout_s=0.5), IMAGES)
        assert len(calls) == 2


def test_an_oversized_answer_is_refused_without_reading_it_all() -> None:
    def flood(connection: socket.socket) -> None:
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 300000000\r\n\r\n")
        for _ in range(300):
            connection.sendall(b" " * (1 << 20))

    with raw_server(flood) as url:
        started = time.monotonic()
        with pytest.raises(InputError, match="more than 196608 bytes for 4 images"):
            query_labels(Endpoint(url, retries=0), IMAGES)
        assert time.monotonic() - started < 2


def tiny_model(logits_value: float | None = None) -> ServedModel:
    """A linear model of 8x8 one-channel images (so no training); ``logits_value`` fills every weight."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    if logits_value is not None:
        nn.init.constant_(model[1].weight, logits_value)
    return ServedModel("ticket", model.eval(), (1, 8, 8), 10, torch.zeros(1), torch.ones(1))


@contextmanager
def tiny_server(served: ServedModel | None = None, **limits: float) -> Iterator[ModelServer]:
    with ModelServer(served or tiny_model(), port=0, limits=ServerLimits(**limits)) as running:
        yield running


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def _not_json(constant: str) -> None:
    raise AssertionError(f"{constant} is not standard JSON")


def exchange(url: str, raw: bytes) -> tuple[int, Any]:
    """Send raw bytes on a new connection and read one answer, whose body must be standard JSON."""
    with socket.create_connection(_address(url), timeout=3) as connection:
        connection.sendall(raw)
        response = http.client.HTTPResponse(connection)
        response.begin()
        return response.status, json.loads(response.read(), parse_constant=_not_json)


def request(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    lines = [
        f"{method} {path} HTTP/1.1",
        "Host: 127.0.0.1",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


INFER = "/v2/models/ticket/infer"


def v2_input(batch: int, name: str = "input", value: str = "0.5") -> bytes:
    data = ",".join([value] * (batch * 64))
    return f'{{"inputs": [{{"name": "{name}", "shape": [{batch}, 1, 8, 8], "datatype": "FP32", "data": [{data}]}}]}}'.encode()


def test_an_oversized_body_is_refused_with_413_before_it_is_read() -> None:
    with tiny_server() as running:
        headers = {"Content-Length": str(9 << 20)}
        status, answer = exchange(running.url, request("POST", INFER, headers=headers))
    assert status == 413 and "limit of 8388608 bytes" in answer["error"]


def post_json(body: bytes, path: str = INFER, **headers: str) -> bytes:
    return request("POST", path, body, {"Content-Length": str(len(body)), **headers})


def test_a_batch_over_the_cap_is_refused_with_413() -> None:
    with tiny_server() as running:
        status, answer = exchange(running.url, post_json(v2_input(257)))
        assert exchange(running.url, post_json(v2_input(256)))[0] == 200
    assert status == 413 and "257 images" in answer["error"]


def test_a_refused_body_is_drained_so_a_client_that_sends_it_all_reads_the_answer() -> None:
    body = b"[" + b"0.123456789," * 1_000_000 + b"0]"  # 12 MB: more than the socket buffers hold
    with tiny_server(max_body_bytes=64 << 10) as running:
        client = http.client.HTTPConnection(*_address(running.url), timeout=5)
        client.request("POST", INFER, body=body)  # a reset here, had the server closed on an unread body
        response = client.getresponse()
        assert response.status == 413 and "limit of 65536 bytes" in json.loads(response.read())["error"]
        client.close()


@pytest.mark.parametrize(("length", "status"), [("abc", 400), ("-5", 400), ("1_0", 400), (None, 411)])
def test_a_bad_or_missing_content_length_is_a_json_client_error(length: str | None, status: int) -> None:
    headers = {} if length is None else {"Content-Length": length}
    with tiny_server() as running:
        answered, answer = exchange(running.url, request("POST", INFER, b"{}", headers))
    assert answered == status and "Content-Length" in answer["error"]


def test_idle_and_dripping_connections_are_closed() -> None:
    with tiny_server(socket_timeout_s=0.3, request_timeout_s=0.8) as running:
        started = time.monotonic()
        with socket.create_connection(_address(running.url), timeout=3) as idle:
            assert idle.recv(1) == b""
        assert time.monotonic() - started < 1.5
        started = time.monotonic()
        with socket.create_connection(_address(running.url), timeout=3) as drip:
            drip.sendall(request("POST", INFER, headers={"Content-Length": "1000"}))
            for _ in range(60):  # a byte every 0.1 s keeps each read within the 0.3 s socket timeout
                drip.sendall(b" ")
                if select.select([drip], [], [], 0.1)[0]:
                    break
            assert drip.recv(1) == b""
        assert time.monotonic() - started < 1.5


def test_connections_beyond_the_cap_get_a_quick_503() -> None:
    with tiny_server(max_connections=2) as running:
        address = _address(running.url)
        held = [socket.create_connection(address, timeout=3) for _ in range(2)]
        started = time.monotonic()
        with socket.create_connection(address, timeout=3) as third:
            response = http.client.HTTPResponse(third)
            response.begin()
            assert response.status == 503 and "limit" in json.loads(response.read())["error"]
        assert time.monotonic() - started < 0.5
        for connection in held:
            connection.close()
        for _ in range(40):  # the held threads end as soon as they see their connections close
            with contextlib.suppress(ConnectionError):
                if exchange(running.url, request("GET", "/v2/health/live"))[0] == 200:
                    break
            time.sleep(0.05)
        else:
            pytest.fail("the server did not free the slots of closed connections")


def test_a_burst_of_50_connections_waits_in_the_listen_queue() -> None:
    server = ModelServer(tiny_model(), port=0)
    try:
        # nothing accepts yet: the OS queues the connections, and a SYN beyond the queue is dropped (1 s retry)
        burst = [socket.create_connection(_address(server.url), timeout=0.5) for _ in range(50)]
        server.start()
        for connection in burst:
            connection.sendall(request("GET", "/v2/health/ready"))
        for connection in burst:
            with connection:
                response = http.client.HTTPResponse(connection)
                response.begin()
                assert response.status == 200
    finally:
        server.stop()


def test_deeply_nested_json_is_a_400() -> None:
    body = b"[" * 100_000 + b"]" * 100_000
    with tiny_server() as running:
        status, answer = exchange(
            running.url, request("POST", INFER, body, {"Content-Length": str(len(body))})
        )
    assert status == 400 and "nests too deeply" in answer["error"]


def test_error_answers_are_json_and_leave_the_next_request_intact() -> None:
    with tiny_server() as running:
        client = http.client.HTTPConnection(*_address(running.url), timeout=3)
        client.request("POST", "/v2/models/other/infer", body=b'{"x": 1}')
        first = client.getresponse()
        assert first.status == 404 and "no model route" in json.loads(first.read())["error"]
        client.request("GET", "/v2/health/ready")  # on a keep-alive connection that kept the body: HTML 501
        second = client.getresponse()
        assert second.status == 200 and json.loads(second.read()) == {"ready": True}
        client.request("PUT", "/v2/health/ready")
        unsupported = client.getresponse()
        assert unsupported.status == 501 and "error" in json.loads(unsupported.read())
        client.close()


def test_binary_tensor_requests_are_refused_with_a_clear_400() -> None:
    body = v2_input(1)
    headers = {"Content-Length": str(len(body)), "Inference-Header-Content-Length": str(len(body))}
    with tiny_server() as running:
        status, answer = exchange(running.url, request("POST", INFER, body, headers))
    assert status == 400 and "binary tensor extension is not supported" in answer["error"]


def test_versioned_model_paths_are_served() -> None:
    with tiny_server() as running:
        base = f"{running.url}/v2/models/ticket"
        assert httpx.get(f"{base}/versions/1").json()["versions"] == ["1"]
        assert httpx.get(f"{base}/versions/1/ready").json()["ready"]
        assert httpx.get(f"{base}/versions/2").status_code == 404
        labels = query_labels(Endpoint(f"{base}/versions/1/infer"), IMAGES)
        assert torch.equal(labels, query_labels(Endpoint(running.url), IMAGES))


def test_an_unknown_input_name_or_a_non_finite_input_is_refused() -> None:
    with tiny_server() as running:
        with pytest.raises(InputError, match="HTTP 400.*named 'pixels'.*named 'input'"):
            query_labels(Endpoint(running.url, input_name="pixels", retries=0), IMAGES)
        body = v2_input(1, value="NaN")
        status, answer = exchange(
            running.url, request("POST", INFER, body, {"Content-Length": str(len(body))})
        )
    assert status == 400 and "NaN" in answer["error"]


def test_non_finite_logits_are_a_json_500_not_a_nan_literal() -> None:
    body = v2_input(1)
    with tiny_server(tiny_model(logits_value=float("nan"))) as running:
        status, answer = exchange(
            running.url, request("POST", INFER, body, {"Content-Length": str(len(body))})
        )
    assert status == 500 and "NaN or infinite logits" in answer["error"]


@pytest.mark.parametrize(
    "spoil",
    [
        lambda w: w.fill_(float("nan")),
        lambda w: w.fill_(float("inf")),
        lambda w: w.bool(),
        lambda w: w.long(),
    ],
    ids=["nan", "inf", "bool", "int64"],
)
def test_weights_that_cannot_be_served_are_refused(spoil, tmp_path: Path) -> None:
    state = build_model("resnet20", 1, 10).state_dict()
    key = next(name for name, tensor in state.items() if tensor.dim() == 4)
    state[key] = spoil(state[key].clone())
    save_tensors(tmp_path / "model.safetensors", state)
    with pytest.raises(InputError, match=rf"{key}.*(NaN or infinite|floating-point)"):
        load_served_model(tmp_path / "model.safetensors", input_size=8, mean=[0.5], std=[0.25])
