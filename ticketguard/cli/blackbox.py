"""CLI commands of the black-box check (V3 through a prediction API): serve a model, query a suspect's API."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from ticketguard.artifacts.ticket import MAX_INPUT_SIDE
from ticketguard.cli.options import ALPHA, Alpha, Json, PublicKey, TrustCode, TsaCert
from ticketguard.cli.output import console, emit_json, print_verdict
from ticketguard.core.errors import InputError
from ticketguard.models import MIN_INPUT_SIZE
from ticketguard.verification.blackbox import PROTOCOLS, Endpoint, ModelServer, load_served_model
from ticketguard.verification.claim import load_public_key, read_pem
from ticketguard.verification.verify import verify_endpoint

commands = typer.Typer()
MAX_PORT = 65535

ENDPOINT = Endpoint("http://127.0.0.1:8080")


@commands.command()
def query(
    url: Annotated[str, typer.Argument(help="The suspect's server URL, or its full infer/predict URL.")],
    claim: Annotated[Path, typer.Option(help="Claim JSON with the trigger set (extensions.trigger).")],
    protocol: Annotated[
        str, typer.Option(help=f"API: {', '.join(PROTOCOLS)} (Open Inference v2, plain JSON).")
    ] = ENDPOINT.protocol,
    model: Annotated[
        str, typer.Option(help="Model name in the v2 path /v2/models/NAME/infer.")
    ] = ENDPOINT.model,
    input_name: Annotated[str, typer.Option(help="v2 input tensor name.")] = ENDPOINT.input_name,
    output_name: Annotated[
        str | None, typer.Option(help="v2 output to read (default: the first).")
    ] = None,
    request_field: Annotated[
        str, typer.Option(help="JSON request field holding the images.")
    ] = ENDPOINT.request_field,
    response_field: Annotated[
        str, typer.Option(help="JSON answer field with labels or scores.")
    ] = ENDPOINT.response_field,
    batch_size: Annotated[int, typer.Option(help="Images per request.")] = ENDPOINT.batch_size,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each answer.")] = ENDPOINT.timeout_s,
    retries: Annotated[
        int, typer.Option(help="Retries per request after a network error or overload.")
    ] = ENDPOINT.retries,
    pixel_max: Annotated[
        float, typer.Option(help="Pixels are sent in [0, PIXEL_MAX] (1 or 255).")
    ] = ENDPOINT.pixel_max,
    trigger: Annotated[
        Path | None, typer.Option(help="Trigger folder, if it moved since the claim.")
    ] = None,
    chance: Annotated[str | None, typer.Option(help="Chance model (default: the claim's).")] = None,
    alpha: Alpha = ALPHA,
    public_key: PublicKey = None,
    tsa_cert: TsaCert = None,
    as_json: Json = False,
) -> None:
    """Ask a suspect's prediction API for the trigger labels; exit 0 if ownership is shown, 1 if not."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would bury the verdict
    endpoint = Endpoint(
        url,
        protocol,
        model,
        input_name,
        output_name,
        request_field,
        response_field,
        batch_size,
        timeout,
        retries,
        pixel_max,
    )
    verdict = verify_endpoint(
        endpoint, claim, alpha=alpha, public_key=load_public_key(public_key) if public_key else None,
        trigger_folder=trigger, chance_model=chance, tsa_certificate=read_pem(tsa_cert) if tsa_cert else None,
    )
    if as_json:
        emit_json(verdict.to_json())
    else:
        print_verdict(verdict.to_json(), f"trigger check of {endpoint.infer_url()}")
    raise typer.Exit(0 if verdict.owned else 1)


def _floats(text: str | None, option: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise InputError(
            f"{option} must be comma-separated numbers such as 0.49,0.48,0.45, got {text!r}"
        ) from None


@commands.command()
def serve(
    path: Annotated[Path, typer.Argument(help="A ticket folder, or a model file (.safetensors, .pt, .pth).")],
    port: Annotated[int, typer.Option(help="TCP port (0: any free one).")] = 8080,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    name: Annotated[str, typer.Option(help="Model name in /v2/models/NAME.")] = ENDPOINT.model,
    input_size: Annotated[
        int | None, typer.Option(help="Input height = width (needed for model files).")
    ] = None,
    mean: Annotated[
        str | None, typer.Option(help="Channel means of pixels in [0, 1], comma-separated.")
    ] = None,
    std: Annotated[str | None, typer.Option(help="Channel standard deviations, comma-separated.")] = None,
    trust_code: TrustCode = False,
    model: Annotated[str | None, typer.Option(
        help="A model file's architecture: a registered name or an import path (package.module:factory). "
        "Importing runs that code.")] = None,
    num_classes: Annotated[int | None, typer.Option(help="Classes a model file given with --model predicts.")]
    = None,
) -> None:
    """Serve a model over the Open Inference Protocol v2 (and KServe v1 predict) until interrupted."""
    if not 0 <= port <= MAX_PORT:
        raise InputError(f"--port must be a TCP port in 0..{MAX_PORT} (0: any free one), got {port}")
    if input_size is not None and not MIN_INPUT_SIZE <= input_size <= MAX_INPUT_SIDE:
        raise InputError(
            f"--input-size must lie in {MIN_INPUT_SIZE}..{MAX_INPUT_SIDE} pixels, got {input_size}"
        )
    served = load_served_model(
        path, name, input_size, _floats(mean, "--mean"), _floats(std, "--std"), trust_code, model, num_classes
    )
    server = ModelServer(served, host, port)
    console.print(f"serving [bold]{path}[/] as {server.url}/v2/models/{name} (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        console.print("stopped")
    finally:
        server.stop()
