"""CLI commands of the black-box check (V3 through a prediction API): serve a model, query a suspect's API."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from ticketguard.artifacts.ticket import MAX_INPUT_SIDE
from ticketguard.cli.options import PublicKey, RunOptions, TsaCert, run_options
from ticketguard.cli.output import console, emit_json, print_verdict
from ticketguard.cli.settings import Settings, expand_settings
from ticketguard.core.errors import InputError
from ticketguard.models import MIN_INPUT_SIZE
from ticketguard.verification.blackbox import Endpoint, ModelServer, load_served_model
from ticketguard.verification.claim import load_public_key, read_pem
from ticketguard.verification.verify import verify_endpoint

commands = typer.Typer()
MAX_PORT = 65535
ENDPOINT_OPTIONS = Settings(
    Endpoint,
    ("protocol", "model", "input_name", "output_name", "request_field", "response_field", "batch_size", "timeout_s",
     "retries", "pixel_max"),
    flags={"timeout_s": ("--timeout",)},
)


@commands.command()
@expand_settings
def query(
    url: Annotated[str, typer.Argument(help="The suspect's server URL, or its full infer/predict URL.")],
    *,
    claim: Annotated[Path, typer.Option(help="Claim JSON with the trigger set (extensions.trigger).")],
    endpoint: Annotated[dict[str, Any], ENDPOINT_OPTIONS],
    trigger: Annotated[
        Path | None, typer.Option(help="Trigger folder, if it moved since the claim.")
    ] = None,
    chance: Annotated[str | None, typer.Option(help="Chance model (default: the claim's).")] = None,
    public_key: PublicKey = None,
    tsa_cert: TsaCert = None,
    run: Annotated[RunOptions, run_options("alpha", "json")],
) -> None:
    """Ask a suspect's prediction API for the trigger labels; exit 0 if ownership is shown, 1 if not."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would bury the verdict
    suspect = Endpoint(url, **endpoint)
    verdict = verify_endpoint(
        suspect, claim, alpha=run.alpha, public_key=load_public_key(public_key) if public_key else None,
        trigger_folder=trigger, chance_model=chance, tsa_certificate=read_pem(tsa_cert) if tsa_cert else None,
    )
    if run.json:
        emit_json(verdict.to_json())
    else:
        print_verdict(verdict.to_json(), f"trigger check of {suspect.infer_url()}")
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
@expand_settings
def serve(
    path: Annotated[Path, typer.Argument(help="A ticket folder, or a model file (.safetensors, .pt, .pth).")],
    *,
    port: Annotated[int, typer.Option(help="TCP port (0: any free one).")] = 8080,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    name: Annotated[str, typer.Option(help="Model name in /v2/models/NAME.")] = Endpoint.model,
    input_size: Annotated[
        int | None, typer.Option(help="Input height = width (needed for model files).")
    ] = None,
    mean: Annotated[
        str | None, typer.Option(help="Channel means of pixels in [0, 1], comma-separated.")
    ] = None,
    std: Annotated[str | None, typer.Option(help="Channel standard deviations, comma-separated.")] = None,
    run: Annotated[RunOptions, run_options("trust_code")],
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
        path, name, input_size, _floats(mean, "--mean"), _floats(std, "--std"), run.trust_code, model, num_classes
    )
    server = ModelServer(served, host, port)
    console.print(f"serving [bold]{path}[/] as {server.url}/v2/models/{name} (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        console.print("stopped")
    finally:
        server.stop()
