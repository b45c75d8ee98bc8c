"""Time the blind V2 scan (no claim) on random-init ResNet-18 and ResNet-50 with a signature in a 30 % mask.

The scan before the batched header, tail and Reed-Solomon stages (``--before``, the module at that commit,
read with ``git show``) had no budget and ran for many minutes on ResNet-18; it is run here one (layer,
version) at a time until ``--before-budget`` seconds have passed, and the table says how far it got.

    python benchmarks/blind_scan_speed.py
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

from ticketguard.core.masks import Mask, magnitude_prune, prunable_names
from ticketguard.models import build_model
from ticketguard.schemes.blind_scan import blind_scan
from ticketguard.schemes.signature import embed_signature
from ticketguard.training.loop import state_copy

BEFORE = "71ad9ebfda2fc2799eb5694c8f9f9f80dec3c129"
PAYLOAD = "ACME-2026"


def signed(name: str) -> tuple[dict[str, torch.Tensor], str]:
    """A random-init model with a 30 % magnitude mask carrying a QR signature, and the host layer."""
    torch.manual_seed(0)
    model = build_model(name, 3, 10)
    weights = state_copy(model)
    mask = magnitude_prune(weights, Mask.ones_like(weights, prunable_names(model)), 0.7)
    mask, signature, _ = embed_signature(mask, weights, weights, PAYLOAD)
    return {n: t * mask[n] if n in mask else t for n, t in weights.items()}, signature.regions[0].layer


def old_module(commit: str) -> types.ModuleType:
    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(["git", "show", f"{commit}:ticketguard/schemes/blind_scan.py"], cwd=root,
                            capture_output=True, text=True, check=True).stdout
    module = types.ModuleType("blind_scan_before")
    sys.modules[module.__name__] = module  # dataclasses look their module up while the source runs
    exec(compile(source, "blind_scan_before.py", "exec"), module.__dict__)  # noqa: S102  (our own past source)
    return module


def before(
    module: types.ModuleType, weights: dict[str, torch.Tensor], budget_s: float
) -> tuple[float, int, int, bool]:
    """(seconds, pairs scanned, pairs in all, found the payload) for the old scan, cut at ``budget_s``."""
    started = time.perf_counter()
    units = [(n, v) for v in (1, 2, 3, 4) for n, t in weights.items()
             if t.dim() == 4 and t.is_floating_point() and min(t.shape[:2]) >= 17 + 4 * v]
    done, found = 0, False
    for name, version in units:
        if time.perf_counter() - started > budget_s:
            break
        squeezed = module.squeeze(weights[name].detach().cpu() != 0)
        found |= any(f.text == PAYLOAD for f in module._scan_layer(name, squeezed, version, "H"))
        done += 1
    return time.perf_counter() - started, done, len(units), found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=BEFORE, help="commit of the old scan; '' skips it")
    parser.add_argument("--before-budget", type=float, default=120.0)
    args = parser.parse_args()
    module = old_module(args.before) if args.before else None
    print(f"torch threads: {torch.get_num_threads()}, python {sys.version.split()[0]}")
    print("| model | code in | before: time, (layer, version) pairs scanned | before found it | "
          "now: time, pairs scanned | now found it |")
    print("|---|---|---|---|---|---|")
    for name in ("resnet18", "resnet50"):
        weights, host = signed(name)
        scan = blind_scan(weights, budget_s=None)
        now_found = any(f.text == PAYLOAD and f.layer == host for f in scan.found)
        old = "not run | -"
        if module is not None:
            seconds, done, total, found = before(module, weights, args.before_budget)
            cut = "" if done == total else f" (budget {args.before_budget:g} s)"
            old = f"{seconds:.1f} s, {done} of {total}{cut} | {'yes' if found else 'no'}"
        print(f"| {name} | {host} | {old} | {scan.seconds:.1f} s, {len(scan.scanned)} of "
              f"{len(scan.scanned) + len(scan.unscanned)} | {'yes' if now_found else 'no'} |")


if __name__ == "__main__":
    main()
