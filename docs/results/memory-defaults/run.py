"""Evidence for issue 23's default ``max_factor_ratio`` (20) on SPlus and SOAP: the bench's GPT on Shakespeare,
tokenized by words so that the vocabulary (2048) is a side the rule leaves out at width 128 (the character-level
``lm`` task's 65-token vocabulary never triggers it). Full factors (``max_factor_ratio=None``, the papers' rule)
against the default, same lr, same seeds. One JSON line per run in results.jsonl.

    OMP_NUM_THREADS=1 PYTHONPATH=src python docs/results/memory-defaults/run.py [--steps 500] [--seeds 0,1]
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import whiten
from whiten.bench.data.text import load_shakespeare
from whiten.bench.models import GPT
from whiten.bench.tasks import lr_factor

VOCAB, WIDTH, DEPTH, HEADS, CTX, BATCH = 2048, 128, 2, 4, 64, 32
LRS = {"SPlus": 0.1, "SOAP": 4.64e-3}  # whiten-bench's default lrs (the registry's)


def corpus():
    words = re.findall(r"[a-z']+|[^\sa-z']", load_shakespeare().lower())
    keep = [w for w, _ in collections.Counter(words).most_common(VOCAB - 1)]
    index = {w: i + 1 for i, w in enumerate(keep)}  # 0: every other word
    ids = torch.tensor([index.get(w, 0) for w in words])
    n_val = len(ids) // 10
    return ids[:-n_val], ids[-n_val:]


def batch(data, seed, step):
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(data) - CTX - 1, (BATCH,), generator=g)
    x = torch.stack([data[s:s + CTX + 1] for s in starts.tolist()])
    return x[:, :-1], x[:, 1:]


def val_loss(model, val):
    windows = val[: (len(val) // (CTX + 1)) * (CTX + 1)].view(-1, CTX + 1)[:256]
    with torch.no_grad():
        logits = model(windows[:, :-1])
        return F.cross_entropy(logits.reshape(-1, VOCAB), windows[:, 1:].reshape(-1)).item()


def run(name, ratio, seed, steps, train, val):
    torch.manual_seed(seed)
    model = GPT(VOCAB, CTX, WIDTH, DEPTH, HEADS)
    opt = getattr(whiten, name)(whiten.param_groups(model), lr=LRS[name], max_factor_ratio=ratio)
    base = [g["lr"] for g in opt.param_groups]
    warmup = max(1, int(0.05 * steps))
    start = time.time()
    for step in range(steps):
        for g, lr in zip(opt.param_groups, base):
            g["lr"] = lr * lr_factor(step, steps, warmup, "constant")
        x, y = batch(train, seed, step)
        loss = F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    seconds = time.time() - start
    if hasattr(opt, "eval"):
        opt.eval()  # SPlus's average (ema_rate="auto"), as whiten-bench evaluates
    model.eval()
    out = dict(optimizer=name, max_factor_ratio=ratio, seed=seed, steps=steps, lr=LRS[name],
               val_loss=round(val_loss(model, val), 4), train_loss=round(loss.item(), 4),
               state_bytes=opt.memory_report().state_bytes,
               parameter_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
               seconds=round(seconds, 1))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--optimizers", default="SPlus,SOAP")
    ap.add_argument("--out", default=str(Path(__file__).with_name("results.jsonl")))
    args = ap.parse_args()
    train, val = corpus()
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name in args.optimizers.split(","):
            for ratio in (None, 20.0):
                line = json.dumps(run(name, ratio, seed, args.steps, train, val))
                print(line, flush=True)
                with open(args.out, "a") as f:
                    f.write(line + "\n")


if __name__ == "__main__":
    main()
