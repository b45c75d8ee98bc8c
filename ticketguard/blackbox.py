"""Black-box access to a model: a client for prediction APIs, and a small server that offers one.

The client sends images as FP32 pixels in [0, 1] (times ``pixel_max``), NCHW, in batches, and collects top-1
labels through the Open Inference Protocol v2 (KServe, Triton, MLServer) or a plain JSON endpoint whose field
names are configurable (KServe v1 / TF Serving ``instances`` -> ``predictions`` by default). A query either
returns one label per image or raises ``InputError``: a partial answer is never evidence.

The server answers the same protocols for a ticket or a model file, standardising pixels with the training
data's channel statistics, so a suspect-like service stands up on loopback in one command.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

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
RETRY_BACKOFF_S = 0.2
MAX_BODY_BYTES = 64 << 20
INPUT_NAME = "input"
LOGITS_NAME = "logits"
LABEL_NAME = "label"


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

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise InputError(f"unknown protocol {self.protocol!r}; choose one of: {', '.join(PROTOCOLS)}")
        if not self.url.startswith(("http://", "https://")):
            raise InputError(f"the suspect's URL must start with http:// or https://, got {self.url!r}")
        if self.batch_size < 1 or self.timeout_s <= 0 or self.retries < 0:
            raise InputError("batch size must be >= 1, timeout > 0 and retries >= 0")

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
    output = chosen[0]
    try:
        shape = [int(n) for n in output["shape"]]
        values = np.asarray(output["data"], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        raise InputError("a v2 output needs a numeric 'shape' and a flat numeric 'data' list") from None
    if values.ndim != 1 or int(np.prod(shape)) != values.size:
        raise InputError(f"a v2 output's data holds {values.size} numbers, but its shape is {shape}")
    return _labels_from_values(values.reshape(shape), count)


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
    if values.ndim == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.ndim == 2 and values.shape[1] > 1:
        if not np.isfinite(values).all():
            raise InputError("the suspect answered scores that are not finite numbers")
        values = values.argmax(axis=1)
    elif values.ndim != 1 or not np.array_equal(values, np.round(values)):
        raise InputError(f"expected labels (B,) or scores (B, K), got an array of shape {values.shape}")
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


def _post(client: httpx.Client, url: str, body: dict[str, Any], retries: int) -> Any:
    """POST JSON; retry transport errors and overload statuses a bounded number of times."""
    for attempt in range(retries + 1):
        try:
            response = client.post(url, json=body)
        except httpx.TimeoutException:
            problem = f"no answer from {url} within {client.timeout.read} s"
        except httpx.TransportError as err:
            problem = f"cannot reach {url} ({err})"
        else:
            if response.status_code not in RETRY_STATUSES:
                return _answer(response, url)
            problem = f"{url} answered HTTP {response.status_code}"
        if attempt < retries:
            log.info("%s; retrying (%d of %d)", problem, attempt + 1, retries)
            time.sleep(RETRY_BACKOFF_S * 2**attempt)
    raise InputError(f"{problem} after {retries + 1} attempts")


def _answer(response: httpx.Response, url: str) -> Any:
    if response.status_code != HTTPStatus.OK:
        raise InputError(f"{url} answered HTTP {response.status_code}: {response.text[:200]}")
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"{url} answered something that is not JSON: {response.text[:80]!r}") from None


def query_labels(endpoint: Endpoint, images: torch.Tensor) -> torch.Tensor:
    """Top-1 labels of uint8 images (N, C, H, W) from the suspect's API, in batches over one connection."""
    protocol = PROTOCOLS[endpoint.protocol]
    pixels = images.cpu().numpy().astype(np.float32) * np.float32(endpoint.pixel_max / 255)
    url = endpoint.infer_url()
    labels = []
    with httpx.Client(timeout=endpoint.timeout_s) as client:
        for start in range(0, pixels.shape[0], endpoint.batch_size):
            batch = pixels[start : start + endpoint.batch_size]
            answer = _post(client, url, protocol.request(endpoint, batch), endpoint.retries)
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
    """Channel mean and std the ticket was trained with: from its metadata, or from a built-in data set."""
    recorded = ticket.metadata.get("normalization")
    if recorded:
        return torch.tensor(recorded["mean"]), torch.tensor(recorded["std"])
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
        model = ticket.build_model()
        channels, classes, size = ticket.in_channels, ticket.num_classes, tuple(ticket.input_size)
        stats = ticket_normalization(ticket) if mean is None or std is None else None
    else:
        suspect = load_suspect(path)
        model, (_, channels, classes) = build_from_state(suspect.weights, f"serving {path}")
        if input_size is None or mean is None or std is None:
            raise InputError(f"serving the model file {path} needs --input-size, --mean and --std")
        size, stats = (input_size, input_size), None
    if input_size is not None:
        size = (input_size, input_size)
    mean_t, std_t = stats if stats is not None else (torch.tensor(mean), torch.tensor(std))
    if mean_t.numel() != channels or std_t.numel() != channels:
        raise InputError(f"--mean and --std need {channels} value(s), one per input channel")
    return ServedModel(name, model.eval(), (channels, *size), classes, mean_t.float(), std_t.float())


class _Handler(BaseHTTPRequestHandler):
    """Open Inference Protocol v2 (health, metadata, infer) and KServe v1 predict for one model."""

    served: ServedModel
    lock: threading.Lock
    protocol_version = "HTTP/1.1"  # keep-alive, so a client's batches share one connection
    # headers and body leave in one segment without Nagle's wait: else each answer stalls ~40 ms
    disable_nagle_algorithm = True
    wbufsize = 1 << 16

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def _send(self, status: int, body: dict[str, Any]) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _model_path(self) -> str:
        return f"/v2/models/{self.served.name}"

    def do_GET(self) -> None:
        served = self.served
        routes = {
            "/v2/health/live": {"live": True},
            "/v2/health/ready": {"ready": True},
            "/v2": {"name": "ticketguard", "version": ticketguard.__version__, "extensions": []},
            f"{self._model_path()}/ready": {"name": served.name, "ready": True},
            self._model_path(): {
                "name": served.name,
                "versions": ["1"],
                "platform": "pytorch",
                "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, *served.input_shape]}],
                "outputs": [
                    {"name": LOGITS_NAME, "datatype": "FP32", "shape": [-1, served.num_classes]},
                    {"name": LABEL_NAME, "datatype": "INT64", "shape": [-1]},
                ],
            },
        }
        path = self.path.split("?", 1)[0].rstrip("/")
        if path in routes:
            self._send(HTTPStatus.OK, routes[path])
        else:
            self._send(HTTPStatus.NOT_FOUND, {"error": f"no route {path}"})

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        routes = {
            f"{self._model_path()}/infer": self._infer_v2,
            f"/v1/models/{self.served.name}:predict": self._predict_v1,
        }
        if path not in routes:
            self._send(HTTPStatus.NOT_FOUND, {"error": f"no model route {path}"})
            return
        try:
            self._send(HTTPStatus.OK, routes[path](self._read_json()))
        except InputError as err:
            self._send(HTTPStatus.BAD_REQUEST, {"error": str(err)})
        except Exception as err:  # any other failure is answered as a 500, never a dropped connection
            log.exception("inference failed")
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"inference failed: {err}"})

    def _read_json(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= MAX_BODY_BYTES:
            raise InputError(f"a request body of 1 to {MAX_BODY_BYTES} bytes with Content-Length is required")
        try:
            return json.loads(self.rfile.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InputError("the request body is not JSON") from None

    def _pixels(self, values: Any, shape: list[int] | None) -> torch.Tensor:
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
        return torch.from_numpy(array)

    def _logits(self, pixels: torch.Tensor) -> torch.Tensor:
        with self.lock:
            return self.served.logits(pixels)

    def _infer_v2(self, request: Any) -> dict[str, Any]:
        inputs = request.get("inputs") if isinstance(request, dict) else None
        if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
            raise InputError("a v2 request needs 'inputs' with exactly one tensor")
        tensor = inputs[0]
        if tensor.get("datatype") != "FP32":
            raise InputError("the input tensor's datatype must be FP32")
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
            "model_version": "1",
            "outputs": [outputs[n] for n in wanted],
        }
        if "id" in request:
            answer["id"] = request["id"]
        return answer

    def _predict_v1(self, request: Any) -> dict[str, Any]:
        if not isinstance(request, dict) or "instances" not in request:
            raise InputError("a v1 request needs an 'instances' list")
        return {"predictions": self._logits(self._pixels(request["instances"], None)).tolist()}


class ModelServer:
    """A server for one model, on the standard library's ``ThreadingHTTPServer`` (small and well kept).

    ``port=0`` lets the OS choose a free port; use it as a context manager to run it in a background thread.
    """

    def __init__(self, served: ServedModel, host: str = "127.0.0.1", port: int = 8080) -> None:
        handler = type("Handler", (_Handler,), {"served": served, "lock": threading.Lock()})
        try:
            self.httpd = ThreadingHTTPServer((host, port), handler)
        except OSError as err:
            raise InputError(
                f"cannot listen on {host}:{port} ({err.strerror}); choose another --port"
            ) from None
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def start(self) -> ModelServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
        self.httpd.server_close()

    def __enter__(self) -> ModelServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
