"""Show that two source trees write byte-identical downscaling outputs (CPU).

Used for refactors that must not change a number (issue 16). For each tree the script runs the
CLI of that tree (``PYTHONPATH=<tree> python -m carbonsr_cli.cli``) on the same generated sample
data and writes ``uniform.tif``, ``dasymetric.tif`` and ``model.tif`` (a tiny-preset model
trained for a few steps by the first tree; the same checkpoint is then used by every tree, so
that the inference path is what is compared; the checkpoint trained by the second tree is
compared tensor by tensor as well; the sample data written by the second tree is compared byte by
byte with the first's). Then it compares every pair of outputs exactly: the pixel
arrays of every band (bit patterns, NaN included), profile, band descriptions, per-band tags
and dataset tags (``TIFFTAG_DATETIME`` excluded: it is the write time).

    python benchmarks/identical_outputs.py BEFORE_TREE AFTER_TREE [--work DIR]

Exit status 0 when every output is identical, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

VARYING_TAGS = {"TIFFTAG_DATETIME"}
OUTPUTS = ("uniform", "dasymetric", "model")


def cli(tree: Path, *args: str, cwd: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(tree), CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "carbonsr_cli.cli", *args]
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"failed ({tree}): {' '.join(args)}\n{done.stdout}\n{done.stderr}")


def train_tiny(tree: Path, sample: Path, runs: Path, name: str, *, reuse: bool = False) -> Path:
    if reuse and (runs / name / "best_model.pth").exists():
        return runs / name / "best_model.pth"
    shutil.rmtree(runs / name, ignore_errors=True)
    cli(tree, "train", str(sample / "emissions_1km.tif"), "--aux", str(sample / "aux"),
        "--preset", "tiny", "--epochs", "1", "--steps-per-epoch", "6", "--batch-size", "2",
        "--device", "cpu", "--runs-dir", str(runs), "--name", name, "--seed", "0",
        "--quiet", cwd=runs.parent)
    return runs / name / "best_model.pth"


def produce(tree: Path, sample: Path, out: Path, checkpoint: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    main = str(sample / "emissions_1km.tif")
    aux = str(sample / "aux")
    common = ["--device", "cpu", "--overwrite", "--quiet"]
    cli(tree, "downscale", main, "--method", "uniform", "-o", str(out / "uniform.tif"),
        *common, cwd=out)
    cli(tree, "downscale", main, "--aux", aux, "--method", "dasymetric",
        "-o", str(out / "dasymetric.tif"), *common, cwd=out)
    cli(tree, "downscale", main, "--aux", aux, "--model", str(checkpoint),
        "-o", str(out / "model.tif"), *common, cwd=out)


def describe(path: Path) -> dict:
    import numpy as np
    import rasterio

    with rasterio.open(path) as ds:
        arr = ds.read()
        tags = {k: v for k, v in ds.tags().items() if k not in VARYING_TAGS}
        band_tags = [ds.tags(i + 1) for i in range(ds.count)]
        profile = dict(ds.profile)
        desc = ds.descriptions
    bits = np.ascontiguousarray(arr).view(np.uint8)
    return {"array_bytes": bits.tobytes(), "dtype": str(arr.dtype), "shape": arr.shape,
            "tags": tags, "band_tags": band_tags, "profile": {k: str(v) for k, v in profile.items()},
            "descriptions": desc}


def compare(a: Path, b: Path) -> list[str]:
    da, db = describe(a), describe(b)
    return [k for k in da if da[k] != db[k]]


def compare_checkpoints(a: Path, b: Path) -> list[str]:
    import torch

    ca = torch.load(a, weights_only=True, map_location="cpu")["model_state"]
    cb = torch.load(b, weights_only=True, map_location="cpu")["model_state"]
    if ca.keys() != cb.keys():
        return ["keys"]
    return [k for k in ca if not torch.equal(ca[k], cb[k])]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--work", type=Path, default=None, help="working folder (default: a temp one)")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="carbonsr-identical-"))
    work.mkdir(parents=True, exist_ok=True)
    before, after = args.before.resolve(), args.after.resolve()
    sample = work / "sample"
    if not (sample / "emissions_1km.tif").exists():
        cli(before, "sample-data", str(sample), cwd=work)
    sample_after = work / "sample_after"
    if not (sample_after / "emissions_1km.tif").exists():
        cli(after, "sample-data", str(sample_after), cwd=work)
    ok = True
    for f in sorted(q for q in sample.rglob("*") if q.is_file()):
        same = f.read_bytes() == (sample_after / f.relative_to(sample)).read_bytes()
        print(f"{'sample/' + f.relative_to(sample).as_posix():28s} {'identical bytes' if same else 'DIFFERS'}")
        ok &= same
    runs = work / "runs"
    runs.mkdir(exist_ok=True)
    ckpt = train_tiny(before, sample, runs, "before", reuse=True)  # same base tree: reuse its run
    ckpt_after = train_tiny(after, sample, runs, "after")
    produce(before, sample, work / "before", ckpt)
    produce(after, sample, work / "after", ckpt)
    for name in OUTPUTS:
        diff = compare(work / "before" / f"{name}.tif", work / "after" / f"{name}.tif")
        print(f"{name:12s} {'identical' if not diff else 'DIFFERS: ' + ', '.join(diff)}")
        ok &= not diff
    diff = compare_checkpoints(ckpt, ckpt_after)
    print(f"{'checkpoint':12s} {'identical weights' if not diff else 'DIFFERS: ' + ', '.join(diff[:5])}")
    ok &= not diff
    print(f"work folder: {work}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
