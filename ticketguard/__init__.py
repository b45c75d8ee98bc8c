"""ticketguard: find extremely sparse winning lottery tickets and prove that they are yours.

The whole story from Python::

    import ticketguard as tg
    data = tg.load_dataset("digits")
    ticket = tg.find_extreme_ticket(data, tg.SearchConfig(), "runs/search")
    protected = tg.protect(ticket, data, signature="ACME-2026", trigger=tg.keyed_trigger_for(ticket, seed=7))
    weights, mask = tg.attack(protected.ticket.weights, protected.ticket.mask, "magnitude:fraction=0.2")
    print(tg.verify(weights, protected.claim).owned)
"""

from ticketguard.artifacts.suspect import Suspect, load_suspect
from ticketguard.artifacts.ticket import Ticket
from ticketguard.attacks.chains import attack
from ticketguard.attacks.removal import ATTACKS
from ticketguard.core.errors import InputError
from ticketguard.core.evidence import DEFAULT_ALPHA, Evidence, Unavailable, Verdict
from ticketguard.core.masks import Mask, prunable_names
from ticketguard.core.version import __version__
from ticketguard.data import ImageData, Normalization, load_dataset, load_subset
from ticketguard.data.triggers import TriggerSet, keyed_trigger_set, load_trigger_folder
from ticketguard.models import build_model, trust_model_code
from ticketguard.protect import (
    BatchMixer,
    Protected,
    SignatureConfig,
    TrainFn,
    TriggerConfig,
    keyed_trigger_for,
    protect,
    sign_mask,
)
from ticketguard.schemes.keymask import Key, merge_key, split_key
from ticketguard.schemes.signature import Signature
from ticketguard.schemes.trigger import TriggerClaim
from ticketguard.search.config import SearchConfig
from ticketguard.search.imp import find_extreme_ticket
from ticketguard.training.fixed_mask import MaskKeeper, keep_mask
from ticketguard.training.loop import TrainConfig, train
from ticketguard.verification.claim import (
    Claim,
    DefenceClaim,
    commitment,
    generate_keys,
    load_claim,
    save_claim,
    sign,
)
from ticketguard.verification.dispute import Dispute, dispute
from ticketguard.verification.verify import verify, verify_key

__all__ = [
    "ATTACKS",
    "DEFAULT_ALPHA",
    "BatchMixer",
    "Claim",
    "DefenceClaim",
    "Dispute",
    "Evidence",
    "ImageData",
    "InputError",
    "Key",
    "Mask",
    "MaskKeeper",
    "Normalization",
    "Protected",
    "SearchConfig",
    "Signature",
    "SignatureConfig",
    "Suspect",
    "Ticket",
    "TrainConfig",
    "TrainFn",
    "TriggerClaim",
    "TriggerConfig",
    "TriggerSet",
    "Unavailable",
    "Verdict",
    "__version__",
    "attack",
    "build_model",
    "commitment",
    "dispute",
    "find_extreme_ticket",
    "generate_keys",
    "keep_mask",
    "keyed_trigger_for",
    "keyed_trigger_set",
    "load_claim",
    "load_dataset",
    "load_subset",
    "load_suspect",
    "load_trigger_folder",
    "merge_key",
    "protect",
    "prunable_names",
    "save_claim",
    "sign",
    "sign_mask",
    "split_key",
    "train",
    "trust_model_code",
    "verify",
    "verify_key",
]
