"""The client side of black-box checks: send images to a prediction API, collect one top-1 label per image.

Images go as FP32 pixels in [0, 1] (times ``pixel_max``), NCHW, in batches, through the Open Inference Protocol
v2 (KServe, Triton, MLServer) or a plain JSON endpoint whose field names are configurable (KServe v1 / TF
Serving ``instances`` -> ``predictions`` by default). A query returns one label per image or raises
``InputError``: a partial answer is never evidence. The peer is not trusted: each request and the whole query
have a deadline, retries are capped, and at most a few KiB per image of an answer is read.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import logging
import math
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Self

import httpx
import numpy as np
import torch

from ticketguard.core.errors import InputError
from ticketguard.core.settings import setting

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

    url: str = setting(help="Where the suspect answers: its server's base URL or its full infer/predict URL.")
    protocol: str = setting("v2", help="API: v2 (Open Inference Protocol v2) or json (plain JSON).")
    model: str = setting("ticket", help="Model name in the v2 path /v2/models/NAME/infer.")
    input_name: str = setting(INPUT_NAME, help="v2 input tensor name.")
    output_name: str | None = setting(None, help="v2 output to read (default: the first).")
    request_field: str = setting("instances", help="JSON request field holding the images.")
    response_field: str = setting("predictions", help="JSON answer field with labels or scores.")
    batch_size: int = setting(100, help="Images per request.")
    timeout_s: float = setting(10.0, help="Seconds to wait for each answer.")
    retries: int = setting(2, help="Retries per request after a network error or overload.")
    pixel_max: float = setting(1.0, help="Pixels are sent in [0, PIXEL_MAX] (1 or 255).")
    query_timeout_s: float = setting(600.0, help="Seconds the whole query may take.")

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


class Deadline:
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
        self._due: list[tuple[float, int, Deadline]] = []
        self._order = itertools.count()  # breaks ties, so deadlines themselves are never compared
        self._thread: threading.Thread | None = None

    def arm(self, deadline: Deadline) -> None:
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
        deadline = Deadline(seconds, lambda: self.socket)
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
