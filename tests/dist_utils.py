"""Launching several gloo processes inside a test: ``fork`` start (spawn costs seconds per process here), a
``FileStore`` rendezvous, one thread per process and a timeout on every launch, so a hung collective fails the test
instead of hanging the run."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import tempfile
import traceback

import torch
import torch.distributed as dist


def _worker(fn, rank, world, store_path, args, queue):
    try:
        torch.set_num_threads(1)
        store = dist.FileStore(store_path, world)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
        try:
            result = fn(rank, world, *args)
        finally:
            dist.destroy_process_group()
        # plain pickle bytes: a Queue would share tensors through a file-descriptor server that dies with the worker
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - everything goes back to the test
        queue.put((rank, "error", traceback.format_exc()))


def launch(fn, world: int, *args, timeout: float = 180.0) -> list:
    """Run ``fn(rank, world, *args)`` on ``world`` forked processes in one gloo group; return the results by rank.
    Raises with the worker's traceback if one fails, and after ``timeout`` seconds if one hangs."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    fd, store_path = tempfile.mkstemp(prefix="whiten-store-")
    os.close(fd)
    os.unlink(store_path)
    procs = [ctx.Process(target=_worker, args=(fn, r, world, store_path, args, queue), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    results: dict = {}
    try:
        for _ in range(world):
            rank, status, value = queue.get(timeout=timeout)
            if status != "ok":
                raise AssertionError(f"rank {rank} of {world} failed:\n{value}")
            results[rank] = pickle.loads(value)
    except Exception as e:
        if type(e).__name__ == "Empty":
            raise AssertionError(f"a launch of {world} processes did not finish within {timeout} s "
                                 f"(finished: {sorted(results)})") from None
        raise
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
        if os.path.exists(store_path):
            os.unlink(store_path)
    return [results[r] for r in range(world)]


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (FSDP2 parameter), or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(g: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A full gradient g laid out as parameter p: sharded as p when p is a DTensor, else g itself."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    return distribute_tensor(g, p.device_mesh, p.placements) if isinstance(p, DTensor) else g


def save_dcp(model, opt, path) -> None:
    """Save a one-process model and its optimizer as DCP files at path, the way a training script does."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    dcp.save({"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path)


def load_dcp(model, opt, path) -> None:
    """Load DCP files at path into a model and its optimizer, in place, the way a resumed script does: DCP fills
    the current state dicts as templates, then the state-dict helpers apply them."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=path)
    model.load_state_dict(state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
