"""Train the same small character-level GPT on Shakespeare with AdamW and with whiten.SPlus, side by side.

    python examples/quick_compare.py [--steps 300]

A drop-in example: the only line that changes between the two runs is the optimizer.
"""

import argparse
import time

import torch
import torch.nn.functional as F

import whiten
from whiten.bench.data import CharCorpus, load_shakespeare
from whiten.bench.models import GPT


def train(corpus, val, make_optimizer, steps, seed=0):
    torch.manual_seed(seed)
    model = GPT(corpus.vocab_size, ctx=64, width=64, depth=2, heads=2)
    opt = make_optimizer(model)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(steps):
        x, y = corpus.train_batch(16, 64, gen)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        warmup.step()
    seconds = time.perf_counter() - start
    if hasattr(opt, "eval"):
        opt.eval()  # SPlus evaluates its averaged parameters
    with torch.no_grad():
        val_loss = sum(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item() for x, y in val) / len(val)
    return val_loss, seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    corpus = CharCorpus(load_shakespeare())
    val = corpus.val_batches(64, 64, 32)
    runs = {
        "AdamW (lr 3e-3)": lambda m: torch.optim.AdamW(whiten.param_groups(m), lr=3e-3, weight_decay=0.1),
        "SPlus (lr 0.3)": lambda m: whiten.SPlus(whiten.param_groups(m), lr=0.3, ema_rate=0.9,
                                                 nonstandard_constant=0.03),
    }
    print(f"char-level GPT (2 layers, width 64) on Shakespeare, {args.steps} steps, batch 16 x 64")
    for name, make in runs.items():
        loss, seconds = train(corpus, val, make, args.steps)
        print(f"{name:18s} validation loss {loss:.4f}   train time {seconds:.1f} s")


if __name__ == "__main__":
    main()
