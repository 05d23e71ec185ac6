"""GPU smoke check of every whiten optimizer: a small GPT-like model on CUDA, float32 and bfloat16 parameters, 30
steps (sample_fisher where the optimizer asks for it); prints the first and last loss and fails on a non-finite
value or a loss that did not fall. Not part of the test suite (CI has no GPU).

    python scripts/gpu_smoke.py            # on CUDA
    python scripts/gpu_smoke.py cpu        # the same on the CPU (checks the script itself)
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, "src")
import whiten  # noqa: E402

V, D = 64, 128
DEVICE = sys.argv[1] if len(sys.argv) > 1 else "cuda"


def model_of(dtype):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(V, D), nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D), nn.LayerNorm(D),
                      nn.Linear(D, V, bias=False))
    return m.to(DEVICE, dtype)


BUILD = {
    "SPlus": lambda m: whiten.SPlus(whiten.param_groups(m), lr=0.1, inverse_every=10),
    "SOAP": lambda m: whiten.SOAP(whiten.param_groups(m), lr=3e-3, precondition_frequency=5),
    "Shampoo": lambda m: whiten.Shampoo(whiten.param_groups(m), lr=3e-3, precondition_frequency=5),
    "PSGDKron": lambda m: whiten.PSGDKron(whiten.param_groups(m), lr=1e-3),
    "Muon": lambda m: whiten.Muon(whiten.param_groups(m), lr=0.02),
    "Scion": lambda m: whiten.Scion(whiten.param_groups(m), lr=1e-3),
    "SpecGD": lambda m: whiten.SpecGD(whiten.param_groups(m), lr=0.02),
    "Conda": lambda m: whiten.Conda(whiten.param_groups(m), lr=3e-3, update_proj_gap=10),
    "Prodigy": lambda m: whiten.Prodigy(whiten.param_groups(m), lr=1.0),
    "ScheduleFreeAdamW": lambda m: whiten.ScheduleFreeAdamW(whiten.param_groups(m), lr=3e-3),
    "TNT": lambda m: whiten.TNT(whiten.param_groups(m), lr=1e-5),
    "Sophia": lambda m: whiten.Sophia(whiten.param_groups(m), lr=3e-3),
    "KFAC": lambda m: whiten.KFAC(whiten.param_groups(m), model=m, lr=0.01, fisher="sampled"),
    "EKFAC": lambda m: whiten.EKFAC(whiten.param_groups(m), model=m, lr=0.01),
    "MFAC": lambda m: whiten.MFAC(whiten.param_groups(m), lr=1e-3, ngrads=16),
}


def main() -> int:
    bad = []
    g = torch.Generator(device=DEVICE).manual_seed(1)
    x = torch.randint(0, V, (16, 32), device=DEVICE, generator=g)
    y = (x * 7 + 3) % V  # a learnable map
    for name, build in BUILD.items():
        for dtype in (torch.float32, torch.bfloat16):
            try:
                m = model_of(dtype)
                opt = build(m)
                losses = []
                for _ in range(30):
                    opt.zero_grad()
                    logits = m(x)
                    if hasattr(opt, "sample_fisher"):
                        opt.sample_fisher(logits)
                    loss = F.cross_entropy(logits.float().reshape(-1, V), y.reshape(-1))
                    loss.backward()
                    opt.step()
                    losses.append(loss.item())
                ok = all(map(lambda v: v == v and abs(v) != float("inf"), losses)) and losses[-1] < losses[0]
                ok = ok and all(torch.isfinite(p).all() for p in m.parameters())
                print(f"{name:18s} {str(dtype):15s} loss {losses[0]:.3f} -> {losses[-1]:.3f} {'ok' if ok else 'BAD'}",
                      flush=True)
                if not ok:
                    bad.append((name, dtype))
            except Exception as e:  # report and go on: one broken optimizer must not hide the others
                print(f"{name:18s} {str(dtype):15s} ERROR {type(e).__name__}: {e}", flush=True)
                bad.append((name, dtype))
    print("failures:", bad)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
