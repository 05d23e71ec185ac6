"""Bitwise before/after check of a change that must keep an optimizer's numbers (a refactor, a _foreach rewrite).

    PYTHONPATH=<old checkout>/src python scripts/bitcheck.py save /tmp/ref_NAME.pt NAME     # the old code
    PYTHONPATH=<new checkout>/src python scripts/bitcheck.py check /tmp/ref_NAME.pt NAME    # the new code

Runs NAME (a whiten optimizer) for 12 steps (refreshes included: every-5 schedules) on a model with several
same-shape and different-shape matrices, vectors and an embedding, in float32, float64 and bfloat16 parameters
(and state_dtype=bf16 where the optimizer takes it), and compares every parameter and state tensor bit for bit.
"""
import inspect
import sys
import warnings

import torch
from torch import nn
import whiten

FAST = {"SPlus": dict(inverse_every=5), "SOAP": dict(precondition_frequency=5),
        "Shampoo": dict(precondition_frequency=5), "Conda": dict(update_proj_gap=5),
        "TNT": dict(update_freq=2, inverse_freq=5), "KFAC": dict(factor_every=2, inverse_every=5),
        "EKFAC": dict(factor_every=2, inverse_every=5), "Sophia": dict(k=5), "MFAC": dict(ngrads=4)}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.blocks = nn.Sequential(*[m for _ in range(3) for m in (nn.Linear(16, 16), nn.LayerNorm(16))])
        self.up = nn.Linear(16, 24)
        self.down = nn.Linear(24, 16, bias=False)
        self.head = nn.Linear(16, 20)

    def forward(self, idx):
        h = self.emb(idx)
        h = self.blocks(h)
        h = h + self.down(torch.tanh(self.up(h)))
        return self.head(h)


def run(name, dtype, extra):
    torch.manual_seed(0)
    net = Net().to(dtype)
    kw = dict(FAST.get(name, {}), **extra)
    cls = getattr(whiten, name)
    if "model" in inspect.signature(cls).parameters:
        kw["model"] = net
    opt = cls(whiten.param_groups(net), **kw)
    gen = torch.Generator().manual_seed(1)
    for t in range(12):
        idx = torch.randint(0, 20, (4, 8), generator=gen)
        tgt = torch.randint(0, 20, (4, 8), generator=gen)
        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(idx).float().reshape(-1, 20), tgt.reshape(-1))
            loss.backward()
            return loss
        if name in ("MFAC",) or "closure" in name:
            opt.step(closure)
        else:
            closure(); opt.step()
    out = {f"p.{k}": v.detach().clone() for k, v in net.named_parameters()}
    sd = opt.state_dict()
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                out[f"s.{pid}.{k}"] = v.clone()
            else:
                out[f"s.{pid}.{k}"] = torch.tensor(float(v)) if isinstance(v, (int, float)) else v
    return out


def configs(name):
    cls = getattr(whiten, name)
    cs = [("f32", torch.float32, {}), ("f64", torch.float64, {}), ("bf16", torch.bfloat16, {})]
    if "state_dtype" in inspect.signature(cls).parameters:
        cs.append(("f32-sbf16", torch.float32, dict(state_dtype=torch.bfloat16)))
    return cs


def collect(name):
    res = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for tag, dtype, extra in configs(name):
                res[f"{threads}t-{tag}"] = run(name, dtype, extra)
    return res


if __name__ == "__main__":
    mode, path, name = sys.argv[1:4]
    res = collect(name)
    if mode == "save":
        torch.save(res, path)
        print("saved", path, sum(len(v) for v in res.values()), "tensors")
    else:
        ref = torch.load(path, weights_only=False)
        bad = 0
        for cfg, tensors in ref.items():
            for k, v in tensors.items():
                w = res[cfg].get(k)
                same = (isinstance(v, torch.Tensor) and isinstance(w, torch.Tensor) and v.dtype == w.dtype
                        and v.shape == w.shape and torch.equal(v, w)) or (not isinstance(v, torch.Tensor) and v == w)
                if not same:
                    bad += 1
                    if bad <= 10:
                        print("DIFFERS", cfg, k)
            extra = set(res[cfg]) - set(tensors)
            if extra:
                print("NEW KEYS", cfg, sorted(extra)[:5]); bad += 1
        print("BITWISE IDENTICAL" if not bad else f"{bad} DIFFERENCES")
        sys.exit(1 if bad else 0)
