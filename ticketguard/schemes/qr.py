"""QR codes as boolean module arrays, split into fixed patterns and data modules.

The signature is embedded as the QR *data modules* only: finder, timing and alignment
patterns, format/version information and the dark module follow from version, error level
and mask pattern, so they carry no information and are restored on extraction. Arrays are
numpy bool with True = dark module. Attacks (pruning) mostly turn dark modules light, and
`decode` exploits that known flip direction: bits read from dark modules are trusted.

No library exposes where the data modules sit or in which order codewords are placed, so
the layout, the Reed-Solomon block table and the bit-stream parser follow ISO/IEC 18004
directly; the tests cross-check layout and block table against segno.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from math import comb
from typing import Literal, NamedTuple

import numpy as np
import reedsolo
import segno
import zxingcpp

from ticketguard.core.errors import InputError

ERROR_LEVELS = ("L", "M", "Q", "H")
_FORMAT_LEVEL_BITS = {"L": 1, "M": 0, "Q": 3, "H": 2}

# ISO/IEC 18004 Table 9, indexed [level][version - 1]: EC codewords per block, number of blocks.
# The block lengths follow from these and the version's codeword count.
_EC_PER_BLOCK = {
    "L": (7, 10, 15, 20, 26, 18, 20, 24, 30, 18, 20, 24, 26, 30, 22, 24, 28, 30, 28, 28,
          28, 28, 30, 30, 26, 28, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30),
    "M": (10, 16, 26, 18, 24, 16, 18, 22, 22, 26, 30, 22, 22, 24, 24, 28, 28, 26, 26, 26,
          26, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28),
    "Q": (13, 22, 18, 26, 18, 24, 18, 22, 20, 24, 28, 26, 24, 20, 30, 24, 28, 28, 26, 30,
          28, 30, 30, 30, 30, 28, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30),
    "H": (17, 28, 22, 16, 22, 28, 26, 26, 24, 28, 24, 28, 22, 24, 24, 30, 28, 28, 26, 28,
          30, 24, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30),
}
_NUM_BLOCKS = {
    "L": (1, 1, 1, 1, 1, 2, 2, 2, 2, 4, 4, 4, 4, 4, 6, 6, 6, 6, 7, 8,
          8, 9, 9, 10, 12, 12, 12, 13, 14, 15, 16, 17, 18, 19, 19, 20, 21, 22, 24, 25),
    "M": (1, 1, 1, 2, 2, 4, 4, 4, 5, 5, 5, 8, 9, 9, 10, 10, 11, 13, 14, 16,
          17, 17, 18, 20, 21, 23, 25, 26, 28, 29, 31, 33, 35, 37, 38, 40, 43, 45, 47, 49),
    "Q": (1, 1, 2, 2, 4, 4, 6, 6, 8, 8, 8, 10, 12, 16, 12, 17, 16, 18, 21, 20,
          23, 23, 25, 27, 29, 34, 34, 35, 38, 40, 43, 45, 48, 51, 53, 56, 59, 62, 65, 68),
    "H": (1, 1, 2, 4, 4, 4, 5, 6, 8, 8, 11, 11, 16, 16, 18, 16, 19, 21, 25, 25,
          25, 34, 30, 32, 35, 37, 40, 42, 45, 48, 51, 54, 57, 60, 63, 66, 70, 74, 77, 81),
}

# Data mask conditions (True = invert the module), i = row, j = column.
MASK_PATTERNS: tuple[Callable[[np.ndarray, np.ndarray], np.ndarray], ...] = (
    lambda i, j: (i + j) % 2 == 0,
    lambda i, j: i % 2 == 0,
    lambda i, j: j % 3 == 0,
    lambda i, j: (i + j) % 3 == 0,
    lambda i, j: (i // 2 + j // 3) % 2 == 0,
    lambda i, j: (i * j) % 2 + (i * j) % 3 == 0,
    lambda i, j: ((i * j) % 2 + (i * j) % 3) % 2 == 0,
    lambda i, j: ((i + j) % 2 + (i * j) % 3) % 2 == 0,
)

# make_qr forces UTF-8 in byte mode, so segno never picks Kanji mode and the bytes of a
# byte segment have exactly one reading. Mode indicator -> character-count bits for
# versions 1-9, 10-26, 27-40.
_NUMERIC, _ALPHANUMERIC, _BYTE = 1, 2, 4
_COUNT_BITS = {_NUMERIC: (10, 12, 14), _ALPHANUMERIC: (9, 11, 13), _BYTE: (8, 16, 16)}
_ALPHANUMERIC_CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ $%*+-./:"

# Accept a Reed-Solomon result only when a random word would decode this way with at most
# this probability (see _miscorrection_chance); keeps heavy erasure use from inventing text.
_MAX_MISCORRECTION = 1e-7
# Equations beyond the unknowns that _solve_dark_only keeps as checks: a wrong or
# model-violating solution survives them with probability about 2**-8 before the
# re-encoding check. Each extra one costs robustness (8 instead of 0 lowers the median
# tolerated loss for version 1-H from ~30 % to ~24 % of the dark modules).
_SPARE_EQUATIONS = 8
_PAD_CODEWORDS = np.array([0xEC, 0x11], dtype=np.uint8)
_MAX_PADDING_GUESSES = 3
_QUIET_ZONE = 4
_PIXELS_PER_MODULE = 4


@dataclass(frozen=True)
class QrSpec:
    """Everything besides the data modules that is needed to rebuild a symbol."""

    version: int
    error: str
    mask_pattern: int

    def __post_init__(self) -> None:
        if not 1 <= self.version <= 40:
            raise InputError(f"QR version must be 1..40, got {self.version}")
        if self.error not in ERROR_LEVELS:
            raise InputError(f"QR error level must be one of {ERROR_LEVELS}, got {self.error!r}")
        if not 0 <= self.mask_pattern <= 7:
            raise InputError(f"QR mask pattern must be 0..7, got {self.mask_pattern}")

    @property
    def size(self) -> int:
        return 17 + 4 * self.version


@dataclass(frozen=True)
class QrCode:
    """A full symbol (no quiet zone) with the positions of its data modules."""

    spec: QrSpec
    matrix: np.ndarray
    data_positions: np.ndarray

    @property
    def data_modules(self) -> np.ndarray:
        """The modules that carry codewords, in placement order: what gets embedded."""
        return self.matrix[self.data_positions[:, 0], self.data_positions[:, 1]]


@dataclass(frozen=True)
class DecodeResult:
    """Decoded text (None when nothing passed the checks) and how it was obtained."""

    text: str | None
    method: Literal["zxing", "reed-solomon", "failed"]
    corrected: int


_FAILED = DecodeResult(None, "failed", 0)


def make_qr(payload: str, *, error: str = "H", version: int | None = None,
            mask_pattern: int | None = None) -> QrCode:
    """Encode payload with segno (byte mode as UTF-8); segno picks version/mask if not given."""
    error = error.upper()
    if error not in ERROR_LEVELS:
        raise InputError(f"QR error level must be one of {ERROR_LEVELS}, got {error!r}")
    try:
        symbol = segno.make_qr(payload, error=error, version=version, mask=mask_pattern,
                               encoding="utf-8", boost_error=False)
    except segno.DataOverflowError as exc:
        limit = version or 40
        raise InputError(
            f"signature needs {len(payload.encode('utf-8'))} bytes but QR version {limit} at "
            f"level {error} holds {byte_capacity(limit, error)}; use a larger QR version or "
            "a shorter signature") from exc
    spec = QrSpec(symbol.version, symbol.error, symbol.mask)
    return QrCode(spec, np.array(symbol.matrix, dtype=bool), data_positions(spec))


def data_positions(spec_or_version: QrSpec | int) -> np.ndarray:
    """(row, col) of every data module in placement order, remainder bits last (read-only)."""
    version = spec_or_version.version if isinstance(spec_or_version, QrSpec) else spec_or_version
    if not 1 <= version <= 40:
        raise InputError(f"QR version must be 1..40, got {version}")
    return _data_positions(version)


def function_pattern_matrix(spec: QrSpec) -> tuple[np.ndarray, np.ndarray]:
    """(is_function, value): which modules are fixed patterns and their colours."""
    is_function, value = (array.copy() for array in _fixed_layout(spec.version))
    rows, cols = _format_positions(spec.size)
    code = _bch_code(_FORMAT_LEVEL_BITS[spec.error] << 3 | spec.mask_pattern, 0x537) ^ 0x5412
    value[rows, cols] = np.tile(_bits_lsb_first(code, 15), 2)
    return is_function, value


def assemble(spec: QrSpec, data_modules: np.ndarray) -> np.ndarray:
    """The full symbol: data modules at their positions plus the restored fixed patterns."""
    modules = _as_modules(spec, data_modules, "data_modules")
    positions = data_positions(spec)
    _, matrix = function_pattern_matrix(spec)
    matrix[positions[:, 0], positions[:, 1]] = modules
    return matrix


def decode(spec: QrSpec, data_modules: np.ndarray, *, erasures: np.ndarray | None = None,
           dark_only_lost: bool = True, use_zxing: bool = True) -> DecodeResult:
    """Read text from (possibly damaged) data modules: zxing first, then our own RS decoder.

    erasures flags modules known to be unreliable (their bits are not trusted, their
    codewords are RS erasures). dark_only_lost states that damage only turned dark modules
    light: every observed dark module is then trusted, which lets the RS decoder solve for
    the rest and tolerate more than twice the damage zxing does. Text is returned only
    when it passed the Reed-Solomon checks and re-encodes to exactly the corrected codewords.
    use_zxing=False skips zxing, e.g. to test or measure the RS decoder alone.
    """
    observed = _as_modules(spec, data_modules, "data_modules")
    found = _zxing_decode(spec, observed, dark_only_lost) if use_zxing else None
    if found is not None:
        return found
    unreliable = (np.zeros_like(observed) if erasures is None
                  else _as_modules(spec, erasures, "erasures"))
    return _reed_solomon_decode(spec, observed, unreliable, dark_only_lost)


def _as_modules(spec: QrSpec, modules: np.ndarray, name: str) -> np.ndarray:
    modules = np.asarray(modules, dtype=bool)
    expected = (len(data_positions(spec)),)
    if modules.shape != expected:
        raise InputError(f"{name} must have shape {expected} for QR version {spec.version}, "
                         f"got {modules.shape}")
    return modules


def _bits_lsb_first(value: int, count: int) -> np.ndarray:
    return (value >> np.arange(count)) & 1 == 1


def _bch_code(data: int, poly: int) -> int:
    """data followed by its BCH check bits (remainder of data * x^deg(poly) mod poly)."""
    degree = poly.bit_length() - 1
    remainder = data << degree
    for bit in range(remainder.bit_length() - 1, degree - 1, -1):
        if remainder >> bit & 1:
            remainder ^= poly << (bit - degree)
    return data << degree | remainder


def _alignment_centers(version: int) -> list[int]:
    """Row/column coordinates of alignment pattern centres (evenly spaced from the end)."""
    if version == 1:
        return []
    count = version // 7 + 2
    step = (version * 8 + count * 3 + 5) // (count * 4 - 4) * 2
    last = 10 + 4 * version
    return [6] + [last - k * step for k in range(count - 2, -1, -1)]


def _format_positions(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of format bits 0..14 (LSB first): the copy near the top-left finder, then
    the copy split between the other two finders."""
    rows = np.r_[0:6, 7, 8, 8, [8] * 6, [8] * 8, size - 7:size]
    cols = np.r_[[8] * 8, 7, 5:-1:-1, size - 1:size - 9:-1, [8] * 7]
    return rows, cols


def _stamp(is_function: np.ndarray, value: np.ndarray, pattern: np.ndarray,
           row: int, col: int) -> None:
    """Write a square pattern centred at (row, col), clipped to the symbol."""
    size, half = is_function.shape[0], pattern.shape[0] // 2
    top, left = row - half, col - half
    rows = slice(max(top, 0), min(top + pattern.shape[0], size))
    cols = slice(max(left, 0), min(left + pattern.shape[0], size))
    is_function[rows, cols] = True
    value[rows, cols] = pattern[rows.start - top:rows.stop - top,
                                cols.start - left:cols.stop - left]


def _ring_pattern(radius: int, light_rings: tuple[int, ...]) -> np.ndarray:
    offsets = np.abs(np.arange(-radius, radius + 1))
    ring = np.maximum(offsets[:, None], offsets[None, :])
    return ~np.isin(ring, light_rings)


@cache
def _fixed_layout(version: int) -> tuple[np.ndarray, np.ndarray]:
    """Function modules of a version with their colours; format areas reserved as light."""
    size = 17 + 4 * version
    is_function = np.zeros((size, size), dtype=bool)
    value = np.zeros((size, size), dtype=bool)
    timing = np.arange(size) % 2 == 0
    is_function[6, :] = is_function[:, 6] = True
    value[6, :] = value[:, 6] = timing
    finder = _ring_pattern(4, (2, 4))
    for row, col in ((3, 3), (3, size - 4), (size - 4, 3)):
        _stamp(is_function, value, finder, row, col)
    centers = _alignment_centers(version)
    corners = {(6, 6), (6, size - 7), (size - 7, 6)}
    for row in centers:
        for col in centers:
            if (row, col) not in corners:
                _stamp(is_function, value, _ring_pattern(2, (1,)), row, col)
    is_function[_format_positions(size)] = True
    if version >= 7:
        index = np.arange(18)
        near, far = index // 3, size - 11 + index % 3
        bits = _bits_lsb_first(_bch_code(version, 0x1F25), 18)
        is_function[near, far] = is_function[far, near] = True
        value[near, far] = value[far, near] = bits
    is_function[size - 8, 8] = value[size - 8, 8] = True
    is_function.flags.writeable = value.flags.writeable = False
    return is_function, value


@cache
def _data_positions(version: int) -> np.ndarray:
    """Zigzag walk: two-column strips from the right (column 6 skipped), alternately upward
    and downward, right column before left, skipping function modules."""
    size = 17 + 4 * version
    rights = np.r_[size - 1:7:-2, 5, 3, 1]
    upward = np.arange(len(rights)) % 2 == 0
    rows = np.where(upward[:, None], np.arange(size)[::-1], np.arange(size)).repeat(2, axis=1)
    cols = np.tile(rights[:, None] - np.array([0, 1]), (1, size))
    rows, cols = rows.ravel(), cols.ravel()
    keep = ~_fixed_layout(version)[0][rows, cols]
    positions = np.stack([rows[keep], cols[keep]], axis=1)
    positions.flags.writeable = False
    return positions


def _total_codewords(version: int) -> int:
    return len(_data_positions(version)) // 8


def byte_capacity(version: int, error: str) -> int:
    """Bytes that fit in byte mode: data bits minus mode indicator and character count."""
    data_codewords = _total_codewords(version) - (
        _NUM_BLOCKS[error][version - 1] * _EC_PER_BLOCK[error][version - 1])
    return (8 * data_codewords - 4 - _COUNT_BITS[_BYTE][_version_group(version)]) // 8


def _version_group(version: int) -> int:
    return 0 if version < 10 else 1 if version < 27 else 2


@cache
def block_layout(version: int, error: str) -> tuple[int, tuple[np.ndarray, ...]]:
    """(EC codewords per block, stream index of each block's codewords, data then EC).

    Blocks are interleaved codeword by codeword: all data codewords first (the later,
    longer blocks have one extra), then all EC codewords.
    """
    ec_len, blocks = _EC_PER_BLOCK[error][version - 1], _NUM_BLOCKS[error][version - 1]
    total = _total_codewords(version)
    data_lens = np.full(blocks, total // blocks - ec_len)
    data_lens[blocks - total % blocks:] += 1
    present = np.arange(data_lens.max())[:, None] < data_lens[None, :]
    data_index = np.zeros(present.shape, dtype=np.int64)
    data_index[present] = np.arange(np.count_nonzero(present))
    ec_index = np.count_nonzero(present) + np.arange(ec_len * blocks).reshape(ec_len, blocks)
    return ec_len, tuple(np.concatenate([data_index[:n, b], ec_index[:, b]])
                         for b, n in enumerate(data_lens))


def data_codeword_order(spec: QrSpec) -> np.ndarray:
    """Stream index of each data codeword in bit-stream order (block after block)."""
    ec_len, blocks = block_layout(spec.version, spec.error)
    return np.concatenate([index[:-ec_len] for index in blocks])


def _codewords(spec: QrSpec, modules: np.ndarray) -> np.ndarray:
    """Unmasked codeword stream (uint8, placement order), remainder bits dropped."""
    n_bits = 8 * _total_codewords(spec.version)
    positions = data_positions(spec)[:n_bits]
    flip = MASK_PATTERNS[spec.mask_pattern](positions[:, 0], positions[:, 1])
    return np.packbits(modules[:n_bits] ^ flip)


def _contradicts(observed: np.ndarray, expected: np.ndarray) -> bool:
    """True when a module is dark although it should be light: impossible if only dark is lost."""
    n_bits = len(observed) // 8 * 8
    return bool(np.any(observed[:n_bits] & ~expected[:n_bits]))


def _reencoded_modules(spec: QrSpec, text: str) -> np.ndarray | None:
    try:
        code = make_qr(text, error=spec.error, version=spec.version,
                       mask_pattern=spec.mask_pattern)
    except ValueError:
        return None
    return code.data_modules if code.spec == spec else None


def _zxing_decode(spec: QrSpec, observed: np.ndarray, dark_only_lost: bool) -> DecodeResult | None:
    """zxing's text, kept only if its re-encoding lies within every block's error radius of
    what was read (so it is the RS decoding, not a charset guess or a miscorrection) and, under
    dark-only loss, is dark wherever a dark module was read."""
    text = _zxing_text(assemble(spec, observed))
    expected = None if text is None else _reencoded_modules(spec, text)
    if expected is None or (dark_only_lost and _contradicts(observed, expected)):
        return None
    received, clean = _codewords(spec, observed), _codewords(spec, expected)
    ec_len, blocks = block_layout(spec.version, spec.error)
    if any(np.count_nonzero(received[index] != clean[index]) > ec_len // 2 for index in blocks):
        return None
    return DecodeResult(text, "zxing", int(np.count_nonzero(received != clean)))


def _zxing_text(matrix: np.ndarray) -> str | None:
    """zxing-cpp on the symbol rendered as a clean grayscale image (black = 0)."""
    padded = np.pad(matrix, _QUIET_ZONE)
    image = padded.repeat(_PIXELS_PER_MODULE, axis=0).repeat(_PIXELS_PER_MODULE, axis=1)
    found = zxingcpp.read_barcodes(
        np.where(image, 0, 255).astype(np.uint8), formats=zxingcpp.BarcodeFormat.QRCode,
        is_pure=True, try_rotate=False, try_downscale=False, try_invert=False,
        text_mode=zxingcpp.TextMode.Plain)
    return next((barcode.text for barcode in found
                 if barcode.valid and barcode.format == zxingcpp.BarcodeFormat.QRCode), None)


class _Evidence(NamedTuple):
    """Per codeword: value read, value assumed before correction, bits read from dark
    modules, flagged unreliable by the caller, assumed known (never erased)."""

    received: np.ndarray
    assumed: np.ndarray
    dark_bits: np.ndarray
    forced: np.ndarray
    known: np.ndarray

    def take(self, index: np.ndarray) -> _Evidence:
        return _Evidence(*(field[index] for field in self))


def _reed_solomon_decode(spec: QrSpec, observed: np.ndarray, unreliable: np.ndarray,
                         dark_only_lost: bool) -> DecodeResult:
    """Correct every RS block, parse the bit stream and verify it by re-encoding; when only
    dark modules get lost, retry with guessed pad codewords."""
    received = _codewords(spec, observed)
    n_bits = 8 * len(received)
    evidence = _Evidence(received, received, np.packbits(observed[:n_bits]),
                         unreliable[:n_bits].reshape(-1, 8).any(axis=1),
                         np.zeros(len(received), dtype=bool))
    guesses = _padding_guesses(spec, evidence) if dark_only_lost else []
    for attempt in [evidence, *guesses]:
        stream = _correct_stream(spec, attempt, dark_only_lost)
        text = None if stream is None else _verified_text(spec, stream)
        if text is not None:
            return DecodeResult(text, "reed-solomon", int(np.count_nonzero(stream != received)))
    return _FAILED


def _padding_guesses(spec: QrSpec, evidence: _Evidence) -> list[_Evidence]:
    """Evidence with pad codewords (0xEC, 0x11, ...) assumed from data codeword `start` on,
    for the first few starts that no observed dark module contradicts.

    A short payload is followed by known pad codewords; assuming them shortens the code, so
    the same EC codewords cover more damage in the rest.
    """
    order, guesses = data_codeword_order(spec), []
    for start in range(1, len(order)):
        where = order[start:]
        pads = np.resize(_PAD_CODEWORDS, len(where))
        if np.any((pads ^ evidence.received[where]) & evidence.dark_bits[where]):
            continue
        assumed, known = evidence.assumed.copy(), evidence.known.copy()
        assumed[where], known[where] = pads, True
        guesses.append(evidence._replace(assumed=assumed, known=known))
        if len(guesses) == _MAX_PADDING_GUESSES:
            break
    return guesses


def _correct_stream(spec: QrSpec, evidence: _Evidence, dark_only_lost: bool) -> np.ndarray | None:
    ec_len, blocks = block_layout(spec.version, spec.error)
    stream = evidence.assumed.copy()
    for index in blocks:
        fixed = _correct_block(evidence.take(index), ec_len, dark_only_lost)
        if fixed is None:
            return None
        stream[index] = fixed
    return stream


def _verified_text(spec: QrSpec, stream: np.ndarray) -> str | None:
    """Text of the data codewords, only if re-encoding it gives exactly this stream."""
    text = _parse_text(np.unpackbits(stream[data_codeword_order(spec)]), spec.version)
    expected = None if text is None else _reencoded_modules(spec, text)
    if expected is None or not np.array_equal(_codewords(spec, expected), stream):
        return None
    return text


def _correct_block(block: _Evidence, ec_len: int, dark_only_lost: bool) -> np.ndarray | None:
    """One RS block: under dark-only loss first _solve_dark_only, then errors-and-erasures
    decoding (2 * errors + erasures <= ec_len). The caller's codewords are erased and, under
    dark-only loss, also the k with the most light modules (the likeliest damaged) for growing
    k, i.e. generalised minimum distance decoding. The first result that changes only bits
    read from light modules and is unlikely to be a miscorrection wins.
    """
    solved = _solve_dark_only(block, ec_len) if dark_only_lost else None
    if solved is not None:
        return solved
    light = 8 - np.unpackbits(block.dark_bits[:, None], axis=1).sum(axis=1)
    order = np.lexsort((-light, ~block.forced, block.known))
    first = int(np.count_nonzero(block.forced & ~block.known))
    last = min(ec_len, int(np.count_nonzero(~block.known))) if dark_only_lost else first
    for n_erased in range(first, last + 1):
        erased = order[:n_erased]
        candidate = _rs_correct(block.assumed, ec_len, erased)
        if candidate is None:
            continue
        changed = candidate != block.assumed
        errors = int(np.count_nonzero(changed)) - int(np.count_nonzero(changed[erased]))
        chance = _miscorrection_chance(len(changed) - n_erased, errors, ec_len - n_erased)
        lost_dark = dark_only_lost and np.any((candidate ^ block.received) & block.dark_bits)
        if chance <= _MAX_MISCORRECTION and not lost_dark:
            return candidate
    return None


def _solve_dark_only(block: _Evidence, ec_len: int) -> np.ndarray | None:
    """Block codeword from the bits read from dark modules alone.

    When only dark modules get lost, those bits are all correct. RS codes are linear over
    GF(2), so the data bits read from light modules are the solution of the linear equations
    that the trusted EC bits impose. This reaches far beyond the 2 * errors + erasures bound,
    but only a unique solution with spare equations left as checks is accepted.
    """
    n_data_bits = 8 * (len(block.received) - ec_len)
    bits = np.unpackbits(block.assumed).astype(bool)
    trusted = (np.unpackbits(block.dark_bits).astype(bool) & ~np.repeat(block.forced, 8)
               | np.repeat(block.known, 8))
    free, checks = ~trusted[:n_data_bits], trusted[n_data_bits:]
    if np.count_nonzero(checks) - np.count_nonzero(free) < _SPARE_EQUATIONS:
        return None
    parity = _parity_matrix(n_data_bits // 8, ec_len)
    fixed_part = _gf2_product(bits[:n_data_bits] & ~free, parity[:, checks])
    solution = _solve_gf2(parity[free][:, checks].T, bits[n_data_bits:][checks] ^ fixed_part)
    if solution is None:
        return None
    data = bits[:n_data_bits].copy()
    data[free] = solution
    return np.packbits(np.concatenate([data, _gf2_product(data, parity)]))


def _gf2_product(vector: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    return (vector.astype(np.int64) @ matrix.astype(np.int64)) % 2 == 1


def _solve_gf2(matrix: np.ndarray, rhs: np.ndarray) -> np.ndarray | None:
    """Unique x with matrix @ x = rhs over GF(2) (Gauss-Jordan); None when a variable stays
    free or the left-over equations contradict it."""
    cols = matrix.shape[1]
    system = np.concatenate([matrix, rhs[:, None]], axis=1)
    for col in range(cols):
        candidates = np.flatnonzero(system[col:, col])
        if len(candidates) == 0:
            return None
        pivot = col + candidates[0]
        system[[col, pivot]] = system[[pivot, col]]
        hits = system[:, col].copy()
        hits[col] = False
        system[hits] ^= system[col]
    return None if system[cols:, -1].any() else system[:cols, -1]


@cache
def _parity_matrix(data_len: int, ec_len: int) -> np.ndarray:
    """(8 * data_len, 8 * ec_len) bool: the EC bits each data bit flips (RS is GF(2)-linear)."""
    units = np.eye(8 * data_len, dtype=bool)
    rows = [_codec(ec_len).encode(bytearray(np.packbits(unit).tobytes()))[data_len:]
            for unit in units]
    parity = np.unpackbits(np.frombuffer(b"".join(rows), dtype=np.uint8)).reshape(len(units), -1)
    parity = parity.astype(bool)
    parity.flags.writeable = False
    return parity


def _miscorrection_chance(length: int, errors: int, redundancy: int) -> float:
    """Probability that a random word lies within `errors` of some codeword of a code with
    `redundancy` check symbols over the non-erased `length` positions."""
    return comb(length, errors) * 255.0 ** errors / 256.0 ** redundancy


@cache
def _codec(ec_len: int) -> reedsolo.RSCodec:
    """QR's Reed-Solomon code: GF(256) with polynomial 0x11D, generator 2, first root 2^0."""
    return reedsolo.RSCodec(ec_len, fcr=0, prim=0x11D, generator=2)


def _rs_correct(received: np.ndarray, ec_len: int, erased: np.ndarray) -> np.ndarray | None:
    try:
        _, full, _ = _codec(ec_len).decode(bytearray(received.tobytes()),
                                           erase_pos=erased.tolist())
    except reedsolo.ReedSolomonError:
        return None
    return np.frombuffer(bytes(full), dtype=np.uint8)


class _BitReader:
    """Big-endian reader over a bit array; raises ValueError when reading past the end."""

    def __init__(self, bits: np.ndarray) -> None:
        self.bits, self.pos = bits, 0

    def remaining(self) -> int:
        return len(self.bits) - self.pos

    def read(self, count: int) -> int:
        if count > self.remaining():
            raise ValueError("bit stream ends inside a segment")
        chunk = self.bits[self.pos:self.pos + count]
        self.pos += count
        return int(chunk.astype(np.int64) @ (1 << np.arange(count - 1, -1, -1)))


def _parse_text(bits: np.ndarray, version: int) -> str | None:
    """Text of a data bit stream up to the terminator; None when malformed or unsupported."""
    reader, parts = _BitReader(bits), []
    try:
        while reader.remaining() >= 4 and (mode := reader.read(4)) != 0:
            if mode not in _SEGMENT_READERS:
                return None
            count = reader.read(_COUNT_BITS[mode][_version_group(version)])
            parts.append(_SEGMENT_READERS[mode](reader, count))
    except ValueError:
        return None
    return "".join(parts)


def _read_numeric(reader: _BitReader, count: int) -> str:
    digits = []
    for size in [3] * (count // 3) + ([count % 3] if count % 3 else []):
        value = reader.read({3: 10, 2: 7, 1: 4}[size])
        if value >= 10 ** size:
            raise ValueError("numeric group out of range")
        digits.append(str(value).zfill(size))
    return "".join(digits)


def _read_alphanumeric(reader: _BitReader, count: int) -> str:
    chars = []
    for size in [2] * (count // 2) + [1] * (count % 2):
        value = reader.read(11 if size == 2 else 6)
        if value >= 45 ** size:
            raise ValueError("alphanumeric group out of range")
        chars += [_ALPHANUMERIC_CHARS[v] for v in divmod(value, 45)[2 - size:]]
    return "".join(chars)


def _read_byte(reader: _BitReader, count: int) -> str:
    """Byte segments are UTF-8 because make_qr asks segno for it (UnicodeError is a ValueError)."""
    return bytes(reader.read(8) for _ in range(count)).decode("utf-8")


_SEGMENT_READERS = {_NUMERIC: _read_numeric, _ALPHANUMERIC: _read_alphanumeric, _BYTE: _read_byte}
