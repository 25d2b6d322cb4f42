"""Worker script of the distributed tests, started by ``torch.distributed.run`` (2 CPU ranks).

Usage:
    python -m torch.distributed.run --nproc-per-node 2 ... _runner.py train SPEC.json
    python -m torch.distributed.run --nproc-per-node 2 ... _runner.py downscale SPEC.json

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
        result = {"history": res.history, "run_dir": str(res.run_dir), "global_step": res.global_step}
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


if __name__ == "__main__":
    main()
