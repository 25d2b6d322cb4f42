"""Several GPUs in one process (``--device cuda:0,cuda:1``, issue 21): the option's parsing and
errors, and the engine path where copies of the model take turns (run here with CPU copies:
the same code path, bitwise comparable)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ds_helpers import no_temp_files
from typer.testing import CliRunner

from carbonsr_cli.cli import app
from carbonsr_cli.devices import split_device_list
from carbonsr_cli.downscale import downscale
from carbonsr_cli.errors import UsageError


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        ("auto", ("auto", [])),
        ("cuda:1", ("cuda:1", [])),
        ("cuda:0,cuda:1", ("cuda:0", ["cuda:1"])),
        (" CUDA:2, cuda:0 ,cuda:1", ("cuda:2", ["cuda:0", "cuda:1"])),
        ("cuda:all", ("cuda:0", ["all"])),
    ],
)
def test_device_lists_name_a_primary_and_extra_gpus(option: str, expected: tuple) -> None:
    assert split_device_list(option) == expected


@pytest.mark.parametrize(
    ("option", "needle"),
    [("cuda:0,cpu", "cuda:N names only (not 'cpu')"), ("cuda:0,cuda", "not 'cuda'"), ("cuda:1,cuda:1", "names a GPU twice")],
)
def test_bad_device_lists_fail_before_anything_is_written(small_region: dict, small_ckpt: Path, tmp_path: Path,
                                                          option: str, needle: str) -> None:
    with pytest.raises(UsageError, match="--device"):
        split_device_list(option)
    out = tmp_path / "out.tif"
    res = CliRunner().invoke(app, ["downscale", str(small_region["main"]), "--aux", str(small_region["aux"]), "--model",
                                   str(small_ckpt), "-o", str(out), "--device", option, "-q"])
    assert res.exit_code == 2, res.output  # a usage error
    assert res.output.count("error:") == 1 and needle in " ".join(res.output.split()), res.output
    assert not out.exists() and no_temp_files(tmp_path) == []


def test_model_copies_take_turns_and_write_the_one_device_file(small_region: dict, small_ckpt: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The predictor with one extra device: calls alternate between the model and its copy, every
    result comes back on the first device, and the file is bitwise the single-device one (CPU
    copies compute exactly what the model computes)."""
    import rasterio

    from carbonsr_cli.downscale import engine

    monkeypatch.setenv("CARBONSR_READ_THREADS", "1")
    one = downscale(small_region["main"], [small_region["aux"]], tmp_path / "one.tif", checkpoint=small_ckpt,
                    device="cpu", batch_size=2, progress=False)
    made: list = []
    plain = engine._Predictor

    def with_copy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        pred = plain(*args, **dict(kwargs, extra_devices=[torch.device("cpu")]))
        made.append(pred)
        return pred

    monkeypatch.setattr(engine, "_Predictor", with_copy)
    two = downscale(small_region["main"], [small_region["aux"]], tmp_path / "two.tif", checkpoint=small_ckpt,
                    device="cpu", batch_size=2, progress=False)
    (pred,) = made
    (rep,) = pred.replicas
    assert rep.model is not pred.model and rep._decided and rep.low_precision == pred.low_precision
    assert pred._calls > 4 and rep._calls == pred._calls // 2  # every second call went to the copy
    assert one.conservation.ok and two.conservation.ok and two.tiles == one.tiles
    with rasterio.open(tmp_path / "one.tif") as a, rasterio.open(tmp_path / "two.tif") as b:
        assert np.array_equal(a.read(), b.read(), equal_nan=True)
        ta, tb = a.tags(), b.tags()
        ta.pop("TIFFTAG_DATETIME", None), tb.pop("TIFFTAG_DATETIME", None)
        assert ta == tb


def test_a_device_list_needs_cuda(small_region: dict, small_ckpt: Path, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Without CUDA a GPU list is refused with one line (the extra devices are checked once the
    model's device is known, before the engine writes anything)."""
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    out = tmp_path / "out.tif"
    with pytest.raises(UsageError, match="CUDA is not available"):
        downscale(small_region["main"], [small_region["aux"]], out, checkpoint=small_ckpt, device="cuda:0,cuda:1",
                  progress=False)
    assert not out.exists() and no_temp_files(tmp_path) == []




def test_gpu_work_is_queued_with_its_device_current() -> None:
    """CUDA graphs capture on the current device's streams and events record there: the engine
    and every model copy make their GPU the current device (``--device cuda:1`` included)."""
    from carbonsr_cli.downscale.predict import _current

    ctx = _current(torch.device("cuda", 1))
    assert isinstance(ctx, torch.cuda.device) and ctx.idx == 1
    with _current(torch.device("cpu")):  # nothing to switch on the CPU
        pass
