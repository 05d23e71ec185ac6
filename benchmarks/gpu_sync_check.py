"""On a GPU: does an ordinary step synchronize? torch's own detector (``torch.cuda.set_sync_debug_mode("warn")``)
warns at every operation that waits for the device, including those inside torch (a solver's info check, a copy
from pageable memory, inductor's wrappers), which benchmarks/host_syncs.py, counting on a CPU, cannot see.

    python benchmarks/gpu_sync_check.py [--out FILE]

For each optimizer: the default step, ``sync_free=True`` where it has one, and ``compiled=True`` with it; a stack of
Linear + LayerNorm blocks (host_syncs.py's model) on the GPU, three steps to create the state and compile, then
``--steps`` ordinary steps (no refresh due) under the detector. Prints the number of synchronizing operations per
step and where the first one came from.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import whiten  # noqa: E402
from host_syncs import NAMES, NO_REFRESH, model  # noqa: E402


def check(name: str, sync_free: bool, compiled: bool, steps: int) -> dict:
    net = model(4).cuda()
    kw = dict(NO_REFRESH.get(name, {}))
    if name in ("KFAC", "EKFAC"):
        kw["model"] = net
    if sync_free:
        kw["sync_free"] = True
    opt = getattr(whiten, name)(whiten.param_groups(net), compiled=compiled, **kw)
    x = torch.randn(8, 32, device="cuda")

    def one():
        opt.zero_grad()
        net(x).square().mean().backward()

    for _ in range(3):
        one()
        opt.step()
    one()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    first = ""
    if syncs:
        first = f"{syncs[0].filename}:{syncs[0].lineno}: {str(syncs[0].message)[:120]}"
    return {"optimizer": name, "sync_free": sync_free, "compiled": compiled, "syncs_per_step": len(syncs) / steps,
            "first": first}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--optimizers", default=",".join(NAMES))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no GPU: nothing to check (this script runs on a CUDA device)")
        return
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| optimizer | default | sync_free | sync_free + compiled | first sync of the last column that ran |")
    print("|---|---|---|---|---|")
    results = []
    for name in args.optimizers.split(","):
        cells, first = [], ""
        for sync_free, compiled in ((False, False), (True, False), (True, True)):
            if sync_free and not getattr(whiten, name).SYNC_FREE:
                cells.append("n/a")
                continue
            try:
                r = check(name, sync_free, compiled, args.steps)
                results.append(r)
                cells.append(f"{r['syncs_per_step']:g}")
                first = r["first"]
            except Exception as e:  # a row that fails says why and the others still run
                cells.append(f"failed: {type(e).__name__}")
                first = "".join(traceback.format_exception_only(e))[:160].strip()
        print(f"| {name} | " + " | ".join(cells) + f" | {first} |", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                                              "results": results}, indent=1))


if __name__ == "__main__":
    main()
