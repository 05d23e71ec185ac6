"""Runs under ``torchrun --nproc_per_node N``: DDP (default) or FSDP2, the same global batch split over the ranks.

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

MODES = ("ddp", "fsdp")


@dataclass
class Parallel:
    world: int = 1
    rank: int = 0
    mode: str = "none"  # "none" (one process), "ddp" or "fsdp"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def group(self):
        return dist.group.WORLD if self.world > 1 else None

    def describe(self) -> dict:
        backend = dist.get_backend() if self.world > 1 else None
        return {"world_size": self.world, "parallel": self.mode, "backend": backend}

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module to run forward/backward on: DDP around ``model``, or ``model`` itself sharded by FSDP2 (in
        place). ``model`` keeps serving the optimizer, evaluation and checkpoints."""
        if self.mode == "ddp":
            return torch.nn.parallel.DistributedDataParallel(model)
        if self.mode == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            device = next(model.parameters()).device
            fully_shard(model, mesh=init_device_mesh(device.type, (self.world,)))
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
        n = batch.shape[0]
        if n % self.world:
            raise ValueError(f"a batch of {n} does not split evenly over {self.world} ranks; pick a world size "
                             "that divides the profile's batch size")
        size = n // self.world
        return batch[self.rank * size:(self.rank + 1) * size]

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
