"""Function-preserving disguises: what a thief does for free to scramble every position-based watermark.

Each disguise is ``disguise(weights, mask, **params) -> (weights, mask)``, the attack interface of attacks.py,
so that the registry ``DISGUISES`` can join ``ATTACKS``: ``weights`` is the full state_dict of a registered
ResNet, ``mask`` covers its prunable weights, and the returned mask marks the same weights at their new
places.
In eval mode the disguised network computes the same logits as the original, up to float rounding:

- ``permute`` reorders channels within every permutation group (``permutation_groups``);
- ``rescale`` multiplies conv output channels by positive scales that the next BatchNorm undoes exactly;
- ``fold-bn`` folds every BatchNorm into its conv (a BN-free network: run it with ``build_disguised``);
- ``rename`` renames and reorders the keys;
- ``take_other_units`` (not in the registry: it needs the owner's normalisation) bakes other input units
  into the stem and its BatchNorm;
- ``widen`` adds dummy and split hidden channels (run it with ``build_disguised``).

``permute``, ``rescale``, ``fold-bn`` and ``widen`` read the structure from the registered architecture, so
they take its exact state_dict: in a chain, ``permute`` and ``rescale`` come first, then at most one of
``fold-bn`` and ``widen``, then ``rename``.
``export_onnx`` is the last disguise, a file rather than weights.

The structure they read is in ``structure``; the disguises are grouped by what they move: ``channels``
(``permute``, ``widen``), ``batchnorm`` (``rescale``, ``fold_bn``), ``names`` (``rename``), ``onnx_export``.
"""

from __future__ import annotations

from collections.abc import Callable

from ticketguard.attacks.disguises.batchnorm import fold_bn, rescale, take_other_units
from ticketguard.attacks.disguises.channels import permute, widen
from ticketguard.attacks.disguises.names import rename
from ticketguard.attacks.disguises.onnx_export import export_onnx
from ticketguard.core.masks import Mask
from ticketguard.models.architecture import (
    BN_PARAMETERS,
    BN_STATE,
    CIFAR_STEM_NAMES,
    Architecture,
    PermutationGroup,
    Weights,
    build_disguised,
    conv_bn_pairs,
    permutation_groups,
    torchvision_names,
)

Disguise = Callable[..., tuple[Weights, Mask]]

DISGUISES: dict[str, Disguise] = {
    "permute": permute,
    "rescale": rescale,
    "fold-bn": fold_bn,
    "rename": rename,
    "widen": widen,
}

__all__ = [
    "BN_PARAMETERS",
    "BN_STATE",
    "CIFAR_STEM_NAMES",
    "DISGUISES",
    "Architecture",
    "Disguise",
    "PermutationGroup",
    "Weights",
    "build_disguised",
    "conv_bn_pairs",
    "export_onnx",
    "fold_bn",
    "permutation_groups",
    "permute",
    "rename",
    "rescale",
    "take_other_units",
    "torchvision_names",
    "widen",
]
