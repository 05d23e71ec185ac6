"""A nanoGPT-style character model and training loop, written for whiten's measurements and tests.

The model follows the structure of nanoGPT's ``GPT`` (token and position embeddings, pre-LayerNorm blocks with
biases, GELU MLP x4, dropout, an ``lm_head`` tied to the token embedding); the loop follows ``train.py`` (linear
warm-up, cosine decay to lr/10 written into every group's ``lr``, gradient clipping at 1.0, a fixed held-out set).
Sizes are scaled down so a run fits a 2-core CPU. Run as a script, it trains one model per optimizer and seed:

    PYTHONPATH=src python benchmarks/nanogpt_style.py --optimizers adamw,splus --width 128 --seeds 0
    PYTHONPATH=src python benchmarks/nanogpt_style.py --optimizers splus --opt nonstandard_constant=1e-3
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class GPTConfig:
    vocab_size: int = 65
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.2
    bias: bool = True


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(b, t, c)))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as nanoGPT
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # nanoGPT's scaled residual init
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None):
        t = idx.shape[1]
        pos = torch.arange(t, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


def get_lr(it: int, lr: float, warmup_iters: int, lr_decay_iters: int, min_lr: float) -> float:
    """nanoGPT's schedule: linear warm-up, cosine decay to ``min_lr``, then ``min_lr``."""
    if it < warmup_iters:
        return lr * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def adamw_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """nanoGPT's configure_optimizers grouping: decay every >=2-D parameter, not the rest."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


@torch.no_grad()
def estimate_loss(model: nn.Module, batches) -> float:
    """Mean loss over fixed held-out batches, the model in eval mode (dropout off) for the duration."""
    was_training = model.training
    model.eval()
    total = sum(model(x, y)[1].item() for x, y in batches) / len(batches)
    model.train(was_training)
    return total


# ----- the loop, as nanoGPT's train.py runs it, with the optimizer line swapped -------------------------------------


def build_optimizer(name: str, model: nn.Module, lr: float, options: dict):
    """``adamw``: nanoGPT's own (its grouping, betas (0.9, 0.99), weight decay 0.1); ``splus``: the README's Quick
    start, ``whiten.SPlus(whiten.param_groups(model), lr=lr)``, with ``options`` laid over it."""
    if name == "adamw":
        return torch.optim.AdamW(adamw_groups(model, options.pop("weight_decay", 0.1)), lr=lr,
                                 betas=options.pop("betas", (0.9, 0.99)), **options)
    import whiten

    return getattr(whiten, {"splus": "SPlus"}.get(name, name))(whiten.param_groups(model), lr=lr, **options)


def train(name: str, lr: float, options: dict, cfg: GPTConfig, steps: int, seed: int, batch_size: int = 16,
          warmup: int = 100, val_windows: int = 512) -> dict:
    """One run: nanoGPT's loop (warm-up, cosine to lr/10 written into every group, clip 1.0, dropout), the final
    validation loss on a fixed held-out set; an optimizer with ``eval()`` is evaluated as the README says."""
    from whiten.bench.data import CharCorpus, load_shakespeare

    corpus = CharCorpus(load_shakespeare())
    cfg.vocab_size = corpus.vocab_size
    torch.manual_seed(seed)
    model = GPT(cfg)
    opt = build_optimizer(name, model, lr, dict(options))
    val = corpus.val_batches(cfg.block_size, val_windows, 64)
    gen = torch.Generator().manual_seed(seed)
    t0, c0 = time.perf_counter(), time.process_time()
    for it in range(steps):
        for g in opt.param_groups:
            g["lr"] = get_lr(it, lr, warmup, steps, lr / 10)
        _, loss = model(*corpus.train_batch(batch_size, cfg.block_size, gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0  # cpu: this process's work alone
    averaged = hasattr(opt, "eval") and hasattr(opt, "train")
    if averaged:
        opt.eval()
    val_loss = estimate_loss(model, val)
    if averaged:
        opt.train()
    resolved = sorted({g["nonstandard_constant"] for g in opt.param_groups if "nonstandard_constant" in g})
    return {"optimizer": name, "lr": lr, "options": {k: repr(v) for k, v in options.items()},
            "nonstandard_constant": resolved, "width": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
            "block_size": cfg.block_size, "batch_size": batch_size, "steps": steps, "warmup": warmup, "seed": seed,
            "val_loss": val_loss, "train_seconds": seconds, "train_cpu_seconds": cpu_seconds,
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def main(argv=None):
    import argparse
    import ast
    import json
    from pathlib import Path

    ap = argparse.ArgumentParser(description="One nanoGPT-style run per optimizer and seed; one JSON line each.")
    ap.add_argument("--optimizers", default="adamw,splus", help="adamw (nanoGPT's) and/or whiten names (splus)")
    ap.add_argument("--lr", action="append", default=[], metavar="NAME=LR",
                    help="lr per optimizer (default: adamw=1e-3, nanoGPT's; splus=0.1, the Quick start's)")
    ap.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                    help="an option of the whiten optimizer, a Python literal (e.g. nonstandard_constant=1e-3)")
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="append each run's JSON line to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    lrs = {"adamw": 1e-3, "splus": 0.1}
    lrs.update((k, float(v)) for k, v in (s.split("=", 1) for s in args.lr))
    options = {k: ast.literal_eval(v) for k, v in (s.split("=", 1) for s in args.opt)}
    for seed in map(int, args.seeds.split(",")):
        for name in args.optimizers.split(","):
            cfg = GPTConfig(block_size=args.block, n_layer=args.layers, n_head=args.heads, n_embd=args.width)
            rec = train(name, lrs[name], {} if name == "adamw" else options, cfg, args.steps, seed, args.batch,
                        args.warmup)
            line = json.dumps(rec)
            print(line, flush=True)
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                with args.out.open("a") as f:
                    f.write(line + "\n")


if __name__ == "__main__":
    main()
