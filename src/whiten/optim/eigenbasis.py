"""Shampoo's two factors of a matrix and their eigenbases, as SPlus and SOAP keep them: a factor per side of an
(m, n) view, refreshed into an orthonormal basis by a robust eigendecomposition."""

from __future__ import annotations

import torch

from ..linalg import robust_eigh_basis, warn_eigh_failure
from .stacks import bucket

__all__ = ["EigenbasisFactors"]


class EigenbasisFactors:
    """Mixin of :class:`WhitenOptimizer` for SPlus and SOAP: ``factor_left``/``factor_right`` and
    ``basis_left``/``basis_right`` in a parameter's state, and their refresh."""

    @staticmethod
    def factor_state(state: dict, matrix: tuple[int, int], left: bool, right: bool, dtype, device,
                     basis_dtype=None) -> dict:
        """Add zero factors ``factor_left`` (m, m) / ``factor_right`` (n, n) and identity bases ``basis_*`` for the
        sides of an (m, n) matrix view that have a factor; returns ``state``. Factors are in ``dtype`` always (their
        EMA adds (1-β)·GGᵀ, and the small eigenvalues the basis is sorted by are differences a bfloat16 factor
        loses); bases in ``basis_dtype`` (default ``dtype``: the ``state_dtype`` option's bfloat16)."""
        for side, d, present in (("left", matrix[0], left), ("right", matrix[1], right)):
            if present:
                state[f"factor_{side}"] = torch.zeros(d, d, dtype=dtype, device=device)
                state[f"basis_{side}"] = torch.eye(d, dtype=basis_dtype or dtype, device=device)
        return state

    def refresh_bases(self, states: list[dict], eps: float, descending: bool = False) -> None:
        """``basis_*`` = eigenvectors of ``factor_* + eps·I`` (ascending eigenvalues, or descending), grouped by
        (size, dtype, device) for robust_eigh_basis; a matrix whose eigendecomposition fails keeps its old basis and
        is counted."""
        pairs = [(s[f"factor_{side}"], s[f"basis_{side}"]) for s in states for side in ("left", "right")
                 if f"factor_{side}" in s]
        # an overflowed factor restarts from zero and keeps its basis this time (not an eigh failure)
        restarted = self.restart_nonfinite([f for f, _ in pairs])
        pairs = [fb for fb, r in zip(pairs, restarted) if not r]
        key = (lambda fb: (fb[0].shape, fb[0].dtype, fb[0].device)) if getattr(self, "batched", True) else id
        for group_pairs in bucket(pairs, key).values():
            result = robust_eigh_basis([f for f, _ in group_pairs], eps)
            self.counters["eigh_retries"] += result.retried
            for (_, basis), ok, vectors in zip(group_pairs, result.ok, result.vectors):
                if ok:
                    basis.copy_(vectors.flip(-1) if descending else vectors)
            failed = result.ok.count(False)
            if failed:
                self.counters["eigh_failures"] += failed
                warn_eigh_failure(type(self).__name__, failed)
