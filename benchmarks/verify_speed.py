"""Time to align and verify a suspect. First ResNet-20, ResNet-18 and ResNet-50 with a QR signature in a 30 %
mask, permuted and rescaled, read from a safetensors file, the undisguised copy timed beside it; then the
ResNet-50 copy in each form a thief ships it: safetensors, a TorchScript archive, an int8 state_dict (FX static
quantization, per-channel weights), an int8 ONNX file (onnxruntime's quantize_dynamic) and a structurally
pruned copy (25 % of the channels, the ``channels`` attack). Every time is the median of ``--repeats`` rounds
after one warm-up round, in this process; each round times every suspect of a table in turn.

    OMP_NUM_THREADS=2 nice -n 5 python benchmarks/verify_speed.py --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from torch import nn
from torch.ao.quantization import get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

from ticketguard import Claim, attack
from ticketguard.artifacts.suspect import load_suspect
from ticketguard.attacks.disguises import export_onnx
from ticketguard.cli.output import console
from ticketguard.core.errors import InputError
from ticketguard.core.evidence import Verdict
from ticketguard.core.files import save_tensors
from ticketguard.core.masks import Mask, magnitude_prune, prunable_names
from ticketguard.models import build_model
from ticketguard.schemes.signature import embed_signature
from ticketguard.training.loop import state_copy
from ticketguard.verification.align import Reference
from ticketguard.verification.verify import verify

INPUT_SHAPE = (3, 32, 32)  # what every model here is built for and exported with
LIMIT_S = 10.0  # the most align + verify may take for ResNet-50, in any form, on the 2-core CPU

Weights = dict[str, torch.Tensor]


def protected(name: str) -> tuple[Weights, Mask, Claim]:
    """A random-init model of ``name`` with a 30 % magnitude mask carrying a QR signature, and its claim."""
    torch.manual_seed(0)
    model = build_model(name, 3, 10)
    weights = state_copy(model)
    mask = magnitude_prune(weights, Mask.ones_like(weights, prunable_names(model)), 0.7)
    mask, signature, _ = embed_signature(mask, weights, weights, "ACME-2026")
    weights = {n: t * mask[n] if n in mask else t for n, t in weights.items()}
    return weights, mask, Claim(signature, {}, reference=Reference.of(name, 3, 10, weights, mask))


def network(weights: Weights) -> nn.Module:
    model = build_model("resnet50", 3, 10)
    model.load_state_dict(weights)
    return model.eval()


def safetensors_copy(weights: Weights, mask: Mask, path: Path) -> Path:
    save_tensors(path.with_suffix(".safetensors"), weights)
    return path.with_suffix(".safetensors")


def torchscript_archive(weights: Weights, mask: Mask, path: Path) -> Path:
    torch.jit.save(torch.jit.trace(network(weights), torch.randn(1, *INPUT_SHAPE)), path.with_suffix(".pt"))
    return path.with_suffix(".pt")


def int8_state_dict(weights: Weights, mask: Mask, path: Path) -> Path:
    """FX static quantization for x86 as ``tests/test_shipped_forms.py`` runs it: BatchNorm folded into the
    convs, per-channel int8 weights, calibrated on random images."""
    example = torch.randn(8, *INPUT_SHAPE)
    prepared = prepare_fx(network(weights), get_default_qconfig_mapping("x86"), (example,))
    with torch.no_grad():
        prepared(example)
    torch.save(convert_fx(prepared).state_dict(), path.with_suffix(".pt"))
    return path.with_suffix(".pt")


def int8_onnx(weights: Weights, mask: Mask, path: Path) -> Path:
    """Exported as ``tests/test_shipped_forms.py`` exports it, then int8 weights by onnxruntime's default
    dynamic quantization (ConvInteger and MatMulInteger)."""
    exported = path.with_name(f"{path.name}-float.onnx")
    export_onnx(network(weights), exported, INPUT_SHAPE, dynamo=False)
    quantize_dynamic(exported, path.with_suffix(".onnx"), weight_type=QuantType.QInt8)
    return path.with_suffix(".onnx")


def channels_pruned(weights: Weights, mask: Mask, path: Path) -> Path:
    return safetensors_copy(attack(weights, mask, "channels:fraction=0.25")[0], mask, path)


FORMS: dict[str, Callable[[Weights, Mask, Path], Path]] = {
    "protected copy, safetensors (baseline)": safetensors_copy,
    "TorchScript archive (torch.jit.trace)": torchscript_archive,
    "int8 state_dict (FX static, per-channel)": int8_state_dict,
    "int8 ONNX (onnxruntime quantize_dynamic)": int8_onnx,
    "25 % of channels pruned (channels attack)": channels_pruned,
}


@dataclass
class Timing:
    """Median seconds over the timed rounds: reading the file, then aligning and verifying what was read
    (wall clock, and this process's CPU time); the last verdict."""

    load_s: float
    check_s: float
    cpu_s: float
    verdict: Verdict

    @property
    def total_s(self) -> float:
        return self.load_s + self.check_s


def timed(paths: dict[str, Path], claim: Claim, repeats: int) -> dict[str, Timing | InputError]:
    """Every suspect timed in turn, one warm-up round then ``repeats`` timed rounds, so that a burst of other
    work on a shared machine falls on all of them alike; a file the reader refuses gets its refusal."""
    runs: dict[str, list[tuple[float, float, float, Verdict]]] = {name: [] for name in paths}
    refused: dict[str, InputError] = {}
    for _ in range(repeats + 1):
        for name, path in paths.items():
            if name in refused:
                continue
            started = time.perf_counter()
            try:
                suspect = load_suspect(path)
            except InputError as err:
                refused[name] = err
                continue
            loaded, cpu_started = time.perf_counter(), time.process_time()
            verdict = verify(suspect, claim)
            runs[name].append(
                (loaded - started, time.perf_counter() - loaded, time.process_time() - cpu_started, verdict)
            )
    return {
        name: refused[name]
        if name in refused
        else Timing(*(statistics.median(run[i] for run in timings[1:]) for i in range(3)), timings[-1][3])
        for name, timings in runs.items()
    }


def shown(verdict: Verdict) -> str:
    """The verdict cell: "owned", or "not shown" with what the verifier could not compute and why."""
    if verdict.owned:
        return "owned"
    return "; ".join(["not shown", *(f"{u.name}: {u.reason}" for u in verdict.unavailable)])


def row(*cells: object) -> None:
    """One markdown table row, printed whole however narrow the terminal."""
    console.print("| " + " | ".join(str(cell) for cell in cells) + " |", soft_wrap=True)


def architectures(folder: Path, repeats: int) -> None:
    row(
        "model",
        "undisguised: load + align + verify",
        "permute+rescale: load + align + verify",
        "ratio",
        "shown",
    )
    row(*["---"] * 5)
    for name in ("resnet20", "resnet18", "resnet50"):
        weights, mask, claim = protected(name)
        paths = {"plain": folder / f"{name}.safetensors", "stolen": folder / f"{name}-stolen.safetensors"}
        save_tensors(paths["plain"], weights)
        save_tensors(paths["stolen"], attack(weights, mask, "permute:seed=1+rescale:seed=2")[0])
        plain, stolen = timed(paths, claim, repeats).values()
        both = "yes" if plain.verdict.owned and stolen.verdict.owned else "NO"
        ratio = stolen.total_s / plain.total_s
        row(name, f"{plain.total_s:.2f} s", f"{stolen.total_s:.2f} s", f"{ratio:.2f}", both)


def forms(folder: Path, repeats: int) -> None:
    """The ResNet-50 table: the ratio is each form's total over the safetensors copy's (the first form)."""
    weights, mask, claim = protected("resnet50")
    with warnings.catch_warnings():  # torch.ao.quantization and TorchScript say they are deprecated
        warnings.simplefilter("ignore")
        paths = {form: write(weights, mask, folder / write.__name__) for form, write in FORMS.items()}
    timings = timed(paths, claim, repeats)
    baseline = timings[next(iter(FORMS))]
    row("ResNet-50 shipped as", "load", "align + verify (process CPU)", "total", "ratio", "verdict")
    row(*["---"] * 6)
    for form, timing in timings.items():
        if isinstance(timing, InputError):
            row(form, "-", "-", "-", "-", f"refused on reading: {timing}")
            continue
        row(
            form,
            f"{timing.load_s:.2f} s",
            f"{timing.check_s:.2f} s ({timing.cpu_s:.2f} s)",
            f"{timing.total_s:.2f} s",
            f"{timing.total_s / baseline.total_s:.2f}",
            shown(timing.verdict),
        )
    slowest = max(t.check_s for t in timings.values() if isinstance(t, Timing))
    standing = "under" if slowest < LIMIT_S else "OVER"
    console.print(f"slowest ResNet-50 align + verify: {slowest:.2f} s, {standing} the {LIMIT_S:.0f} s limit")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds, after one warm-up round")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(
            f"--repeats must be at least 1 (one warm-up round is always run first), got {args.repeats}"
        )
    console.print(f"torch threads: {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as folder:
        architectures(Path(folder), args.repeats)
        forms(Path(folder), args.repeats)


if __name__ == "__main__":
    main()
