"""Fixed bins and the random order of positions: the rules that collection, merging and pages share.

Everything here is fixed before a run sees any value, so shards, resumed runs and torchrun ranks
bin and sample alike, and their statistics merge exactly:

* **histogram bins** (``stats/hist``): octaves of ``|value|``. Bin 0 holds ``|value| < 2**-10``
  (zeros included), bin ``j`` (1..20) holds ``2**(j-11) <= |value| < 2**(j-10)``, bin 21 holds
  ``|value| >= 2**10``. Within a case every hook has one sign, so ``|value|`` loses nothing. The
  bin of a float32 is its exponent field, so every device bins every value alike (no ``log``);
* **density grid** (``stats/density``): the joint (gate, in) histogram on a signed grid of pairs
  of octaves, mirrored around 0: :data:`DENSITY_EDGES`;
* **bands** (``bands/``): ranges of ``|hook_post|`` (the neuron's output) from weak to strong:
  :data:`BAND_EDGES`, each a union of histogram bins;
* **the sampling order** (``samples/``, ``bands/``): every counted position of the corpus gets a
  pseudo-random priority from (seed, the document's source row, its piece of that row, the
  position); a list keeps the positions of lowest priority, which makes it a uniform random
  sample without replacement of the positions it draws from.
"""

from __future__ import annotations

import numpy as np

#: Octave histogram: 22 bins of ``|value|``, edges ``0, 2**-10, 2**-9, ..., 2**10, inf``.
HIST_LOW_EXPONENT, HIST_HIGH_EXPONENT = -10, 10
HIST_EDGES: np.ndarray = np.array(
    [0.0] + [2.0**e for e in range(HIST_LOW_EXPONENT, HIST_HIGH_EXPONENT + 1)] + [np.inf], dtype=np.float32)
N_BINS = len(HIST_EDGES) - 1

#: Density bin (per sign) of each histogram bin: pairs of octaves, with the under- and overflow
#: bins kept apart: 12 bins per sign with ``|value|`` edges ``0, 2**-10, 2**-8, ..., 2**8, 2**10, inf``.
DENSITY_OF_BIN: np.ndarray = np.array([0] + [(j + 1) // 2 for j in range(1, N_BINS - 1)] + [N_BINS // 2],
                                      dtype=np.int64)
_DENSITY_ABS_EDGES = np.array([HIST_EDGES[int(np.argmax(DENSITY_OF_BIN == b))] for b in range(N_BINS // 2 + 1)]
                              + [np.inf], dtype=np.float32)
#: Signed edges of the density grid, ``-inf .. 0 .. inf`` (25 values, 24 cells per axis). Cell ``j``
#: of a positive value: ``DENSITY_EDGES[j] <= v < DENSITY_EDGES[j+1]``; of a negative value the
#: mirror, ``DENSITY_EDGES[j] < v <= DENSITY_EDGES[j+1]``. An exact zero is in no cell (no case).
DENSITY_EDGES: np.ndarray = np.concatenate([-_DENSITY_ABS_EDGES[::-1], _DENSITY_ABS_EDGES[1:]])
DENSITY_HALF = len(_DENSITY_ABS_EDGES) - 1  # cells per sign
N_DENSITY = 2 * DENSITY_HALF

#: Bands of ``|hook_post|``: ``[0, 2**-6)``, ``[2**-6, 2**-3)``, ``[2**-3, 1)``, ``[1, 8)``, ``[8, inf)``.
BAND_EDGES: np.ndarray = np.array([0.0, 2.0**-6, 2.0**-3, 1.0, 8.0, np.inf], dtype=np.float32)
N_BANDS = len(BAND_EDGES) - 1
#: Band of each histogram bin (every band edge is a histogram edge).
BAND_OF_BIN: np.ndarray = (np.searchsorted(BAND_EDGES, HIST_EDGES[:-1], side="right") - 1).astype(np.int64)

#: Defaults: uniform random examples per case, and examples per (case, band).
SAMPLES = 8
BAND_SAMPLES = 2

#: Priority of an empty list slot: above every real priority (those are below 2**62).
EMPTY_PRIORITY = np.iinfo(np.int64).max

def _as_signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


# splitmix64's constants as signed int64, so numpy and torch multiply them with the same wraparound.
_GOLDEN = _as_signed(0x9E3779B97F4A7C15)
_MIX1 = _as_signed(0xBF58476D1CE4E5B9)
_MIX2 = _as_signed(0x94D049BB133111EB)


def _shift_right(x, bits: int):
    """Logical right shift of int64 values (numpy and torch shift arithmetically)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x):
    """splitmix64's finalizer on int64 arrays (numpy or torch): a bijection that scrambles every bit."""
    x = x + _GOLDEN
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def position_priority(seed: int, source, piece, position):
    """Sampling priority of positions, as int64 in ``[0, 2**62)``: numpy arrays in, numpy out;
    torch tensors in, torch out (identical values). ``source``: the document's row in the source
    dataset; ``piece``: which piece of that row (long rows are split); ``position``: counting the
    document's first token as 0. Broadcasts like arithmetic."""
    with np.errstate(over="ignore"):
        h = _mix(_mix(source * 0 + seed) + source)
        h = _mix(h + piece)
        h = _mix(h + position)
    return _shift_right(h, 2)


def document_pieces(source_index: np.ndarray) -> np.ndarray:
    """Which piece of its source row each document is (0 for the first): a split row's pieces are
    consecutive documents with the same ``source_index``."""
    source_index = np.asarray(source_index, dtype=np.int64)
    if len(source_index) == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.concatenate([[True], source_index[1:] != source_index[:-1]])
    run_start = np.maximum.accumulate(np.where(starts, np.arange(len(source_index)), 0))
    return np.arange(len(source_index)) - run_start


def hist_bin(abs_values: np.ndarray) -> np.ndarray:
    """Histogram bin of each ``|value|`` (float32 semantics), by the edges: the reference rule."""
    return np.searchsorted(HIST_EDGES, np.asarray(abs_values, dtype=np.float32), side="right") - 1
