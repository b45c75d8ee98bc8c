"""A small server for the Open Inference Protocol v2 (and KServe v1 predict) that holds against hostile clients.

It caps the body, the batch, the time a request may take to arrive and the number of open connections
(``ServerLimits``), and answers every refusal in JSON.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import sys
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

import numpy as np
import torch

from ticketguard.core.errors import InputError
from ticketguard.core.version import __version__
from ticketguard.verification.blackbox.client import (
    DRAIN_BYTES,
    INPUT_NAME,
    LABEL_NAME,
    LOGITS_NAME,
    MAX_BATCH,
    MODEL_VERSION,
    Deadline,
)
from ticketguard.verification.blackbox.served import ServedModel

log = logging.getLogger(__name__)


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
    _request_deadline: Deadline

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def handle_one_request(self) -> None:
        """One request, which must arrive whole within ``request_timeout_s`` (see ``Deadline``)."""
        self._unread = 0
        self._request_deadline = Deadline(self.limits.request_timeout_s, lambda: self.connection)
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
            "/v2": {"name": "ticketguard", "version": __version__, "extensions": []},
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
