"""Which sides of a matrix (modes of a tensor) get a factor: the memory-aware rule SPlus, SOAP, TNT and Shampoo
share (``max_factor_ratio``). A side's factor and its basis / root / inverse are ``2 d²`` numbers against the
parameter's ``Π d_j``: a vocabulary-sized side of an embedding or head costs (vocabulary / width) times the
parameter twice over, while a square or 1:4 hidden matrix costs 4× and 8.5×. The rule leaves out the largest
side while the others' cost exceeds the ratio, so the big side of a long matrix goes first and hidden matrices
keep both."""

from __future__ import annotations

import math

from .checks import check_range

__all__ = ["SMALL_FACTORS", "ALWAYS_KEPT_SIDE", "DEFAULT_MAX_FACTOR_RATIO", "kept_sides", "check_max_factor_ratio"]

# Factors of at most this many numbers in all (256 KiB in float32) are kept whatever max_factor_ratio says: they
# cost nothing worth saving, and small blocks keep the papers' preconditioning exactly.
SMALL_FACTORS = 2**16
# SPlus, SOAP and TNT never leave out a side of at most this size (its factor and basis take at most 8 MiB in
# float32): a small head's or a patch embedding's side (a (10, 256) head: 2·256² is 51× the head, but 0.5 MiB) keeps
# the paper's preconditioning; the rule is for vocabulary-sized sides. Shampoo's blocks (issue 11) have no such floor.
ALWAYS_KEPT_SIDE = 1024
# Shampoo's default r (issue 11) and the value docs/memory.md measured for SPlus and SOAP, whose default stays the
# papers' rule (None): leaving a 2048-word vocabulary side out cost 0.12-0.13 of validation loss there (issue 23).
DEFAULT_MAX_FACTOR_RATIO = 20.0


def kept_sides(dims: tuple[int, ...], candidates, max_factor_ratio: float | None,
               always_kept: int = 0) -> tuple[int, ...]:
    """The sides (indices into ``dims``) among ``candidates`` that keep a factor: all of them when
    ``max_factor_ratio`` is None; else, largest first, sides are left out while ``2 Σ d_j²`` over the rest exceeds
    both ``max_factor_ratio · Π dims`` and :data:`SMALL_FACTORS`, except that a side of at most ``always_kept`` is
    never left out (SPlus, SOAP, TNT: :data:`ALWAYS_KEPT_SIDE`; Shampoo: 0)."""
    sides = list(candidates)
    if max_factor_ratio is not None:
        numel = math.prod(dims)
        while sides and 2 * sum(dims[j] ** 2 for j in sides) > max(max_factor_ratio * numel, SMALL_FACTORS):
            largest = max(sides, key=lambda j: dims[j])
            if dims[largest] <= always_kept:
                break
            sides.remove(largest)
    return tuple(sides)


def check_max_factor_ratio(value) -> None:
    if value is not None:
        check_range("max_factor_ratio", value, 2.0, 1e6)
