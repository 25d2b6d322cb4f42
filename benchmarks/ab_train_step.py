"""CPU A/B of the training step: time per step and the loss after N steps, for the tree on
``PYTHONPATH`` (run it once per tree, alternately, on the same machine)::

    PYTHONPATH=/path/to/old python benchmarks/ab_train_step.py tiny 6
    PYTHONPATH=/path/to/new python benchmarks/ab_train_step.py tiny 6

Synthetic data (48 x 48 parent cells, 6 aux layers, 3 years), batch 4, T = 3, one CPU thread,
fp32. ``cpu`` is the process CPU time per step (robust on a loaded machine), ``wall`` the wall
time; the last loss (repr) must be identical when the CPU path is unchanged.
"""

import sys
import time

import numpy as np
import torch

from carbonsr_cli.train.dataset import AuxCache, MainData, PatchSampler, build_batch
from carbonsr_cli.train.loop import _autocast_factory, training_step
from models.config import preset
from models.losses import DualLayerWeightedLoss
from models.network import DSTCarbonFormer


def main() -> None:  # noqa: D103
    name, steps = (sys.argv[1] if len(sys.argv) > 1 else "tiny"), int(sys.argv[2]) if len(sys.argv) > 2 else 6
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    main_d = MainData(grid=None, years=["a", "b", "c"], values=rng.gamma(1.0, 5.0, size=(3, 48, 48)).astype(np.float32), paths=[])
    aux = AuxCache(rng.normal(size=(6, 3, 480, 480)).astype(np.float16), [f"a{k}" for k in range(6)])
    pos = np.array([(r, c) for r in range(0, 36, 3) for c in range(0, 36, 3)])
    smp = PatchSampler(pos, 3, 3, {12: 0.5, 4: 0.25, 2: 0.25}, 4, 0)
    torch.manual_seed(0)
    model = DSTCarbonFormer(preset(name, aux_channels=6, max_years=3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    loss_fn = DualLayerWeightedLoss(1.0, 1.0, mean_log=1.0)
    kw = dict(device=torch.device("cpu"), autocast=_autocast_factory(torch.device("cpu"), "fp32"), factor=10,
              moe_weight=0.01, grad_clip=1.0)
    batches = [build_batch(smp.spec(0, s), main_d, aux, factor=10, patch=12, years_window=3) for s in range(6)]
    training_step(model, batches[0], loss_fn, opt, sch, **kw)
    c0, w0 = time.process_time(), time.perf_counter()
    losses = [training_step(model, batches[k % 6], loss_fn, opt, sch, **kw) for k in range(steps)]
    print(f"{name}: cpu {1000 * (time.process_time() - c0) / steps:.1f} ms/step  "
          f"wall {1000 * (time.perf_counter() - w0) / steps:.1f} ms/step  last loss {losses[-1]!r}")


if __name__ == "__main__":
    main()
