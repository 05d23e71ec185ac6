"""Optimizer state per parameter byte, for every whiten optimizer with its defaults, on GPT shapes: the state each
plans before its first step (``opt.memory_report()``; nothing is allocated for it), against torch's AdamW (2.0x).

    python benchmarks/state_memory.py                      # widths 256 and 512 at vocabulary 8192, 768 at 50304
    python benchmarks/state_memory.py --shapes 256:8192 --blocks 2 --by-kind
    python benchmarks/state_memory.py --options             # also each optimizer with its state options (issue 23)

Shapes: an embedding (vocabulary, width), ``--blocks`` blocks of q, k, v, o (width, width), fc1 (4·width, width),
fc2 (width, 4·width) and two LayerNorms, a final LayerNorm and an untied head (vocabulary, width), in float32.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import whiten

NAMES = ["SPlus", "SOAP", "Shampoo", "PSGDKron", "TNT", "KFAC", "EKFAC", "KBFGS", "Prodigy", "Conda", "Muon", "SpecGD", "Scion",
         "Sophia", "ScheduleFreeAdamW", "MFAC"]


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)


class GPT(nn.Module):
    def __init__(self, vocab, d, blocks):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(blocks))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)


# Issue 23's state options: (row label, optimizer, options). The first rows of each optimizer are its defaults.
R20 = dict(max_factor_ratio=20)
OPTION_ROWS = [
    ("SPlus state_dtype=bf16", "SPlus", dict(state_dtype="bf16")),
    ("SPlus basis_bits=8", "SPlus", dict(basis_bits=8)),
    ("SPlus basis_bits=4", "SPlus", dict(basis_bits=4)),
    ("SPlus state_dtype=bf16, basis_bits=4", "SPlus", dict(state_dtype="bf16", basis_bits=4)),
    ("SPlus max_factor_ratio=20", "SPlus", R20),
    ("SPlus max_factor_ratio=20, state_dtype=bf16", "SPlus", dict(R20, state_dtype="bf16")),
    ("SPlus max_factor_ratio=20, basis_bits=4", "SPlus", dict(R20, basis_bits=4)),
    ("SPlus max_factor_ratio=20, state_dtype=bf16, basis_bits=4", "SPlus", dict(R20, state_dtype="bf16", basis_bits=4)),
    ("SPlus max_factor_ratio=20, state_dtype=bf16, basis_bits=4, ema_rate=None", "SPlus",
     dict(R20, state_dtype="bf16", basis_bits=4, ema_rate=None)),
    ("SOAP state_dtype=bf16", "SOAP", dict(state_dtype="bf16")),
    ("SOAP basis_bits=8", "SOAP", dict(basis_bits=8)),
    ("SOAP basis_bits=4", "SOAP", dict(basis_bits=4)),
    ("SOAP state_dtype=bf16, basis_bits=4", "SOAP", dict(state_dtype="bf16", basis_bits=4)),
    ("SOAP max_factor_ratio=20", "SOAP", R20),
    ("SOAP max_factor_ratio=20, state_dtype=bf16", "SOAP", dict(R20, state_dtype="bf16")),
    ("SOAP max_factor_ratio=20, basis_bits=4", "SOAP", dict(R20, basis_bits=4)),
    ("SOAP max_factor_ratio=20, state_dtype=bf16, basis_bits=4", "SOAP", dict(R20, state_dtype="bf16", basis_bits=4)),
    ("TNT max_factor_ratio=20", "TNT", R20),
    ("TNT state_dtype=bf16", "TNT", dict(state_dtype="bf16")),
    ("KFAC max_dim=None (before issue 23)", "KFAC", dict(max_dim=None)),
    ("EKFAC max_dim=None (before issue 23)", "EKFAC", dict(max_dim=None)),
    ("KBFGS max_dim=None (before issue 23)", "KBFGS", dict(max_dim=None)),
    ("Muon state_dtype=bf16", "Muon", dict(state_dtype="bf16")),
    ("Conda state_dtype=bf16", "Conda", dict(state_dtype="bf16")),
    ("Shampoo state_dtype=bf16", "Shampoo", dict(state_dtype="bf16")),
    ("PSGDKron state_dtype=bf16", "PSGDKron", dict(state_dtype="bf16")),
    ("KFAC state_dtype=bf16", "KFAC", dict(state_dtype="bf16")),
    ("EKFAC state_dtype=bf16", "EKFAC", dict(state_dtype="bf16")),
]


def build(name, model, **options):
    groups = whiten.param_groups(model)
    if name in ("KFAC", "EKFAC", "KBFGS"):
        return getattr(whiten, name)(groups, model=model, **options)
    if name == "MFAC":
        return whiten.MFAC(groups, max_memory=2**62, **options)  # the window is stated, never allocated here
    return getattr(whiten, name)(groups, **options)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="256:8192,512:8192,768:50304", help="width:vocabulary, comma-separated")
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--optimizers", default=",".join(NAMES))
    ap.add_argument("--by-kind", action="store_true", help="also print each optimizer's report")
    ap.add_argument("--options", action="store_true", help="also each optimizer with its state options (issue 23)")
    args = ap.parse_args()
    shapes = [tuple(int(x) for x in s.split(":")) for s in args.shapes.split(",")]
    rows = [(name, name, {}) for name in args.optimizers.split(",")]
    if args.options:
        rows += [row for row in OPTION_ROWS if row[1] in args.optimizers.split(",")]
    table = {}
    for width, vocab in shapes:
        torch.manual_seed(0)
        model = GPT(vocab, width, args.blocks)
        for label, name, options in rows:
            report = build(name, model, **options).memory_report()
            table[(label, width, vocab)] = report.ratio
            if args.by_kind:
                print(f"--- {label}, width {width}, vocabulary {vocab}\n{report}\n")
    cols = [f"{w} / {v}" for w, v in shapes]
    print(f"State bytes / parameter bytes, planned before the first step ({args.blocks} blocks; width / vocabulary)\n")
    print("| optimizer | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    print("| AdamW (torch) | " + " | ".join("2.0" for _ in cols) + " |")
    for label, _, _ in rows:
        print(f"| {label} | " + " | ".join(f"{table[(label, w, v)]:.1f}" for w, v in shapes) + " |")


if __name__ == "__main__":
    main()
