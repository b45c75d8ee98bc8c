"""Black-box access to a model: a client for prediction APIs, and a small server that offers one.

The client sends images as FP32 pixels in [0, 1] (times ``pixel_max``), NCHW, in batches, and collects top-1
labels through the Open Inference Protocol v2 (KServe, Triton, MLServer) or a plain JSON endpoint whose field
names are configurable (KServe v1 / TF Serving ``instances`` -> ``predictions`` by default). A query either
returns one label per image or raises ``InputError``: a partial answer is never evidence.

The server answers the same protocols for a ticket or a model file, standardising pixels with the training
data's channel statistics, so a suspect-like service stands up on loopback in one command.

Neither side trusts its peer: the client gives each request and the whole query a deadline, caps its retries
and reads at most a few KiB per image of an answer; the server caps the body, the batch, the time a request
may take to arrive and the number of open connections (``ServerLimits``), and answers every refusal in JSON.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import logging
import math
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

import httpx
import numpy as np
import torch
from torch import nn

import ticketguard
from ticketguard.data import DATASETS, load_dataset
from ticketguard.errors import InputError
from ticketguard.models import build_from_state
from ticketguard.suspect import load_suspect
from ticketguard.ticket import MANIFEST, Ticket

log = logging.getLogger(__name__)

RETRY_STATUSES = {429, 502, 503, 504}
RETRY_BACKOFF_S = 0.2  # the first pause; each retry doubles it
MAX_BACKOFF_S = 2.0  # with MAX_RETRIES, the pauses of one request add up to at most 5 s
MAX_RETRIES = 5
MAX_TIMEOUT_S = 600.0
MAX_QUERY_TIMEOUT_S = 86400.0
MAX_BATCH = 256
ANSWER_BASE_BYTES = 64 << 10
ANSWER_BYTES_PER_IMAGE = 32 << 10  # 1,000 float32 scores in JSON take about 20 KiB
MAX_LABEL = 2**31  # labels are class indices; a larger number is no prediction
DRAIN_BYTES = 64 << 20
INPUT_NAME = "input"
LOGITS_NAME = "logits"
LABEL_NAME = "label"
MODEL_VERSION = "1"


@dataclass(frozen=True)
class Endpoint:
    """Where and how to ask a suspect for predictions."""

    url: str
    protocol: str = "v2"
    model: str = "ticket"
    input_name: str = INPUT_NAME
    output_name: str | None = None
    request_field: str = "instances"
    response_field: str = "predictions"
    batch_size: int = 100
    timeout_s: float = 10.0
    retries: int = 2
    pixel_max: float = 1.0
    query_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise InputError(f"unknown protocol {self.protocol!r}; choose one of: {', '.join(PROTOCOLS)}")
        if not self.url.startswith(("http://", "https://")):
            raise InputError(f"the suspect's URL must start with http:// or https://, got {self.url!r}")
        if not 1 <= self.batch_size <= MAX_BATCH:
            raise InputError(
                f"the batch size must be 1 to {MAX_BATCH} images per request, got {self.batch_size}"
            )
        # written so that NaN fails too: every comparison with NaN is false
        if not 0 < self.timeout_s <= MAX_TIMEOUT_S:
            raise InputError(
                f"the timeout must be over 0 and at most {MAX_TIMEOUT_S:g} s, got {self.timeout_s}"
            )
        if not 0 < self.query_timeout_s <= MAX_QUERY_TIMEOUT_S:
            raise InputError(
                f"the query timeout must be over 0 and at most {MAX_QUERY_TIMEOUT_S:g} s, got {self.query_timeout_s}"
            )
        if not 0 <= self.retries <= MAX_RETRIES:
            raise InputError(
                f"retries must be 0 to {MAX_RETRIES}, as each one waits longer; got {self.retries}"
            )
        if self.pixel_max not in (1, 255):
            raise InputError(f"pixel_max must be 1 or 255 (the suspect's pixel range), got {self.pixel_max}")

    def infer_url(self) -> str:
        """A full endpoint URL is used as given; a bare server URL gets the protocol's path."""
        base = self.url.rstrip("/")
        if self.protocol == "v2":
            return base if base.endswith("/infer") else f"{base}/v2/models/{self.model}/infer"
        return base if "/" in base.split("://", 1)[1] else f"{base}/v1/models/{self.model}:predict"


def _v2_request(endpoint: Endpoint, pixels: np.ndarray) -> dict[str, Any]:
    request: dict[str, Any] = {
        "inputs": [
            {
                "name": endpoint.input_name,
                "shape": list(pixels.shape),
                "datatype": "FP32",
                "data": pixels.ravel().tolist(),
            }
        ]
    }
    if endpoint.output_name is not None:
        request["outputs"] = [{"name": endpoint.output_name}]
    return request


def _v2_labels(endpoint: Endpoint, answer: Any, count: int) -> np.ndarray:
    """The named output (or the first): integer labels (B,) or scores (B, K) whose argmax is the label."""
    outputs = answer.get("outputs") if isinstance(answer, dict) else None
    if not isinstance(outputs, list) or not outputs or not all(isinstance(o, dict) for o in outputs):
        raise InputError("the suspect's v2 answer has no 'outputs' list")
    chosen = (
        [o for o in outputs if o.get("name") == endpoint.output_name] if endpoint.output_name else outputs[:1]
    )
    if not chosen:
        raise InputError(f"the suspect's v2 answer has no output named {endpoint.output_name!r}")
    shape, data = chosen[0].get("shape"), chosen[0].get("data")
    if not _is_shape(shape) or not isinstance(data, list):
        raise InputError(
            "a v2 output needs a 'shape' of non-negative integers and a flat numeric 'data' list"
        )
    # compared in Python integers before numpy sees the shape: [2**32, 2**32] must not reach an allocation
    if math.prod(shape) != len(data):
        raise InputError(f"a v2 output's data holds {len(data)} numbers, but its shape is {shape}")
    try:
        values = np.asarray(data, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError("a v2 output's 'data' must be a flat list of numbers") from None
    if values.ndim != 1:
        raise InputError("a v2 output's 'data' must be a flat list of numbers")
    return _labels_from_values(values.reshape(shape), count)


def _is_shape(shape: Any) -> bool:
    return isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)


def _json_request(endpoint: Endpoint, pixels: np.ndarray) -> dict[str, Any]:
    return {endpoint.request_field: pixels.tolist()}


def _json_labels(endpoint: Endpoint, answer: Any, count: int) -> np.ndarray:
    if not isinstance(answer, dict) or endpoint.response_field not in answer:
        raise InputError(f"the suspect's JSON answer has no field {endpoint.response_field!r}")
    try:
        values = np.asarray(answer[endpoint.response_field], dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(
            f"the field {endpoint.response_field!r} must hold labels or lists of scores"
        ) from None
    return _labels_from_values(values, count)


def _labels_from_values(values: np.ndarray, count: int) -> np.ndarray:
    """One label per image from labels (B,) / (B, 1) or scores (B, K)."""
    if not np.isfinite(values).all():
        raise InputError("the suspect answered numbers that are not finite (NaN or infinity)")
    if values.ndim == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.ndim == 2 and values.shape[1] > 1:
        values = values.argmax(axis=1)
    elif values.ndim != 1 or not np.array_equal(values, np.round(values)):
        raise InputError(f"expected labels (B,) or scores (B, K), got an array of shape {values.shape}")
    elif ((values < 0) | (values >= MAX_LABEL)).any():
        raise InputError(
            f"the suspect answered labels outside 0 to {MAX_LABEL - 1}, which are no class indices"
        )
    if values.shape[0] != count:
        raise InputError(f"the suspect answered {values.shape[0]} predictions for {count} images")
    return values.astype(np.int64)


@dataclass(frozen=True)
class Protocol:
    request: Callable[[Endpoint, np.ndarray], dict[str, Any]]
    labels: Callable[[Endpoint, Any, int], np.ndarray]


PROTOCOLS: dict[str, Protocol] = {
    "v2": Protocol(_v2_request, _v2_labels),
    "json": Protocol(_json_request, _json_labels),
}


def _shut(connection: socket.socket | None) -> None:
    """End a connection and wake the thread blocked on it: close() alone leaves a blocked recv waiting."""
    if connection is not None:
        with contextlib.suppress(OSError):
            connection.shutdown(socket.SHUT_RDWR)


class _Deadline:
    """Shuts a connection down when ``seconds`` have passed, unless cancelled first.

    httpx and http.server time out each socket operation, not a whole request: a peer that drips one byte
    per read would otherwise hold a request (and its thread) for as long as it likes.
    """

    def __init__(self, seconds: float, connection: Callable[[], socket.socket | None]) -> None:
        self.at = time.monotonic() + seconds
        self.passed = False
        self.cancelled = False
        self._connection = connection
        _WATCHDOG.arm(self)

    def cut(self) -> None:
        self.passed = True
        _shut(self._connection())

    def cancel(self) -> None:
        self.cancelled = True


class _Watchdog:
    """One thread that cuts every connection whose deadline passes: arming a deadline is a heap push, where a
    timer thread per request would cost about 0.5 ms to start and double a busy server's threads."""

    def __init__(self) -> None:
        self._wake = threading.Condition()
        self._due: list[tuple[float, int, _Deadline]] = []
        self._order = itertools.count()  # breaks ties, so deadlines themselves are never compared
        self._thread: threading.Thread | None = None

    def arm(self, deadline: _Deadline) -> None:
        with self._wake:
            heapq.heappush(self._due, (deadline.at, next(self._order), deadline))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ticketguard-deadlines", daemon=True)
                self._thread.start()
            # the thread sleeps until the earliest deadline; only a new earliest one needs to wake it
            if self._due[0][2] is deadline:
                self._wake.notify()

    def _run(self) -> None:
        with self._wake:
            while True:
                now = time.monotonic()
                while self._due and (self._due[0][2].cancelled or self._due[0][0] <= now):
                    deadline = heapq.heappop(self._due)[2]
                    if not deadline.cancelled:
                        deadline.cut()
                self._wake.wait(self._due[0][0] - now if self._due else None)


_WATCHDOG = _Watchdog()


class _Transient(Exception):
    """A failed attempt worth retrying: no connection, no complete answer in time, or an overload status."""


class _Caller:
    """One query's connection to the suspect, with a deadline on each request and on the whole query."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.url = endpoint.infer_url()
        self.deadline = time.monotonic() + endpoint.query_timeout_s
        # one connection at a time, so the socket the trace hook saw last is the one a deadline must cut
        self.client = httpx.Client(
            limits=httpx.Limits(max_connections=1), headers={"Accept-Encoding": "identity"}
        )
        self.socket: socket.socket | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()

    def post(self, body: dict[str, Any], count: int) -> Any:
        """POST JSON for ``count`` images; retry transient failures a bounded number of times."""
        content = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
        attempts = self.endpoint.retries + 1
        for attempt in range(1, attempts + 1):
            try:
                return self._attempt(content, count)
            except _Transient as err:
                problem = str(err)
            pause = min(RETRY_BACKOFF_S * 2 ** (attempt - 1), MAX_BACKOFF_S)
            if attempt == attempts or self.deadline - time.monotonic() <= pause:
                break
            log.info("%s; retrying (%d of %d)", problem, attempt, self.endpoint.retries)
            time.sleep(pause)
        raise InputError(f"{problem} after {attempt} attempts")

    def _attempt(self, content: bytes, count: int) -> Any:
        """One POST, whose connection, upload and whole answer must fit in the timeout (or the query's rest)."""
        seconds = min(self.endpoint.timeout_s, self.deadline - time.monotonic())
        if seconds <= 0:
            raise InputError(
                f"the query of {self.url} ran past its limit of {self.endpoint.query_timeout_s:g} s"
            )
        limit = ANSWER_BASE_BYTES + count * ANSWER_BYTES_PER_IMAGE
        late = f"no complete answer from {self.url} within {seconds:.3g} s"
        deadline = _Deadline(seconds, lambda: self.socket)
        try:
            with self.client.stream(
                "POST",
                self.url,
                content=content,
                headers={"Content-Type": "application/json"},
                timeout=seconds,
                extensions={"trace": self._trace},
            ) as response:
                status, answer = response.status_code, _read_upto(response, limit)
        except httpx.TimeoutException:
            raise _Transient(late) from None
        except httpx.RequestError as err:
            raise _Transient(late if deadline.passed else f"cannot reach {self.url} ({err})") from None
        finally:
            deadline.cancel()
        # cut off: an answer delimited by the connection's end stops short without an error
        if deadline.passed:
            raise _Transient(late)
        if status in RETRY_STATUSES:
            raise _Transient(f"{self.url} answered HTTP {status}")
        if status != HTTPStatus.OK:
            raise InputError(f"{self.url} answered HTTP {status}: {answer[:200].decode(errors='replace')}")
        if len(answer) > limit:
            raise InputError(
                f"{self.url} answered more than {limit} bytes for {count} images, far more than labels need"
            )
        return _parse_answer(answer, self.url)

    def _trace(self, event: str, info: dict[str, Any]) -> None:
        """httpx's trace hook: keep the socket of each new connection (TCP, then TLS), so a deadline can cut it."""
        if event.endswith(("connect_tcp.complete", "start_tls.complete")):
            self.socket = info["return_value"].get_extra_info("socket")


def _read_upto(response: httpx.Response, limit: int) -> bytes:
    """At most ``limit`` + 1 bytes of the answer: enough to tell it is too large without holding all of it."""
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) > limit:
            break
    return bytes(body)


def _parse_answer(answer: bytes, url: str) -> Any:
    try:
        return json.loads(answer)
    except (ValueError, RecursionError):  # bad JSON or UTF-8, a >4300-digit integer, or absurd nesting
        raise InputError(f"{url} answered something that is not JSON: {answer[:80]!r}") from None


def query_labels(endpoint: Endpoint, images: torch.Tensor) -> torch.Tensor:
    """Top-1 labels of uint8 images (N, C, H, W) from the suspect's API, in batches over one connection."""
    protocol = PROTOCOLS[endpoint.protocol]
    pixels = images.cpu().numpy().astype(np.float32) * np.float32(endpoint.pixel_max / 255)
    labels = []
    with _Caller(endpoint) as caller:
        for start in range(0, pixels.shape[0], endpoint.batch_size):
            batch = pixels[start : start + endpoint.batch_size]
            answer = caller.post(protocol.request(endpoint, batch), batch.shape[0])
            labels.append(protocol.labels(endpoint, answer, batch.shape[0]))
    return torch.from_numpy(np.concatenate(labels))


@dataclass
class ServedModel:
    """A model ready to answer: it takes FP32 pixels in [0, 1] and standardises them as in training."""

    name: str
    model: nn.Module
    input_shape: tuple[int, int, int]
    num_classes: int
    mean: torch.Tensor
    std: torch.Tensor

    @torch.inference_mode()
    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        scaled = (pixels - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)
        return self.model(scaled).float()


def ticket_normalization(ticket: Ticket) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel mean and std the ticket was trained with, as it records them, or from a built-in data set."""
    if ticket.normalization is not None:
        return ticket.normalization.tensors()
    if ticket.dataset in _builtin_datasets():
        return load_dataset(ticket.dataset).channel_stats()
    raise InputError(
        f"the ticket does not record the channel statistics of {ticket.dataset!r}; pass --mean and --std"
    )


def _builtin_datasets() -> set[str]:
    return {name for name, spec in DATASETS.items() if not spec.needs_folder}


def load_served_model(
    path: str | Path,
    name: str = "ticket",
    input_size: int | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> ServedModel:
    """A ticket folder or a model file of a registered architecture, in eval mode on the CPU."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        ticket = Ticket.load(path)
        model, weights = ticket.build_model(), ticket.weights
        channels, classes, size = ticket.in_channels, ticket.num_classes, tuple(ticket.input_size)
        stats = ticket_normalization(ticket) if mean is None or std is None else None
    else:
        weights = load_suspect(path).weights
        model, (_, channels, classes) = build_from_state(weights, f"serving {path}")
        if input_size is None or mean is None or std is None:
            raise InputError(f"serving the model file {path} needs --input-size, --mean and --std")
        size, stats = (input_size, input_size), None
    _check_servable(weights, model, path)
    if input_size is not None:
        size = (input_size, input_size)
    mean_t, std_t = stats if stats is not None else (torch.tensor(mean), torch.tensor(std))
    if mean_t.numel() != channels or std_t.numel() != channels:
        raise InputError(f"--mean and --std need {channels} value(s), one per input channel")
    return ServedModel(name, model.eval(), (channels, *size), classes, mean_t.float(), std_t.float())


def _check_servable(weights: dict[str, torch.Tensor], model: nn.Module, path: Path) -> None:
    """Refuse weights the model would serve wrongly: loading casts bool or integer tensors to floats without a
    word, and a NaN or infinite weight answers NaN logits."""
    for key, expected in model.state_dict().items():
        if not expected.is_floating_point():
            continue
        given = weights[key]
        if not given.is_floating_point():
            raise InputError(
                f"{path}: {key!r} is {given.dtype}, but a served model needs floating-point weights"
            )
        if not torch.isfinite(given).all():
            raise InputError(f"{path}: {key!r} holds NaN or infinite values, so the model cannot be served")


@dataclass(frozen=True)
class ServerLimits:
    """What one client may take from the server, so that no request or connection starves the others."""

    max_body_bytes: int = 8 << 20  # a request of 100 CIFAR-10 images in JSON takes about 6 MB
    max_batch: int = MAX_BATCH
    socket_timeout_s: float = 10.0  # silence allowed on a connection: idle keep-alive, a stalled send
    request_timeout_s: float = 30.0  # from when the server waits for a request until its whole body is in
    max_connections: int = 64  # one thread each; beyond them a new connection gets a quick 503
    listen_backlog: int = 128  # connections the OS holds before accept, so a burst is not reset


class _Refusal(Exception):
    """A request answered with an HTTP error status and a one-sentence JSON message."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Handler(BaseHTTPRequestHandler):
    """Open Inference Protocol v2 (health, metadata, infer) and KServe v1 predict for one model."""

    served: ServedModel
    lock: threading.Lock
    limits: ServerLimits
    protocol_version = "HTTP/1.1"  # keep-alive, so a client's batches share one connection
    # headers and body leave in one segment without Nagle's wait: else each answer stalls ~40 ms
    disable_nagle_algorithm = True
    wbufsize = 1 << 16
    _unread = 0  # bytes of the current request's declared body not read yet
    _request_deadline: _Deadline

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def handle_one_request(self) -> None:
        """One request, which must arrive whole within ``request_timeout_s`` (see ``_Deadline``)."""
        self._unread = 0
        self._request_deadline = _Deadline(self.limits.request_timeout_s, lambda: self.connection)
        try:
            super().handle_one_request()
        finally:
            self._request_deadline.cancel()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a bad request line, an unknown method) in JSON, like every answer."""
        self._send(code, {"error": message or HTTPStatus(code).phrase})

    def _send(self, status: int, body: dict[str, Any]) -> None:
        """Every answer is JSON; an error closes the connection, after draining the refused request's body."""
        payload = json.dumps(body, allow_nan=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        if status != HTTPStatus.OK:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(payload)
        if status != HTTPStatus.OK:
            self.wfile.flush()
            self._drain()

    def _drain(self) -> None:
        """Read and drop the refused request's unread body (up to DRAIN_BYTES; the request deadline still holds):
        closing a socket with unread data sends a TCP reset, which can destroy the answer before it is read."""
        left = self._unread if self._unread <= DRAIN_BYTES else 0
        with contextlib.suppress(OSError):
            while left > 0 and (chunk := self.rfile.read1(min(left, 1 << 16))):
                left -= len(chunk)

    def _route(self) -> str:
        """The path without query or trailing slash; the model's only version, /versions/1, is the model."""
        path = self.path.split("?", 1)[0].rstrip("/")
        model = f"/v2/models/{self.served.name}"
        versioned = f"{model}/versions/{MODEL_VERSION}"
        if path == versioned or path.startswith(f"{versioned}/"):
            return model + path[len(versioned) :]
        return path

    def do_GET(self) -> None:
        served = self.served
        model = f"/v2/models/{served.name}"
        routes = {
            "/v2/health/live": {"live": True},
            "/v2/health/ready": {"ready": True},
            "/v2": {"name": "ticketguard", "version": ticketguard.__version__, "extensions": []},
            f"{model}/ready": {"name": served.name, "ready": True},
            model: {
                "name": served.name,
                "versions": [MODEL_VERSION],
                "platform": "pytorch",
                "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, *served.input_shape]}],
                "outputs": [
                    {"name": LOGITS_NAME, "datatype": "FP32", "shape": [-1, served.num_classes]},
                    {"name": LABEL_NAME, "datatype": "INT64", "shape": [-1]},
                ],
            },
        }
        path = self._route()
        if path in routes:
            self._send(HTTPStatus.OK, routes[path])
        else:
            self._send(HTTPStatus.NOT_FOUND, {"error": f"no route {path}"})

    def do_POST(self) -> None:
        try:
            status, answer = HTTPStatus.OK, self._answer_post()
        except _Refusal as err:
            status, answer = err.status, {"error": str(err)}
        except InputError as err:
            status, answer = HTTPStatus.BAD_REQUEST, {"error": str(err)}
        except Exception as err:  # any other failure is answered as a 500, never a dropped connection
            log.exception("inference failed")
            status, answer = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"inference failed: {err}"}
        self._send(status, answer)

    def _answer_post(self) -> dict[str, Any]:
        length = self._body_length()
        routes = {
            f"/v2/models/{self.served.name}/infer": self._infer_v2,
            f"/v1/models/{self.served.name}:predict": self._predict_v1,
        }
        path = self._route()
        if path not in routes:
            raise _Refusal(HTTPStatus.NOT_FOUND, f"no model route {path}")
        return routes[path](self._read_json(length))

    def _body_length(self) -> int:
        """The declared body length, checked before a byte of the body is read."""
        declared = self.headers.get("Content-Length")
        if declared is None or "Transfer-Encoding" in self.headers:
            raise _Refusal(
                HTTPStatus.LENGTH_REQUIRED,
                "a POST needs a Content-Length header; chunked bodies are not accepted",
            )
        # isdigit alone takes '²', and int() takes '+1', ' 1' and '1_0'; 18 digits keep int() fast
        if not (declared.isascii() and declared.isdigit() and len(declared) <= 18):
            raise _Refusal(
                HTTPStatus.BAD_REQUEST, f"Content-Length must be a number of bytes, got {declared[:40]!r}"
            )
        self._unread = int(declared)
        return self._unread

    def _read_json(self, length: int) -> Any:
        if "Inference-Header-Content-Length" in self.headers:
            raise _Refusal(
                HTTPStatus.BAD_REQUEST,
                "the binary tensor extension is not supported; send the tensors as JSON (binary_data=False)",
            )
        if length > self.limits.max_body_bytes:
            raise _Refusal(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"the request body of {length} bytes is over this server's limit of "
                f"{self.limits.max_body_bytes} bytes; send fewer images per request",
            )
        if length == 0:
            raise _Refusal(HTTPStatus.BAD_REQUEST, "the request body is empty; send the inputs as JSON")
        try:
            body = self.rfile.read(length)
        except OSError:
            raise _Refusal(HTTPStatus.REQUEST_TIMEOUT, "the request body did not arrive in time") from None
        self._unread = length - len(body)
        if self._unread:
            raise _Refusal(HTTPStatus.BAD_REQUEST, "the request body ended before its Content-Length")
        self._request_deadline.cancel()  # the request is in: inference and the answer are not cut short
        try:
            return json.loads(body)
        except (ValueError, RecursionError):  # bad JSON or UTF-8, a >4300-digit integer, or absurd nesting
            raise InputError("the request body is not JSON, or nests too deeply") from None

    def _pixels(self, values: Any, shape: Any) -> torch.Tensor:
        try:
            array = np.asarray(values, dtype=np.float32)
            if shape is not None:
                array = array.reshape(shape)
        except (TypeError, ValueError):
            raise InputError("the input must be numbers whose count matches its shape") from None
        if array.ndim != 4 or tuple(array.shape[1:]) != self.served.input_shape:
            raise InputError(
                f"the input must have shape [B, {', '.join(map(str, self.served.input_shape))}], "
                f"got {list(array.shape)}"
            )
        if array.shape[0] > self.limits.max_batch:
            raise _Refusal(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"the batch of {array.shape[0]} images is over this server's limit of {self.limits.max_batch}; "
                "send fewer images per request",
            )
        if not np.isfinite(array).all():
            raise InputError("the input holds NaN or infinite numbers; send pixels in [0, 1]")
        return torch.from_numpy(array)

    def _logits(self, pixels: torch.Tensor) -> torch.Tensor:
        with self.lock:
            logits = self.served.logits(pixels)
        if not torch.isfinite(logits).all():
            raise _Refusal(
                HTTPStatus.INTERNAL_SERVER_ERROR,
                "the model computed NaN or infinite logits for this input, which JSON cannot carry",
            )
        return logits

    def _infer_v2(self, request: Any) -> dict[str, Any]:
        inputs = request.get("inputs") if isinstance(request, dict) else None
        if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
            raise InputError("a v2 request needs 'inputs' with exactly one tensor")
        tensor = inputs[0]
        if tensor.get("name") != INPUT_NAME:
            raise InputError(
                f"the input tensor is named {tensor.get('name')!r}, but this model's input is named {INPUT_NAME!r}"
            )
        if tensor.get("datatype") != "FP32":
            raise InputError("the input tensor's datatype must be FP32")
        if not isinstance(request.get("id", ""), str):
            raise InputError("a v2 request's 'id' must be a string")
        logits = self._logits(self._pixels(tensor.get("data"), tensor.get("shape")))
        outputs = {
            LOGITS_NAME: {
                "name": LOGITS_NAME,
                "datatype": "FP32",
                "shape": list(logits.shape),
                "data": logits.flatten().tolist(),
            },
            LABEL_NAME: {
                "name": LABEL_NAME,
                "datatype": "INT64",
                "shape": [logits.shape[0]],
                "data": logits.argmax(1).tolist(),
            },
        }
        requested = request.get("outputs") or []
        if not isinstance(requested, list) or not all(isinstance(o, dict) for o in requested):
            raise InputError("'outputs' must be a list of objects with a 'name'")
        wanted = [o.get("name") for o in requested] or list(outputs)
        unknown = [n for n in wanted if n not in outputs]
        if unknown:
            raise InputError(f"unknown outputs {unknown}; this model has {list(outputs)}")
        answer: dict[str, Any] = {
            "model_name": self.served.name,
            "model_version": MODEL_VERSION,
            "outputs": [outputs[n] for n in wanted],
        }
        if "id" in request:
            answer["id"] = request["id"]
        return answer

    def _predict_v1(self, request: Any) -> dict[str, Any]:
        if not isinstance(request, dict) or "instances" not in request:
            raise InputError("a v1 request needs an 'instances' list")
        return {"predictions": self._logits(self._pixels(request["instances"], None)).tolist()}


BUSY_BODY = b'{"error": "the server is at its limit of open connections; retry shortly"}'
BUSY_ANSWER = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(BUSY_BODY), BUSY_BODY)
)


class _Server(ThreadingHTTPServer):
    """The standard library's threading server with a deeper listen queue and a bound on connection threads."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[_Handler], limits: ServerLimits) -> None:
        self.request_queue_size = limits.listen_backlog
        self._slots = threading.BoundedSemaphore(limits.max_connections)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        """A thread per connection while a slot is free, else a 503: a flood must not grow threads without end."""
        if not self._slots.acquire(blocking=False):
            _refuse_busy(request)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that broke (client gone, deadline cut) is routine: a debug line, not a traceback."""
        log.debug("the connection from %s ended: %r", client_address, sys.exc_info()[1])


def _refuse_busy(connection: socket.socket) -> None:
    """Answer 503 from the accept loop without ever blocking it, and drop what the client already sent, so
    that closing does not reset the connection before the client reads the answer."""
    with contextlib.suppress(OSError):  # includes BlockingIOError: nothing to send into or to drop
        connection.setblocking(False)
        connection.send(BUSY_ANSWER)  # a fresh socket's send buffer takes it whole
        connection.recv(1 << 16)


class ModelServer:
    """A server for one model, on the standard library's ``ThreadingHTTPServer`` (small and well kept).

    ``port=0`` lets the OS choose a free port; use it as a context manager to run it in a background thread.
    """

    def __init__(
        self,
        served: ServedModel,
        host: str = "127.0.0.1",
        port: int = 8080,
        limits: ServerLimits = ServerLimits(),
    ) -> None:
        attributes = {
            "served": served,
            "lock": threading.Lock(),
            "limits": limits,
            "timeout": limits.socket_timeout_s,
        }
        handler = type("Handler", (_Handler,), attributes)
        try:
            self.httpd = _Server((host, port), handler, limits)
        except OSError as err:
            raise InputError(
                f"cannot listen on {host}:{port} ({err.strerror}); choose another --port"
            ) from None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def start(self) -> ModelServer:
        # a short poll lets stop() return in 50 ms rather than the default 0.5 s
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
        self.httpd.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
