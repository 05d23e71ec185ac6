"""Host syncs and dispatched ops of an ordinary step (benchmarks/host_syncs.py's counter), held to what they are
today so that none grows unnoticed. Issue 22's goal is 0 syncs and ops that do not grow with the number of
same-shape layers; these ceilings come down as that work lands (docs/performance.md has the table)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from host_syncs import NAMES, counts  # noqa: E402

# optimizer -> (host syncs per ordinary step, ops at 16 blocks / ops at 4 blocks), measured 2026-12-07 (torch 2.13)
CEILINGS = {
    "SPlus": (1, 2.79), "SOAP": (1, 3.18), "Shampoo": (1, 2.81), "PSGDKron": (2, 1.81), "Muon": (2, 2.57),
    "SpecGD": (2, 2.44), "Scion": (2, 3.56), "Conda": (1, 4.05), "Prodigy": (2, 3.92), "ScheduleFreeAdamW": (1, 2.43),
    "TNT": (1, 3.90), "Sophia": (1, 1.89), "KFAC": (2, 3.78), "EKFAC": (2, 3.81), "MFAC": (2, 3.78),
}


def test_every_counted_optimizer_has_a_ceiling():
    assert set(NAMES) == set(CEILINGS)


@pytest.mark.parametrize("name", NAMES)
def test_ordinary_step_syncs_and_ops_do_not_grow(name):
    syncs, ops4 = counts(name, 4)
    syncs16, ops16 = counts(name, 16)
    most_syncs, most_ratio = CEILINGS[name]
    assert syncs <= most_syncs and syncs16 <= most_syncs, (syncs, syncs16)
    assert ops16 / ops4 <= most_ratio + 0.01, (ops4, ops16)
