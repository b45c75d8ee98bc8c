"""ticketguard.schemes.qr: layout cross-checked against segno, decoding under one-directional damage."""

import string

import numpy as np
import pytest
import segno
from hypothesis import given, settings
from hypothesis import strategies as st

from ticketguard.schemes import qr

# ISO/IEC 18004 Table 1: remainder bits after the last codeword, per version range.
REMAINDER_BITS = {range(1, 2): 0, range(2, 7): 7, range(7, 14): 0, range(14, 21): 3,
                  range(21, 28): 4, range(28, 35): 3, range(35, 41): 0}


def lose_dark(modules: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Turn a fraction of the dark modules light, as pruning does."""
    rng = np.random.default_rng(seed)
    dark = np.flatnonzero(modules)
    damaged = modules.copy()
    damaged[rng.choice(dark, round(fraction * len(dark)), replace=False)] = False
    return damaged


def segno_matrix(payload: str, version: int, error: str, mask: int) -> np.ndarray:
    symbol = segno.make_qr(payload, error=error, version=version, mask=mask,
                           encoding="utf-8", boost_error=False)
    return np.array(symbol.matrix, dtype=bool)


def damaged_codewords(spec: qr.QrSpec, clean: np.ndarray, damaged: np.ndarray) -> int:
    n_bits = 8 * (len(clean) // 8)
    return int(np.count_nonzero((clean != damaged)[:n_bits].reshape(-1, 8).any(axis=1)))


@pytest.mark.parametrize("error", qr.ERROR_LEVELS)
@pytest.mark.parametrize("version", range(1, 11))
def test_assemble_reproduces_segno_matrix(version: int, error: str) -> None:
    for mask in range(8):
        reference = segno_matrix("Sig 1", version, error, mask)
        code = qr.make_qr("Sig 1", error=error, version=version, mask_pattern=mask)
        assert np.array_equal(code.matrix, reference)
        assert np.array_equal(qr.assemble(code.spec, code.data_modules), reference)
        is_function, value = qr.function_pattern_matrix(code.spec)
        assert np.array_equal(value[is_function], reference[is_function])


@pytest.mark.parametrize("version", [14, 21, 27, 32, 40])
def test_assemble_reproduces_segno_matrix_for_large_versions(version: int) -> None:
    code = qr.make_qr("Sig 1", error="Q", version=version, mask_pattern=version % 8)
    reference = segno_matrix("Sig 1", version, "Q", version % 8)
    assert np.array_equal(qr.assemble(code.spec, code.data_modules), reference)


@pytest.mark.parametrize("version", range(1, 41))
def test_data_positions_are_exactly_the_non_function_modules(version: int) -> None:
    is_function, _ = qr.function_pattern_matrix(qr.QrSpec(version, "H", 0))
    positions = qr.data_positions(version)
    assert len(np.unique(positions, axis=0)) == len(positions)
    assert not is_function[positions[:, 0], positions[:, 1]].any()
    assert len(positions) == np.count_nonzero(~is_function)


@pytest.mark.parametrize("version", range(1, 41))
def test_data_module_count_matches_codeword_capacity(version: int) -> None:
    blocks = segno.consts.ECC[version][segno.consts.ERROR_MAPPING["H"]]
    total_codewords = sum(block.num_blocks * block.num_total for block in blocks)
    remainder = next(bits for versions, bits in REMAINDER_BITS.items() if version in versions)
    assert len(qr.data_positions(version)) == 8 * total_codewords + remainder


@pytest.mark.parametrize("error", qr.ERROR_LEVELS)
def test_block_table_matches_segno(error: str) -> None:
    for version in range(1, 41):
        blocks = segno.consts.ECC[version][segno.consts.ERROR_MAPPING[error]]
        ec_len, layout = qr.block_layout(version, error)
        assert {block.num_total - block.num_data for block in blocks} == {ec_len}
        assert sorted(len(index) for index in layout) == sorted(
            block.num_total for block in blocks for _ in range(block.num_blocks))


@pytest.mark.parametrize(("payload", "version"), [
    ("HELLO 123", 1), ("0123456789", 2), ("owner: Ada Lovelace", 3),
    ("Signé ✓ 署名", 4), ("x" * 150, 12),
])
def test_roundtrip_clean_code_decodes(payload: str, version: int) -> None:
    code = qr.make_qr(payload, version=version)
    assert qr.decode(code.spec, code.data_modules) == qr.DecodeResult(payload, "zxing", 0)
    fallback = qr.decode(code.spec, code.data_modules, use_zxing=False)
    assert fallback == qr.DecodeResult(payload, "reed-solomon", 0)


@pytest.mark.parametrize(("payload", "version", "fraction"), [
    ("sig-42", 1, 0.05), ("sig-42", 1, 0.15), ("owner: Ada Lovelace", 3, 0.05),
    ("owner: Ada Lovelace", 3, 0.1),
])
def test_rs_fallback_decodes_with_flipped_modules(payload: str, version: int,
                                                  fraction: float) -> None:
    code = qr.make_qr(payload, version=version)
    for seed in range(5):
        damaged = lose_dark(code.data_modules, fraction, seed)
        result = qr.decode(code.spec, damaged, use_zxing=False)
        assert result.text == payload
        assert result.corrected == damaged_codewords(code.spec, code.data_modules, damaged)


def test_rs_fallback_recovers_where_zxing_gives_up() -> None:
    code = qr.make_qr("sig-42", version=1)
    damaged = lose_dark(code.data_modules, 0.2, seed=3)
    assert qr.decode(code.spec, damaged) == qr.DecodeResult(
        "sig-42", "reed-solomon", damaged_codewords(code.spec, code.data_modules, damaged))


def test_rs_fallback_fails_cleanly_far_beyond_budget() -> None:
    code = qr.make_qr("sig-42", version=1)
    for seed in range(10):
        damaged = lose_dark(code.data_modules, 0.7, seed)
        assert qr.decode(code.spec, damaged) == qr.DecodeResult(None, "failed", 0)


def test_decode_never_returns_garbage_under_heavy_or_mixed_damage() -> None:
    rng = np.random.default_rng(7)
    code = qr.make_qr("sig-42", version=1)
    for seed in range(40):
        damaged = lose_dark(code.data_modules, rng.uniform(0.2, 0.6), seed)
        damaged[rng.choice(len(damaged), 3, replace=False)] ^= True
        assert qr.decode(code.spec, damaged).text in (None, "sig-42")
    noise = rng.random(len(code.data_modules)) < 0.5
    assert qr.decode(code.spec, noise, dark_only_lost=False).text is None


def test_errors_in_both_directions_are_corrected_without_dark_only_assumption() -> None:
    code = qr.make_qr("sig-42", version=1)
    damaged = code.data_modules.copy()
    damaged[8 * np.array([0, 5, 11, 17, 23]) + 2] ^= True
    result = qr.decode(code.spec, damaged, dark_only_lost=False, use_zxing=False)
    assert result == qr.DecodeResult("sig-42", "reed-solomon", 5)


def test_erasures_extend_correction_beyond_error_budget() -> None:
    code = qr.make_qr("sig-42", version=1)
    rng = np.random.default_rng(0)
    lost = np.zeros(len(code.data_modules), dtype=bool)
    lost[(8 * rng.choice(26, 12, replace=False)[:, None] + np.arange(8)).ravel()] = True
    damaged = np.where(lost, rng.random(len(lost)) < 0.5, code.data_modules)
    assert qr.decode(code.spec, damaged, dark_only_lost=False, use_zxing=False).text is None
    result = qr.decode(code.spec, damaged, erasures=lost, dark_only_lost=False, use_zxing=False)
    assert result.text == "sig-42"


def test_capacity_error_names_limit_and_fix() -> None:
    with pytest.raises(ValueError, match=r"^signature needs 18 bytes but QR version 2 at level H "
                       r"holds 14; use a larger QR version or a shorter signature$"):
        qr.make_qr("s" * 18, version=2)


def test_invalid_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="version"):
        qr.QrSpec(41, "H", 0)
    with pytest.raises(ValueError, match="mask"):
        qr.QrSpec(1, "H", 8)
    with pytest.raises(ValueError, match="shape"):
        qr.decode(qr.QrSpec(1, "H", 0), np.zeros(100, dtype=bool))


@settings(max_examples=40, deadline=None)
@given(st.text(alphabet=string.printable, max_size=24))
def test_random_ascii_payloads_round_trip(payload: str) -> None:
    code = qr.make_qr(payload, version=3)
    assert qr.decode(code.spec, code.data_modules).text == payload
    assert qr.decode(code.spec, code.data_modules, use_zxing=False).text == payload
