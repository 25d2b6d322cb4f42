"""Worker script of the distributed tests, started by ``torch.distributed.run`` (2 CPU ranks).

Usage:
    python -m torch.distributed.run --nproc-per-node 2 ... _runner.py train SPEC.json
    python -m torch.distributed.run --nproc-per-node 2 ... _runner.py downscale SPEC.json
    python -m torch.distributed.run --nproc-per-node 2 ... _runner.py collectives SPEC.json

``SPEC.json`` holds the arguments; rank 0 writes ``SPEC.json.result.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "train"))


def main() -> None:
    kind, spec_path = sys.argv[1], Path(sys.argv[2])
    spec = json.loads(spec_path.read_text())
    from carbonsr_cli import distributed

    result: dict = {}
    if kind == "train":
        from helpers import small_config

        from carbonsr_cli.train.loop import train

        cfg = small_config(Path(spec["sample"]), Path(spec["runs"]), **spec["changes"])
        res = train(cfg)
        result = {"history": res.history, "run_dir": str(res.run_dir), "global_step": res.global_step,
                  "stopped": res.stopped}
    elif kind == "collectives":
        result = _collectives(spec["rounds"])
    else:
        from carbonsr_cli.downscale import downscale

        for job in spec["jobs"]:
            summary = downscale(progress=False, **job)
            result[job["dst"]] = {"ok": summary.conservation.ok, "tiles": summary.tiles, "notes": summary.notes}
    ctx = distributed.get_context()
    result["world_size"] = ctx.world_size
    if ctx.is_main:
        Path(str(spec_path) + ".result.json").write_text(json.dumps(result, default=str))
    ctx.cleanup()


def _collectives(rounds: int) -> dict:
    """The context's collectives on every rank: the references left to a summed CPU tensor when
    the sum returns (1: only the caller's), and what broadcast and all_gather delivered."""
    import torch

    from carbonsr_cli import distributed

    ctx = distributed.context(use_cuda=False)
    counts = set()
    for k in range(rounds):
        t = torch.full((3,), float(k), dtype=torch.float64)
        ctx.all_reduce_sum(t)
        counts.add(t._use_count())
    got = ctx.broadcast({"from": ctx.rank, "values": [1.5, None, "x" * 300]})
    return {"use_counts": sorted(counts), "received": ctx.all_gather(got), "gathered": ctx.all_gather(("rank", ctx.rank))}


if __name__ == "__main__":
    main()
