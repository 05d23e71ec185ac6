"""A small GPT trained with a whiten optimizer under tensor parallel × FSDP2 on a 2-D mesh, with a mixture-of-experts
layer, and DCP checkpoints that resume on another layout.

    torchrun --nproc_per_node 4 examples/tp_fsdp_moe.py                 # 2 (dp) x 2 (tp), CPU/gloo or GPUs/NCCL
    torchrun --nproc_per_node 4 examples/tp_fsdp_moe.py --tp 1          # FSDP2 alone on 4 ranks
    torchrun --nproc_per_node 2 examples/tp_fsdp_moe.py --resume /tmp/whiten-tp-example --tp 1

Layout: attention (q, k, v ColwiseParallel, o RowwiseParallel) and the MLP (fc1 ColwiseParallel, fc2
RowwiseParallel) of every block are tensor parallel over the mesh's "tp" dim; ``fully_shard`` over the "dp" dim
then shards everything along dim 0: the TP blocks again (FSDP2 x TP), the embedding, the norms and the MoE layer's
3-D expert weights (E, out, in) (over the experts). The optimizer needs nothing: it reads each parameter's
placements and mesh, gives every matrix one owner rank, and the owner steps the full matrix exactly as one process
would (docs/distributed.md). The script saves a DCP checkpoint at the end; ``--resume`` loads one saved on any
layout and number of ranks.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import whiten


class Block(nn.Module):
    def __init__(self, width: int, heads: int, experts: int):
        super().__init__()
        self.head_dim = width // heads
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.q, self.k, self.v, self.o = (nn.Linear(width, width, bias=False) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(width, 4 * width, bias=False), nn.Linear(4 * width, width, bias=False)
        self.router = nn.Linear(width, experts, bias=False)
        self.experts = nn.Parameter(torch.randn(experts, width, width) / width ** 0.5)

    def forward(self, x):
        b, t, _ = x.shape
        h = self.ln1(x)
        # under TP, q/k/v give this rank's heads: -1 heads keeps the view right on any tp degree
        split = lambda z: z.view(b, t, -1, self.head_dim).transpose(1, 2)  # noqa: E731
        att = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)), is_causal=True)
        x = x + self.o(att.transpose(1, 2).reshape(b, t, -1))
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        h = self.ln3(x)
        # a dense mixture of experts (every token through every expert, weighted): enough for an example
        gates = torch.softmax(self.router(h), dim=-1)
        return x + torch.einsum("bte,bteo->bto", gates, torch.einsum("btd,eod->bteo", h, self.experts))


class TinyGPT(nn.Module):
    def __init__(self, vocab=65, ctx=32, width=64, depth=2, heads=4, experts=4):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.zeros(ctx, width))
        self.blocks = nn.ModuleList(Block(width, heads, experts) for _ in range(depth))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=2, help="tensor-parallel degree (1: FSDP2 alone)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--save", default="/tmp/whiten-tp-example")
    ap.add_argument("--resume", default=None, help="a DCP checkpoint saved by this script, on any layout")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = "cuda" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch.set_num_threads(1)

    torch.manual_seed(0)
    model = TinyGPT().to(device)
    mesh = init_device_mesh(device, (world // args.tp, args.tp), mesh_dim_names=("dp", "tp"))
    if args.tp > 1:
        plan = {}
        for i in range(len(model.blocks)):
            plan.update({f"blocks.{i}.{n}": ColwiseParallel() for n in ("q", "k", "v", "fc1")})
            plan.update({f"blocks.{i}.{n}": RowwiseParallel() for n in ("o", "fc2")})
        parallelize_module(model, mesh["tp"], plan)
    for blk in model.blocks:
        fully_shard(blk, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])

    opt = whiten.SPlus(whiten.param_groups(model), lr=0.02)
    start = 0
    if args.resume:
        sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(sd, checkpoint_id=args.resume)
        set_model_state_dict(model, sd["model"])
        set_optimizer_state_dict(model, opt, sd["optim"])
        start = args.steps

    data = torch.Generator().manual_seed(1234)
    for t in range(start, start + args.steps):
        # every tp rank of a dp replica must see the same tokens; each dp replica its own
        tokens = torch.randint(0, 65, (world // args.tp, 4, 33), generator=data)[rank // args.tp].to(device)
        loss = F.cross_entropy(model(tokens[:, :-1]).reshape(-1, 65), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0:
            print(f"step {t}: loss {loss.item():.4f}", flush=True)

    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=args.save)
    if rank == 0:
        ctx = opt.distributed_context()
        print(f"saved {args.save}; {world} ranks (dp {world // args.tp} x tp {args.tp}), planned work per rank "
              f"{[round(w / 1e6, 2) for w in ctx.ranks_work()]} M")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
