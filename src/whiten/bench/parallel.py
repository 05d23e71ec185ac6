"""Runs under ``torchrun --nproc_per_node N``: DDP (default), FSDP2, tensor parallel (``tp``: the transformer
blocks' attention and MLP over all N ranks) or FSDP2 x TP (``fsdp+tp``: a (N/2, 2) mesh, TP over pairs of ranks and
FSDP2 over the N/2 pairs), the same global batch split over the data-parallel ranks.

Every rank builds the same model from the seed and draws the same global batch; rank r trains on its 1/N slice
and DDP (or FSDP2's reduce-scatter) averages the gradients, so the optimizer sees the gradient of the global batch.
whiten's optimizers split their work over the ranks (``process_group=`` under DDP, the DTensor mesh under FSDP2);
other optimizers run replicated. Rank 0 writes the results; every rank evaluates the full validation set.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

MODES = ("ddp", "fsdp", "tp", "fsdp+tp")
TP_DEGREE = 2  # the tp dim of fsdp+tp

@dataclass
class Parallel:
    world: int = 1
    rank: int = 0
    mode: str = "none"  # "none" (one process), "ddp", "fsdp", "tp" or "fsdp+tp"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def group(self):
        return dist.group.WORLD if self.world > 1 else None

    @property
    def tp(self) -> int:
        """Ranks that share a batch (one tensor-parallel group); 1 without TP."""
        if self.mode == "tp":
            return self.world
        return TP_DEGREE if self.mode == "fsdp+tp" else 1

    def describe(self) -> dict:
        backend = dist.get_backend() if self.world > 1 else None
        return {"world_size": self.world, "parallel": self.mode, "backend": backend}

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module to run forward/backward on: DDP around ``model``, or ``model`` itself sharded by FSDP2 (in
        place). ``model`` keeps serving the optimizer, evaluation and checkpoints."""
        if self.mode == "ddp":
            return torch.nn.parallel.DistributedDataParallel(model)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        device = next(model.parameters()).device
        if self.mode == "fsdp":
            fully_shard(model, mesh=init_device_mesh(device.type, (self.world,)))
        elif self.mode in ("tp", "fsdp+tp"):
            if self.world % self.tp:
                raise ValueError(f"--parallel fsdp+tp needs an even number of processes, not {self.world}")
            mesh = init_device_mesh(device.type, (self.world // self.tp, self.tp), mesh_dim_names=("dp", "tp"))
            tensor_parallel(model, mesh["tp"])
            if self.mode == "fsdp+tp":
                fully_shard(model, mesh=mesh["dp"])
        return model

    def optimizer_group(self):
        """The process group a whiten optimizer splits its work over: DDP's; FSDP2's mesh is found from the
        parameters."""
        return self.group if self.mode == "ddp" else None

    def shard(self, batch):
        """This rank's slice of a global batch (tensors split along dim 0; the batch must divide evenly)."""
        if self.world == 1:
            return batch
        if isinstance(batch, (tuple, list)):
            return type(batch)(self.shard(b) for b in batch)
        if isinstance(batch, dict):
            return {k: self.shard(v) for k, v in batch.items()}
        if not isinstance(batch, torch.Tensor) or batch.ndim == 0:
            return batch
        n, dp = batch.shape[0], self.world // self.tp  # the ranks of a TP group share their batch
        if n % dp:
            raise ValueError(f"a batch of {n} does not split evenly over {dp} data-parallel ranks; pick a world "
                             "size that divides the profile's batch size")
        size, r = n // dp, self.rank // self.tp
        return batch[r * size:(r + 1) * size]

    def mean(self, value: float) -> float:
        """The mean over ranks (every rank gets the same number, so they all take the same decisions)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return t.item() / self.world

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def tensor_parallel(model: torch.nn.Module, mesh) -> None:
    """Megatron-style TP over ``mesh`` (1-D) on the transformer blocks of ``model`` (``model.blocks``, each with
    q, k, v, o, fc1, fc2: the lm task's GPT): q, k, v and fc1 ColwiseParallel, o and fc2 RowwiseParallel; the
    embeddings, norms and head stay replicated. The heads must divide by the mesh's size."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    blocks = getattr(model, "blocks", None)
    names = ("q", "k", "v", "o", "fc1", "fc2")
    adaptive = any(getattr(b, "adaptive", False) for b in blocks or [])  # DiT's conditioning is not split
    if blocks is None or adaptive or not all(hasattr(b, n) for b in blocks for n in names):
        raise ValueError(f"--parallel tp/fsdp+tp needs a transformer whose blocks have {', '.join(names)} (the lm "
                         f"task's GPT); {type(model).__name__} has none")
    if blocks[0].heads % mesh.size():
        raise ValueError(f"tensor parallel over {mesh.size()} ranks needs heads divisible by it ({blocks[0].heads})")
    plan = {}
    for i, _ in enumerate(blocks):
        plan.update({f"blocks.{i}.{n}": ColwiseParallel() for n in ("q", "k", "v", "fc1")})
        plan.update({f"blocks.{i}.{n}": RowwiseParallel() for n in ("o", "fc2")})
    parallelize_module(model, mesh, plan)


def from_environment(mode: str, device: torch.device) -> tuple[Parallel, torch.device]:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); one process otherwise. Returns the setup
    and the device this rank uses (``cuda:LOCAL_RANK`` for CUDA)."""
    if mode not in MODES:
        raise ValueError(f"invalid --parallel {mode!r} (allowed: {', '.join(MODES)})")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Parallel(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Parallel(world=dist.get_world_size(), rank=dist.get_rank(), mode=mode), device
