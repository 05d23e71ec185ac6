"""Shampoo's two factors of a matrix and their eigenbases, as SPlus and SOAP keep them: a factor per side of an
(m, n) view, refreshed into an orthonormal basis by a robust eigendecomposition. A basis is kept as a tensor
(``basis_left``, in the state dtype or the ``state_dtype`` option's bfloat16) or, with ``basis_bits``, block-wise
quantized (``qbasis_left`` codes and ``qscale_left`` scales, :mod:`whiten.optim.quantize`), dequantized per bucket
on use."""

from __future__ import annotations

import torch

from ..linalg import robust_eigh_basis, warn_eigh_failure
from .quantize import code_shape, dequantize, quantize, rectify
from .stacks import bucket

__all__ = ["EigenbasisFactors", "basis_slots", "read_bases", "write_basis"]

SIDES = ("left", "right")


def basis_slots(side: str, d: int, bits: int | None) -> dict:
    """``{state key: shape}`` of one side's basis: ``basis_{side}`` (d, d), or its codes and scales."""
    if bits is None:
        return {f"basis_{side}": (d, d)}
    codes, scales = code_shape(d, bits)
    return {f"qbasis_{side}": codes, f"qscale_{side}": scales}


def read_bases(S: dict, bits: int | None, dtype: torch.dtype) -> dict:
    """``{"basis_left": Q, "basis_right": Q}`` (the sides ``S`` has) in ``dtype`` from a state or a dict of stacks:
    the stored tensor itself when it has ``dtype``; else cast, or dequantized (4 bits: and rectified)."""
    out = {}
    for side in SIDES:
        if f"basis_{side}" in S:
            Q = S[f"basis_{side}"]
            out[f"basis_{side}"] = Q if Q.dtype == dtype else Q.to(dtype)
        elif f"qbasis_{side}" in S:
            d = S[f"qscale_{side}"].shape[-2]
            Q = dequantize(S[f"qbasis_{side}"], S[f"qscale_{side}"], bits, d, dtype)
            out[f"basis_{side}"] = rectify(Q) if bits == 4 else Q
    return out


def write_basis(S: dict, side: str, Q: torch.Tensor, bits: int | None) -> None:
    """Store the orthonormal ``Q`` as ``side``'s basis in ``S`` (a state or a dict of stacks), in place."""
    if bits is None:
        S[f"basis_{side}"].copy_(Q)
    else:
        codes, scales = quantize(Q, bits)
        S[f"qbasis_{side}"].copy_(codes)
        S[f"qscale_{side}"].copy_(scales)


class EigenbasisFactors:
    """Mixin of :class:`WhitenOptimizer` for SPlus and SOAP: ``factor_left``/``factor_right`` and their bases in a
    parameter's state, and their refresh."""

    @staticmethod
    def factor_state(state: dict, matrix: tuple[int, int], left: bool, right: bool, dtype, device,
                     basis_dtype=None, basis_bits: int | None = None) -> dict:
        """Add zero factors ``factor_left`` (m, m) / ``factor_right`` (n, n) and identity bases for the sides of an
        (m, n) matrix view that have a factor; returns ``state``. Factors are in ``dtype`` always (their EMA adds
        (1-β)·GGᵀ, and the small eigenvalues the basis is sorted by are differences a bfloat16 factor loses);
        bases in ``basis_dtype`` (default ``dtype``: the ``state_dtype`` option's bfloat16), or quantized to
        ``basis_bits``."""
        for side, d, present in (("left", matrix[0], left), ("right", matrix[1], right)):
            if present:
                state[f"factor_{side}"] = torch.zeros(d, d, dtype=dtype, device=device)
                if basis_bits is None:
                    state[f"basis_{side}"] = torch.eye(d, dtype=basis_dtype or dtype, device=device)
                elif device == torch.device("meta") or str(device) == "meta":
                    for key, shape in basis_slots(side, d, basis_bits).items():
                        state[key] = torch.empty(shape, device=device,
                                                 dtype=torch.uint8 if key.startswith("qbasis") else torch.float32)
                else:
                    codes, scales = quantize(torch.eye(d, dtype=torch.float32, device=device), basis_bits)
                    state[f"qbasis_{side}"], state[f"qscale_{side}"] = codes, scales
        return state

    def refresh_bases(self, states: list[dict], eps: float, descending: bool = False,
                      bits: int | None = None) -> None:
        """The bases = eigenvectors of ``factor_* + eps·I`` (ascending eigenvalues, or descending), grouped by
        (size, dtype, device) for robust_eigh_basis; a matrix whose eigendecomposition fails keeps its old basis and
        is counted. ``bits``: the group's ``basis_bits`` (the new bases are quantized)."""
        pairs = [(s[f"factor_{side}"], (s, side)) for s in states for side in SIDES if f"factor_{side}" in s]
        # an overflowed factor restarts from zero and keeps its basis this time (not an eigh failure)
        restarted = self.restart_nonfinite([f for f, _ in pairs])
        pairs = [fb for fb, r in zip(pairs, restarted) if not r]
        key = (lambda fb: (fb[0].shape, fb[0].dtype, fb[0].device)) if getattr(self, "batched", True) else id
        for group_pairs in bucket(pairs, key).values():
            result = robust_eigh_basis([f for f, _ in group_pairs], eps)
            self.counters["eigh_retries"] += result.retried
            for (_, (state, side)), ok, vectors in zip(group_pairs, result.ok, result.vectors):
                if ok:
                    write_basis(state, side, vectors.flip(-1) if descending else vectors, bits)
            failed = result.ok.count(False)
            if failed:
                self.counters["eigh_failures"] += failed
                warn_eigh_failure(type(self).__name__, failed)
