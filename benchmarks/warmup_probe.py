"""Where the model warm-up of a downscale run goes (issue 20, session 17).

One fresh process per call; prints one JSON line of seconds since the process started, each
step synchronised: ``import`` (torch), ``loaded`` (the checkpoint's model on the GPU), then the
forward passes of the chosen mode on random inputs of 120 x 120 tiles, T = 1:

- ``default``: fp32 then bf16 at batch 64, as ``_Predictor.warm_up``, then both again;
- ``small``: fp32 and bf16 at batch 4 first, then at batch 64;
- ``bf16only``: bf16 first, then fp32.

Run on a GPU machine, a fresh process each time::

    python benchmarks/warmup_probe.py base.pth default   # base.pth: bench_downscale._make_checkpoint
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

T0 = time.perf_counter()


def since_start() -> float:
    """Seconds since this process started importing this module."""
    return round(time.perf_counter() - T0, 3)


def main() -> None:
    checkpoint, mode = Path(sys.argv[1]), sys.argv[2]
    marks: dict[str, float] = {}
    import torch

    marks["import"] = since_start()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from carbonsr_cli.checkpoints import load_checkpoint, load_model_for_inference
    from models.inference import low_precision_copy

    dev = torch.device("cuda")
    loaded = load_model_for_inference(checkpoint, dev, checkpoint=load_checkpoint(checkpoint))
    torch.cuda.synchronize()
    marks["loaded"] = since_start()
    model, channels = loaded.model, len(loaded.aux_names)

    def forward(net: torch.nn.Module, batch: int, label: str) -> None:
        with torch.inference_mode():
            aux = torch.rand((batch, channels, 1, 120, 120), device=dev)
            main_ = torch.rand((batch, 1, 1, 120, 120), device=dev)
            net(aux, main_)
            torch.cuda.synchronize()
        marks[label] = since_start()

    def bf16_copy() -> torch.nn.Module:
        low = low_precision_copy(model)
        torch.cuda.synchronize()
        marks["bf16 copy"] = since_start()
        return low

    if mode == "default":
        forward(model, 64, "fp32 #1")
        low = bf16_copy()
        forward(low, 64, "bf16 #1")
        forward(model, 64, "fp32 #2")
        forward(low, 64, "bf16 #2")
    elif mode == "small":
        forward(model, 4, "fp32 b4")
        low = bf16_copy()
        forward(low, 4, "bf16 b4")
        forward(model, 64, "fp32 b64")
        forward(low, 64, "bf16 b64")
    elif mode == "bf16only":
        low = bf16_copy()
        forward(low, 64, "bf16 #1")
        forward(model, 64, "fp32 #1")
    else:
        raise SystemExit(f"unknown mode {mode!r}; choose default, small or bf16only")
    print(json.dumps({"mode": mode, **marks}))


if __name__ == "__main__":
    main()
