"""Block-wise quantized eigenbases (``basis_bits``, SPlus and SOAP): an orthonormal (d, d) basis kept as 8-bit or
4-bit codes with one float32 scale (the block's largest magnitude) per block of :data:`BLOCK` entries of a row,
dequantized per bucket when it is used.

* 8 bits: 255 linear levels in [-1, 1] (codes 0…254 for -127…127), round to nearest: the error of an entry is at
  most half a level, absmax/254.
* 4 bits: the linear-square map of 4-bit Shampoo (Wang et al., NeurIPS 2024, "4-bit Shampoo for memory-efficient
  network training"): 15 levels ``sign(j)·(j/7)²``, j = -7…7, denser near zero where most entries of an eigenvector
  matrix are; two codes a byte. The dequantized basis is no longer orthonormal (its columns' errors are ~1/30 of
  their entries), so on use it is *rectified* by one Björck step, ``V ← V (3I − VᵀV) / 2``, which takes it to
  within the square of that error of the nearest orthonormal matrix (the paper's orthogonal rectification).

Codes are ``uint8`` tensors of shape (..., d, d) (8 bits) or (..., d, ⌈d/2⌉) (4 bits), scales float32 of shape
(..., d, ⌈d/64⌉): plain tensors, so checkpoints, stacks and DCP handle them as any other state.
"""

from __future__ import annotations

import math

import torch

__all__ = ["BLOCK", "BASIS_BITS", "check_basis_bits", "code_shape", "quantize", "dequantize", "rectify",
           "bytes_per_entry"]

BLOCK = 64
BASIS_BITS = (None, 8, 4)
_LEVELS4 = torch.tensor([(1 if j >= 0 else -1) * (j / 7) ** 2 for j in range(-7, 8)], dtype=torch.float64)
_LEVELS4_ON: dict = {}  # (device, dtype) -> _LEVELS4 there: copied once, not at every step (a host sync on CUDA)


def _levels4(device, dtype) -> torch.Tensor:
    key = (device, dtype)
    if key not in _LEVELS4_ON:
        _LEVELS4_ON[key] = _LEVELS4.to(device=device, dtype=dtype)
    return _LEVELS4_ON[key]


def check_basis_bits(value) -> None:
    if isinstance(value, bool) or value not in BASIS_BITS:
        raise ValueError(f"Invalid basis_bits: {value!r} (allowed: None (bases in the state dtype), 8 or 4)")


def code_shape(d: int, bits: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(codes shape, scales shape)`` of a quantized (d, d) basis."""
    return (d, d if bits == 8 else (d + 1) // 2), (d, math.ceil(d / BLOCK))


def bytes_per_entry(bits: int, d: int) -> float:
    codes, scales = code_shape(d, bits)
    return (codes[0] * codes[1] + 4 * scales[0] * scales[1]) / (d * d)


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """(..., d) -> (..., nb, BLOCK), zero-padded."""
    d = x.shape[-1]
    pad = -d % BLOCK
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], -1, BLOCK)


def quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scales)`` of ``x`` (..., d, d), computed in float32 (float64 for float64 input)."""
    d = x.shape[-1]
    blocks = _blocks(x)
    scales = blocks.abs().amax(dim=-1)
    t = blocks / scales.clamp_min(torch.finfo(x.dtype).tiny).unsqueeze(-1)  # in [-1, 1]
    if bits == 8:
        codes = (t * 127).round_().add_(127).to(torch.uint8)
    else:
        levels = _levels4(x.device, x.dtype)
        codes = torch.bucketize(t.contiguous(), (levels[1:] + levels[:-1]) / 2).to(torch.uint8)  # nearest level, 0…14
    codes = codes.reshape(*x.shape[:-1], -1)[..., :d]
    if bits == 4:
        if d % 2:
            codes = torch.nn.functional.pad(codes, (0, 1))
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes.contiguous(), scales.to(torch.float32)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, bits: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    """The (..., d, d) basis in ``dtype`` (4 bits: before :func:`rectify`)."""
    if bits == 8:
        t = codes.to(dtype).sub_(127).div_(127)
    else:
        low, high = codes & 15, codes >> 4
        idx = torch.stack((low, high), dim=-1).reshape(*codes.shape[:-1], -1)[..., :d]
        t = _levels4(codes.device, dtype)[idx.long()]
    blocks = _blocks(t) * scales.to(dtype).unsqueeze(-1)
    return blocks.reshape(*t.shape[:-1], -1)[..., :d]


def rectify(V: torch.Tensor) -> torch.Tensor:
    """One Björck orthonormalization step, ``V (3I − VᵀV) / 2``: for ``V = Q + E`` with Q orthonormal, the error
    of the result is O(E²)."""
    gram = V.mT @ V
    eye = torch.eye(V.shape[-1], dtype=V.dtype, device=V.device)
    return V @ (1.5 * eye - 0.5 * gram)
