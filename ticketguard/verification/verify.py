"""verify(): every piece of evidence a claim supports, read from a suspect, combined into one verdict.

This is the one place evidence is combined. A piece the claim supports but the suspect does not allow to
compute (a layer it lacks, an architecture that cannot be rebuilt for the trigger check) is listed as
unavailable with its reason, and the other pieces still decide.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from rich.progress import Progress

from ticketguard.artifacts.suspect import Suspect, load_suspect
from ticketguard.artifacts.ticket import Ticket
from ticketguard.core.errors import InputError
from ticketguard.core.evidence import DEFAULT_ALPHA, Evidence, Unavailable, Verdict, check_alpha
from ticketguard.data import ImageData
from ticketguard.models import accept_model_name
from ticketguard.schemes import keymask as v1
from ticketguard.schemes import trigger as v3
from ticketguard.schemes.base import SCHEMES, VerifyContext
from ticketguard.training.loop import TrainConfig
from ticketguard.verification.align import AlignmentError, align
from ticketguard.verification.blackbox import Endpoint, query_labels
from ticketguard.verification.claim import Claim, check_commitment, check_signature, load_claim, trusted_time
from ticketguard.verification.defence import defended
from ticketguard.verification.fingerprint import fingerprint_evidence
from ticketguard.verification.reading import (
    effective_magnitudes,
    masked,
    rank_read,
    read_summary,
)
from ticketguard.verification.timestamp import TrustedTime

SuspectLike = Suspect | Mapping[str, torch.Tensor] | str | Path


def verify(
    suspect: SuspectLike,
    claim: Claim | str | Path,
    *,
    alpha: float = DEFAULT_ALPHA,
    public_key: Ed25519PublicKey | None = None,
    trigger_folder: str | Path | None = None,
    qr_image: str | Path | None = None,
    device: torch.device | str | None = None,
    model: str | None = None,
    commitment: str | None = None,
    tsa_certificate: bytes | None = None,
) -> Verdict:
    """V(...): does ``suspect`` (a path, a loaded ``Suspect`` or a state_dict) carry what ``claim`` records?

    ``public_key``: the claim must be signed with it. ``trigger_folder``: where a folder trigger set is now.
    ``qr_image``: also write the extracted QR code beside the expected one (PNG). ``model``: the suspect's
    architecture by import path, for alignment and the trigger check on weights of a model that is not built
    in (the caller names that code, so it is imported; a name read from the claim never is). ``commitment``: the claim must match this published digest
    (``ticketguard.verification.claim.commitment``). ``tsa_certificate``: the PEM of the time-stamping authority the caller
    trusts; with it the claim's RFC 3161 token is checked, and evidence a forger could search after the fact
    (trigger seeds or labels, payloads) counts at alpha against copies first published after that time.
    """
    check_alpha(alpha)
    if model is not None:
        accept_model_name(model)
    claim = claim if isinstance(claim, Claim) else load_claim(claim)
    signed = check_signature(claim, public_key)
    if commitment is not None:
        check_commitment(claim, commitment)
    sections = claim.sections()
    if all(section is None for section in sections.values()):
        held = " nor ".join(scheme.description for scheme in SCHEMES.values())
        raise InputError(f"the claim holds neither {held}, so it cannot show anything")
    loaded = as_suspect(suspect)
    evidence: list[Evidence] = []
    unavailable: list[Unavailable] = []
    details: dict[str, Any] = {
        "claim_signed": signed,
        "claim_created": claim.created,
        "suspect_source": loaded.source,
    }
    if commitment is not None:
        details["claim_commitment"] = "matches the published commitment"
    stamped = _trusted_time(claim, tsa_certificate, details)
    observed: dict[str, torch.Tensor] = {}
    weights, readable = _read_on_own_terms(loaded, claim, unavailable, details, observed)
    context = VerifyContext(
        weights, readable, loaded.normalization, alpha, stamped is not None, device, model, trigger_folder,
        qr_image, observed or None, _beside_network(loaded, details),
    )
    for key, scheme in SCHEMES.items():
        if sections[key] is None:
            continue
        try:
            evidence.append(scheme.evidence(sections[key], context))
        except InputError as err:
            unavailable.append(Unavailable(scheme.evidence_name, str(err)))
    if "alignment" in details:  # last: it shows derivation, and never decides alone
        kept = {name: readable[name] != 0 for name in claim.reference.masks}
        evidence.append(fingerprint_evidence(kept, claim.reference.masks, alpha, observed or None))
    return Verdict(tuple(evidence), alpha, tuple(unavailable), details)


def verify_endpoint(
    endpoint: Endpoint,
    claim: Claim | str | Path,
    *,
    alpha: float = DEFAULT_ALPHA,
    public_key: Ed25519PublicKey | None = None,
    trigger_folder: str | Path | None = None,
    chance_model: str | None = None,
    tsa_certificate: bytes | None = None,
) -> Verdict:
    """ESWT + T through a prediction API: the claim's trigger images sent to ``endpoint``, the answers tested
    against chance as labelled and under the best relabelling of the classes (``v3.trigger_evidence``; an API
    may rename its labels); ``chance_model`` overrides the claim's; ``tsa_certificate`` as for ``verify``."""
    check_alpha(alpha)
    claim = claim if isinstance(claim, Claim) else load_claim(claim)
    signed = check_signature(claim, public_key)
    if claim.trigger is None:
        raise InputError("the claim holds no trigger set; make one with `ticketguard protect` or `watermark`")
    chance = chance_model or claim.trigger.chance_model
    v3.check_chance_model(chance)
    trigger = claim.trigger.trigger_set(trigger_folder)
    details: dict[str, Any] = {"url": endpoint.infer_url(), "claim_signed": signed, "claim_created": claim.created}
    stamped = _trusted_time(claim, tsa_certificate, details)
    predicted = query_labels(endpoint, trigger.images)
    found = v3.judged_against_forgery(
        v3.trigger_evidence(predicted, trigger.labels, claim.trigger.classes, chance, alpha),
        claim.trigger.source.get("kind", ""),
        alpha,
        stamped is not None,
    )
    return Verdict((found,), alpha, details=details)


def _trusted_time(claim: Claim, certificate: bytes | None, details: dict[str, Any]) -> TrustedTime | None:
    """The claim's checked RFC 3161 time, or None; ``details`` says which, and what a trusted time covers."""
    if certificate is None:
        if claim.timestamp_token is not None:
            details["trusted_time"] = "the claim carries an RFC 3161 token, not checked: give the TSA's certificate"
        return None
    stamped = trusted_time(claim, certificate)
    details["trusted_time"] = {
        **stamped.to_json(),
        "holds_against": f"copies first published after {stamped.time.isoformat()}",
    }
    return stamped


def _read_on_own_terms(
    loaded: Suspect,
    claim: Claim,
    unavailable: list[Unavailable],
    details: dict[str, Any],
    observed: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The suspect's weights (aligned when the claim has a reference: same function, the reference's form),
    and the same with only what it keeps on its own terms (``ticketguard.verification.reading``) non-zero.

    With a reference: aligned, then each layer's largest weights in BatchNorm units, as many as the owner kept
    there. A suspect that cannot be aligned is read by rank under its own names; a claim without a reference
    drops every weight below its add-on threshold t. ``details`` gets what was read; ``observed`` the cells
    whose channels a structurally pruned suspect still has (the aligned weights hold zeros in the others).
    """
    weights = loaded.weights
    if claim.reference is not None:
        try:
            held_out = {} if claim.signature is None else claim.signature.region_cells(claim.reference.masks)
            alignment = align(loaded, claim.reference, held_out)
        except AlignmentError as err:
            unavailable.append(
                Unavailable("alignment", f"the suspect cannot be put in the reference's form: {err}")
            )
        else:
            details["alignment"] = alignment.report
            details["reading"] = alignment.report["reading"]
            observed.update(alignment.observed or {})
            return alignment.weights, masked(alignment.weights, alignment.mask)
        counts = {n: int(m.sum()) for n, m in claim.reference.masks.items()}
        kept = {
            n: rank_read(effective_magnitudes(weights[n], None), count)
            for n, count in counts.items()
            if n in weights and weights[n].shape == claim.reference.masks[n].shape
        }
        details["reading"] = read_summary(kept, {n: counts[n] for n in kept})
        return weights, masked(weights, kept)
    if claim.defence is not None:
        details["reading"] = {"rule": "every weight below the claim's add-on threshold t dropped",
                              "threshold": claim.defence.threshold}
        return weights, defended(weights, claim.defence.threshold)
    details["reading"] = {"rule": "every non-zero weight"}
    return weights, weights


def _beside_network(loaded: Suspect, details: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The suspect's tensors that alignment did not read as layers of the reference: what a repackaged copy
    ships beside its network. None when it was not aligned, as then nothing tells network from extras."""
    if "alignment" not in details:
        return None
    layers = set(details["alignment"]["layers"].values())
    return {name: tensor for name, tensor in loaded.weights.items() if name not in layers}


def as_suspect(suspect: SuspectLike) -> Suspect:
    """A path, a loaded suspect or a state_dict, as a ``Suspect``."""
    if isinstance(suspect, Suspect):
        return suspect
    if isinstance(suspect, (str, Path)):
        return load_suspect(suspect)
    return Suspect.from_weights(
        {name: tensor.detach().cpu() for name, tensor in suspect.items()}, "state_dict"
    )


def verify_key(
    locked: Ticket,
    key: v1.Key | None,
    data: ImageData,
    config: TrainConfig,
    eps: float,
    device: torch.device,
    progress: Progress | None = None,
    fake1: bool = False,
) -> Verdict:
    """V1 by performance: the locked ticket retrained without and with the key (and a random key with
    ``fake1``); ownership shows as a gap beyond eps_f."""
    return Verdict((v1.key_evidence(locked, key, data, config, eps, device, progress, fake1),))
