"""The model of a run loads in a background thread while the inputs are planned: its plain data
is read without torch first (``checkpoint_peek``), and any problem with the file is reported
as before, with nothing written."""

from __future__ import annotations

import pickle
import threading
from pathlib import Path

import pytest
import torch

from carbonsr_cli import checkpoints
from carbonsr_cli.checkpoint_peek import TorchPlaceholder, peek_checkpoint
from carbonsr_cli.downscale import downscale
from carbonsr_cli.errors import CheckpointError


@pytest.fixture(autouse=True)
def _background(monkeypatch: pytest.MonkeyPatch) -> None:
    """The background load on any machine (it is on from BACKGROUND_MIN_CPUS cores)."""
    from carbonsr_cli.downscale import model_job

    monkeypatch.setattr(model_job, "BACKGROUND_MIN_CPUS", 1)


def _peek(path: Path):  # noqa: ANN202
    return peek_checkpoint(path, checkpoints.FORMAT, checkpoints.REQUIRED_KEYS)


def test_peek_reads_the_plain_data_of_a_checkpoint(small_ckpt: Path) -> None:
    peek = _peek(small_ckpt)
    assert peek is not None and peek.data == small_ckpt.read_bytes()
    full = checkpoints.load_checkpoint(small_ckpt)
    for key in ("format", "format_version", "model_config", "aux_names", "stats", "factor", "years_window"):
        assert peek.meta[key] == full[key], key
    assert set(peek.meta["model_state"]) == set(full["model_state"])
    assert all(isinstance(v, TorchPlaceholder) for v in peek.meta["model_state"].values())


def test_peek_refuses_code_and_other_files_without_running_anything(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # noqa: D105
            return (Path.touch, (marker,))

    evil = tmp_path / "evil.pth"
    torch.save({"format": checkpoints.FORMAT, "x": Evil()}, evil)
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"format": checkpoints.FORMAT}))
    text = tmp_path / "text.pth"
    text.write_text("not a checkpoint\n")
    state = tmp_path / "state.pth"
    torch.save({"w": torch.zeros(2)}, state)
    for f in (evil, plain, text, state, tmp_path / "missing.pth"):
        assert _peek(f) is None, f.name
    assert not marker.exists(), "peeking executed pickled code"


@pytest.mark.parametrize("readers", ["threads", "processes"])
def test_the_model_loads_while_the_inputs_are_planned(small_region: dict, small_ckpt: Path, tmp_path: Path,
                                                      readers: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The model's load waits here until planning has checked the aux coverage: a load on the
    planning thread (the order before) would wait for itself and time out. With reader
    processes the aux layers are prepared and pre-warped meanwhile. The file is the one of a
    run that loads the model first (fewer CPUs than BACKGROUND_MIN_CPUS)."""
    import numpy as np
    import rasterio

    from carbonsr_cli.downscale import model_job, planning

    monkeypatch.delenv("CARBONSR_READ_THREADS", raising=False)
    monkeypatch.setenv("CARBONSR_READ_PROCS" if readers == "processes" else "CARBONSR_READ_THREADS", "2")
    ref = tmp_path / "ref.tif"
    with monkeypatch.context() as m:
        m.setattr(model_job, "BACKGROUND_MIN_CPUS", 10**6)
        downscale(small_region["main"], [small_region["aux"]], ref, checkpoint=small_ckpt, device="cpu", progress=False)

    checked = threading.Event()
    real_stack, real_load = planning._checked_stack, checkpoints.load_model_for_inference

    def stack(*a, **k):  # noqa: ANN002, ANN003, ANN202
        out = real_stack(*a, **k)
        checked.set()
        return out

    def load(*a, **k):  # noqa: ANN002, ANN003, ANN202
        assert checked.wait(20), "the model was loaded before the inputs were planned"
        return real_load(*a, **k)

    monkeypatch.setattr(planning, "_checked_stack", stack)
    monkeypatch.setattr(checkpoints, "load_model_for_inference", load)
    monkeypatch.setattr(planning, "load_model_for_inference", load)  # (the name planning imported)
    s = downscale(small_region["main"], [small_region["aux"]], tmp_path / "m.tif", checkpoint=small_ckpt,
                  device="cpu", progress=False)
    assert s.conservation.ok and s.device == "cpu" and s.batch_size == 8
    assert s.model_sha256 == checkpoints._hash_file(small_ckpt)
    with rasterio.open(ref) as a, rasterio.open(tmp_path / "m.tif") as b:
        ta, tb = ({k: v for k, v in d.tags().items() if k != "TIFFTAG_DATETIME"} for d in (a, b))
        assert np.array_equal(a.read(), b.read()) and ta == tb


@pytest.mark.parametrize("readers", ["threads", "processes"])
def test_a_load_error_in_the_background_is_reported_with_nothing_left(small_region: dict, small_ckpt: Path,
                                                                       tmp_path: Path, readers: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain data that reads fine, weights that do not fit the model: the load fails after the
    inputs were planned and while the aux layers are prepared (with reader processes: the
    processes started and the layers pre-warped into a folder next to the output); the error
    names the file, no output, folder or process is left."""
    import multiprocessing

    monkeypatch.delenv("CARBONSR_READ_THREADS", raising=False)
    monkeypatch.setenv("CARBONSR_READ_PROCS" if readers == "processes" else "CARBONSR_READ_THREADS", "2")
    from carbonsr_cli.downscale import readers as readers_mod

    folders = []
    real_warps = readers_mod.materialize_warps

    def warps(*a, **k):  # noqa: ANN002, ANN003, ANN202
        folders.append(real_warps(*a, **k))
        return folders[-1]

    monkeypatch.setattr(readers_mod, "materialize_warps", warps)
    ckpt = checkpoints.load_checkpoint(small_ckpt)
    name = next(k for k, v in ckpt["model_state"].items() if v.ndim >= 2)
    ckpt["model_state"][name] = torch.zeros(3, 3)
    bad = tmp_path / "bad.pth"
    checkpoints.save_checkpoint(bad, ckpt)
    assert _peek(bad) is not None
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(CheckpointError, match="weights do not match") as info:
        downscale(small_region["main"], [small_region["aux"]], out_dir / "m.tif", checkpoint=bad, device="cpu",
                  progress=False)
    assert Path(info.value.path).name == "bad.pth"
    assert list(out_dir.iterdir()) == []
    assert multiprocessing.active_children() == []
    if readers == "processes":  # the pre-warp folder existed, next to the output, and is gone
        assert len(folders) == 1 and folders[0] is not None and folders[0].parent == out_dir
    else:
        assert folders == []


def test_in_background_keeps_the_result_or_the_exception() -> None:
    from carbonsr_cli.background import in_background

    fut, thread = in_background(lambda a, b: a + b, 2, 3, name="t-ok")
    assert fut.result(timeout=10) == 5 and thread.daemon and thread.name == "t-ok"

    def fail() -> None:
        raise ValueError("bad input")

    fut, thread = in_background(fail, name="t-fail")
    thread.join(10)
    with pytest.raises(ValueError, match="bad input"):
        fut.result()


def test_deferred_closes_are_waited_for_and_report_their_error() -> None:
    from carbonsr_cli.background import DeferredCloses

    done = threading.Event()
    with DeferredCloses() as later:
        later(lambda: (threading.Event().wait(0.05), done.set()))
    assert done.is_set()  # the with block waited for it

    def fail() -> None:
        raise OSError("shutdown failed")

    with pytest.raises(OSError, match="shutdown failed"):
        with DeferredCloses() as later:
            later(fail)
    with pytest.raises(KeyError):  # an error already on its way out is the one reported
        with DeferredCloses() as later:
            later(fail)
            raise KeyError("first")


def test_the_prewarp_runs_beside_the_vector_indexes_and_a_failure_leaves_no_folder(
        small_region: dict, small_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With reader processes, the layers in another CRS are warped in a thread of their own
    while the stack builds its vector indexes (GDAL's work beside Python's). If the indexes fail,
    the pre-warp folder is removed and the error reaches the caller."""
    from carbonsr_cli.aux.stack import AuxStack
    from carbonsr_cli.downscale import readers as readers_mod

    monkeypatch.delenv("CARBONSR_READ_THREADS", raising=False)
    monkeypatch.setenv("CARBONSR_READ_PROCS", "2")
    warping = threading.Event()
    overlapped: list[bool] = []
    folders: list[Path | None] = []
    real_warps, real_prepare = readers_mod.materialize_warps, AuxStack.prepare

    def warps(*a, **k):  # noqa: ANN002, ANN003, ANN202
        warping.set()
        folders.append(real_warps(*a, **k))
        return folders[-1]

    def prepare(self: AuxStack) -> None:
        if not overlapped:  # the first call: prepare_aux's, in its background thread
            overlapped.append(warping.wait(20))
            raise RuntimeError("index failed")
        real_prepare(self)

    monkeypatch.setattr(readers_mod, "materialize_warps", warps)
    monkeypatch.setattr(AuxStack, "prepare", prepare)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(RuntimeError, match="index failed"):
        downscale(small_region["main"], [small_region["aux"]], out_dir / "m.tif", checkpoint=small_ckpt,
                  device="cpu", progress=False)
    assert overlapped == [True]  # the warp had started while the indexes were being built
    assert len(folders) == 1 and folders[0] is not None and not folders[0].exists()
    assert list(out_dir.iterdir()) == []
