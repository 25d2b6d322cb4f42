"""Tests of carbonsr_cli.evaluate and ``carbonsr evaluate`` (conservation, reference metrics, CLI)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from raster_files import write_north_up
from typer.testing import CliRunner

from carbonsr_cli.cli import app
from carbonsr_cli.errors import ConservationError, InputDataError, UsageError
from carbonsr_cli.evaluate import check_conservation, compare_to_reference


#: Issue 18 item 10c: warnings raised from carbonsr's own code (deprecated affine ``*``, matplotlib
#: ``set_bad``, torch on read-only arrays) fail these tests; carbonsr's own user warnings do not.
pytestmark = pytest.mark.filterwarnings(
    "error::PendingDeprecationWarning:carbonsr_cli", "error::DeprecationWarning:carbonsr_cli",
    "error::UserWarning:carbonsr_cli", "default::carbonsr_cli.errors.CarbonSRWarning",
)

runner = CliRunner()


# ----------------------------------------------------------------------------- fixtures


def write_tif(path: Path, data: np.ndarray, *, res: float, **kw: object) -> Path:
    """Write ``data`` as a north-up float32 GeoTIFF (:func:`raster_files.write_north_up`)."""
    return write_north_up(path, data, res=res, **kw)


def uniform_children(totals: np.ndarray, f: int, nodata: float = -9999.0) -> np.ndarray:
    """``[B, h, w]`` parent totals -> ``[B, h*f, w*f]`` children holding total / f**2 (nodata kept)."""
    nd = totals == nodata
    child = np.repeat(np.repeat(np.where(nd, 0.0, totals) / f**2, f, axis=-2), f, axis=-1)
    return np.where(np.repeat(np.repeat(nd, f, axis=-2), f, axis=-1), nodata, child)


@pytest.fixture
def parent_child(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    """A 2-band 6 x 8 parent raster (1000 m, zeros + one nodata cell) and its uniform 100 m children."""
    rng = np.random.default_rng(1)
    tot = rng.lognormal(3.0, 2.0, size=(2, 6, 8))
    tot[rng.random(tot.shape) < 0.3] = 0.0
    tot[:, 0, 0] = -9999.0
    tot = tot.astype(np.float32).astype(np.float64)
    main = write_tif(tmp_path / "main_1km.tif", tot, res=1000.0, descriptions=["2019", "2020"])
    child = uniform_children(tot, 10)
    pred = write_tif(tmp_path / "pred_100m.tif", child, res=100.0, descriptions=["2019", "2020"])
    return main, pred, tot


# ----------------------------------------------------------------------------- independent metrics


def np_metrics(p: np.ndarray, t: np.ndarray) -> dict[str, float]:
    """Reference implementation of every metric, written from the definitions in ARCHITECTURE.md."""
    p = p.astype(np.float64).ravel()
    t = t.astype(np.float64).ravel()
    nz = t > 0
    err = np.abs(p - t)
    nz_vals = t[nz]
    q99 = np.quantile(nz_vals, 0.99)
    q95 = np.quantile(nz_vals, 0.95)
    return {
        "nonzero-mae": float(err[nz].mean()),
        "balanced-mae": float(0.5 * err[~nz].mean() + 0.5 * err[nz].mean()),
        "top1-mae": float(err[nz & (t >= q99)].mean()),
        "top5-mae": float(err[nz & (t >= q95)].mean()),
        "rmse": float(np.sqrt(((p - t) ** 2).mean())),
        "r2": float(1 - ((p - t) ** 2).sum() / ((t - t.mean()) ** 2).sum()),
        "pearson": float(np.corrcoef(p, t)[0, 1]),
        "bias": float((p.sum() - t.sum()) / t.sum()),
    }


def _nonzero_values(path: Path) -> np.ndarray:
    import rasterio

    with rasterio.open(path) as ds:
        a = ds.read().astype(np.float64)
    return a[a > 0]


@pytest.fixture
def hand_pair(tmp_path: Path) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """Prediction and reference on the same 20 x 30 grid: 40 % zeros, 1000 distinct nonzero values,
    nodata in both (in different places)."""
    rng = np.random.default_rng(7)
    t = rng.lognormal(1.0, 1.5, size=(20, 30))
    t[rng.random(t.shape) < 0.4] = 0.0
    p = np.clip(t * rng.lognormal(0, 0.3, size=t.shape) + rng.random(t.shape) * (t == 0) * 0.5, 0, None)
    t = t.astype(np.float32).astype(np.float64)
    p = p.astype(np.float32).astype(np.float64)
    t_nd, p_nd = t.copy(), p.copy()
    t_nd[3, 4] = -9999.0
    p_nd[5, 6] = -9999.0
    ref = write_tif(tmp_path / "ref.tif", t_nd, res=100.0, descriptions=["2020"])
    pred = write_tif(tmp_path / "pred.tif", p_nd, res=100.0, descriptions=["2020"])
    keep = np.ones(t.shape, bool)
    keep[3, 4] = keep[5, 6] = False
    return pred, ref, p[keep], t[keep]


# ----------------------------------------------------------------------------- conservation


class TestConservation:
    def test_exact_children_pass(self, parent_child: tuple[Path, Path, np.ndarray]) -> None:
        main, pred, tot = parent_child
        rep = check_conservation(pred, main)
        assert rep.ok, rep.failure_message()
        assert rep.factor == 10
        assert [b.name for b in rep.bands] == ["2019", "2020"]
        valid = int((tot[0] != -9999).sum())
        assert rep.bands[0].parent_cells == valid
        assert rep.bands[0].child_cells == 6 * 8 * 100
        assert rep.max_rel_err < 1e-6
        assert all(b.nans == b.negatives == b.nodata_mismatch == 0 for b in rep.bands)

    def test_sample_truth_conserves_totals(self, sample_dir: Path) -> None:
        rep = check_conservation(sample_dir / "truth_100m.tif", sample_dir / "emissions_1km.tif")
        assert rep.ok
        assert 0 <= rep.max_rel_err < 1e-6
        assert len(rep.bands) == 3

    def test_one_corrupted_block_named(self, tmp_path: Path, parent_child: tuple[Path, Path, np.ndarray]) -> None:
        main, _, tot = parent_child
        child = uniform_children(tot, 10)
        r, c = 4, 6  # parent cell of the corrupted block (band 2)
        child[1, r * 10 + 2, c * 10 + 7] += 5.0
        bad = write_tif(tmp_path / "bad.tif", child, res=100.0, descriptions=["2019", "2020"])
        rep = check_conservation(bad, main)
        assert not rep.ok
        assert rep.bands[0].ok and not rep.bands[1].ok
        assert rep.bands[1].failed_blocks == 1
        w = rep.worst
        assert (w.band, w.row, w.col) == ("2020", r, c)
        # centre of parent cell (4, 6): x = 500000 + 6.5 km, y = 4000000 - 4.5 km
        assert (w.x, w.y) == (506500.0, 3995500.0)
        assert rep.bands[1].max_abs_err == pytest.approx(5.0, rel=1e-5)
        with pytest.raises(ConservationError, match=r"parent row 4, col 6 \(x=506500, y=3995500\)"):
            rep.raise_if_failed()
        res = runner.invoke(app, ["evaluate", str(bad), "--totals", str(main)])
        assert res.exit_code == 1, res.output
        text = " ".join(res.output.split())  # rich wraps long lines
        assert "parent row 4, col 6" in text and "x=506500, y=3995500" in text
        assert "FAIL" in text

    def test_nan_negative_and_nodata_mismatch(self, tmp_path: Path, parent_child: tuple[Path, Path, np.ndarray]) -> None:
        main, _, tot = parent_child
        child = uniform_children(tot, 10)
        # NaN inside a valid parent, a negative pair that keeps the sum, and data under the nodata parent (0, 0)
        child[0, 10, 10] = np.nan
        child[0, 20, 20] += child[0, 20, 21] + 1.0
        child[0, 20, 21] = -1.0
        child[0, 1, 1] = 3.0
        bad = write_tif(tmp_path / "bad.tif", child, res=100.0, descriptions=["2019", "2020"])
        b = check_conservation(bad, main).bands[0]
        assert b.nans == 1
        assert b.negatives == 1
        assert b.nodata_mismatch == 1
        assert not b.ok

    def test_tolerances(self, tmp_path: Path, parent_child: tuple[Path, Path, np.ndarray]) -> None:
        main, _, tot = parent_child
        child = uniform_children(tot, 10)
        i, j = np.argwhere(tot[0] > 1.0)[0]
        child[0, i * 10, j * 10] += tot[0, i, j] * 1e-3  # 0.1 % too much
        p = write_tif(tmp_path / "p.tif", child, res=100.0, descriptions=["2019", "2020"])
        assert not check_conservation(p, main).ok
        assert check_conservation(p, main, rtol=1e-2).ok

    def test_subwindow_prediction(self, tmp_path: Path, parent_child: tuple[Path, Path, np.ndarray]) -> None:
        main, _, tot = parent_child
        child = uniform_children(tot, 10)[:, 20:50, 30:70]  # parent rows 2..4, cols 3..6
        p = write_tif(tmp_path / "p.tif", child, res=100.0, origin=(503000.0, 3998000.0), descriptions=["2019", "2020"])
        rep = check_conservation(p, main)
        assert rep.ok and rep.bands[0].parent_cells == int((tot[0, 2:5, 3:7] != -9999).sum())
        child[0, 5, 5] += 1.0  # parent (2 + 0, 3 + 0)
        p2 = write_tif(tmp_path / "p2.tif", child, res=100.0, origin=(503000.0, 3998000.0), descriptions=["2019", "2020"])
        w = check_conservation(p2, main).worst
        assert (w.row, w.col) == (2, 3)

    def test_non_integer_factor(self, tmp_path: Path, parent_child: tuple[Path, Path, np.ndarray]) -> None:
        main, _, _ = parent_child
        p = write_tif(tmp_path / "p.tif", np.zeros((2, 18, 24)), res=333.0, descriptions=["2019", "2020"])
        with pytest.raises(InputDataError, match="not an integer fraction"):
            check_conservation(p, main)

    def test_band_mismatch(self, tmp_path: Path, parent_child: tuple[Path, Path, np.ndarray]) -> None:
        main, _, tot = parent_child
        p = write_tif(tmp_path / "p.tif", uniform_children(tot, 10), res=100.0, descriptions=["2019", "2022"])
        with pytest.raises(InputDataError, match="band names do not match"):
            check_conservation(p, main)
        # unnamed bands: matched by index, a different count is an error
        p1 = write_tif(tmp_path / "p1.tif", uniform_children(tot, 10)[:1], res=100.0)
        with pytest.raises(InputDataError, match="cannot match bands"):
            check_conservation(p1, main)


# ----------------------------------------------------------------------------- reference metrics


class TestReference:
    def test_metrics_equal_numpy(self, hand_pair: tuple[Path, Path, np.ndarray, np.ndarray]) -> None:
        pred, ref, p, t = hand_pair
        res = compare_to_reference(pred, ref)
        expect = np_metrics(p, t)
        got = res["all"]
        assert got["cells"] == p.size == 20 * 30 - 2
        for k, v in expect.items():
            assert got[k] == pytest.approx(v, rel=1e-6 if k.startswith("top") else 1e-9, abs=1e-12), k

    def test_balanced_halves(self, tmp_path: Path) -> None:
        # zeros predicted 1.0 (error 1 on the zero half), nonzeros off by 3.0 (error 3): balanced = 2
        t = np.array([[0.0, 0.0, 0.0, 5.0], [10.0, 0.0, 7.0, 0.0]])
        p = np.array([[1.0, 1.0, 1.0, 8.0], [13.0, 1.0, 4.0, 1.0]])
        ref = write_tif(tmp_path / "r.tif", t, res=10.0)
        pred = write_tif(tmp_path / "p.tif", p, res=10.0)
        res = compare_to_reference(pred, ref, metrics=["balanced-mae", "nonzero-mae", "top1-mae"])
        assert res["all"]["balanced-mae"] == pytest.approx(2.0)
        assert res["all"]["nonzero-mae"] == pytest.approx(3.0)
        # top-1 %: threshold = 99th percentile of {5, 7, 10} -> only the cell with 10 (error 3)
        assert res["all"]["top1-mae"] == pytest.approx(3.0)
        assert set(res["all"]) == {"balanced-mae", "nonzero-mae", "top1-mae", "cells"}

    def test_perfect_prediction(self, sample_dir: Path) -> None:
        truth, main = sample_dir / "truth_100m.tif", sample_dir / "emissions_1km.tif"
        same = compare_to_reference(truth, truth)
        assert same["method"] == "identical grid"
        for m in ("nonzero-mae", "balanced-mae", "top1-mae", "top5-mae", "rmse", "bias"):
            assert same["all"][m] == 0.0, m
        assert same["all"]["r2"] == 1.0 and same["all"]["pearson"] == pytest.approx(1.0)
        coarse = compare_to_reference(truth, main)
        assert coarse["factor"] == 10 and coarse["all"]["cells"] == 3 * 8327
        # totals are float32 roundings of float64 block sums: errors at float32 precision only
        assert coarse["all"]["r2"] == pytest.approx(1.0, abs=1e-12)
        main_mean = float(np.mean(_nonzero_values(main)))
        assert coarse["all"]["nonzero-mae"] < 1e-6 * main_mean
        assert abs(coarse["all"]["bias"]) < 1e-7

    def test_coarser_reference_block_sums(self, tmp_path: Path) -> None:
        rng = np.random.default_rng(3)
        fine = rng.lognormal(0, 1, size=(12, 15))
        # reference: 30 m cells, origin 1 coarse cell west/north of the prediction, 6 x 7 cells
        ref_vals = rng.lognormal(1, 1, size=(6, 7))
        pred = write_tif(tmp_path / "p.tif", fine, res=10.0, origin=(1030.0, 2000.0 - 30.0))
        ref = write_tif(tmp_path / "r.tif", ref_vals, res=30.0, origin=(1000.0, 2000.0))
        res = compare_to_reference(pred, ref, metrics=["rmse", "bias"])
        assert res["factor"] == 3 and "block sums" in res["method"]
        # prediction covers reference rows 1..4, cols 1..5 exactly
        agg = fine.astype(np.float32).astype(np.float64).reshape(4, 3, 5, 3).sum(axis=(1, 3))
        r = ref_vals.astype(np.float32).astype(np.float64)[1:5, 1:6]
        assert res["all"]["cells"] == 20
        assert res["all"]["rmse"] == pytest.approx(np.sqrt(((agg - r) ** 2).mean()), rel=1e-9)
        assert res["all"]["bias"] == pytest.approx((agg.sum() - r.sum()) / r.sum(), rel=1e-9)

    def test_reprojected_reference_conserves_mass(self, tmp_path: Path) -> None:
        # non-integer ratio (10 m -> 25 m): Resampling.sum reprojection keeps the total
        fine = np.ones((50, 50))
        pred = write_tif(tmp_path / "p.tif", fine, res=10.0, origin=(0.0, 500.0))
        ref = write_tif(tmp_path / "r.tif", np.full((20, 20), 6.25), res=25.0, origin=(0.0, 500.0))
        res = compare_to_reference(pred, ref, metrics=["rmse", "bias"])
        assert "Resampling.sum" in res["method"]
        assert res["all"]["cells"] == 400
        assert abs(res["all"]["bias"]) < 1e-6
        assert res["all"]["rmse"] < 1e-6

    def test_other_crs_reference(self, tmp_path: Path) -> None:
        # prediction: 1 t per 10 m cell on a 1 km x 1 km UTM square; reference: 0.002 degree cells (EPSG:4326)
        from pyproj import Geod, Transformer

        pred = write_tif(tmp_path / "p.tif", np.ones((100, 100)), res=10.0, origin=(500_000.0, 4_000_000.0))
        tr = Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True)
        lon0, lat0 = tr.transform(499_900.0, 4_000_100.0)
        ref = write_tif(tmp_path / "r.tif", np.ones((10, 10)), res=0.002, origin=(lon0, lat0), crs="EPSG:4326")
        res = compare_to_reference(pred, ref, metrics=["bias"], plot=tmp_path / "x.png")
        assert "Resampling.sum" in res["method"]
        n = res["all"]["cells"]
        assert 0 < n < 100  # cells only partly covered by the prediction are left out
        # each fully covered cell holds its area in units of 100 m2 (1 t per 10 m x 10 m cell)
        area = abs(Geod(ellps="WGS84").polygon_area_perimeter([0, 0.002, 0.002, 0], [lat0, lat0, lat0 - 0.002, lat0 - 0.002])[0])
        mean_pred = (res["all"]["bias"] + 1.0)  # reference is 1 everywhere: bias + 1 = mean prediction
        assert mean_pred == pytest.approx(area / 100.0, rel=0.03)

    def test_region_restricts_cells(self, hand_pair: tuple[Path, Path, np.ndarray, np.ndarray]) -> None:
        pred, ref, _, _ = hand_pair
        # grid origin (500000, 4000000), 100 m: region = cols 0..9, rows 0..4 (cell centres inside)
        res = compare_to_reference(pred, ref, metrics=["rmse"], region=(500000.0, 3999500.0, 501000.0, 4000000.0))
        assert res["all"]["cells"] == 50 - 1  # nodata of the reference at (3, 4)

    def test_finer_reference_is_an_error(self, tmp_path: Path) -> None:
        pred = write_tif(tmp_path / "p.tif", np.ones((4, 4)), res=100.0)
        ref = write_tif(tmp_path / "r.tif", np.ones((40, 40)), res=10.0)
        with pytest.raises(InputDataError, match="finer than the prediction"):
            compare_to_reference(pred, ref)

    def test_unknown_metric(self, hand_pair: tuple[Path, Path, np.ndarray, np.ndarray]) -> None:
        pred, ref, _, _ = hand_pair
        with pytest.raises(UsageError, match="unknown metric"):
            compare_to_reference(pred, ref, metrics=["mape"])


# ----------------------------------------------------------------------------- CLI


class TestCli:
    def test_json_stdout_parses(self, hand_pair: tuple[Path, Path, np.ndarray, np.ndarray]) -> None:
        pred, ref, p, t = hand_pair
        res = runner.invoke(app, ["evaluate", str(pred), "--reference", str(ref), "--metric", "nonzero-mae",
                                  "--metric", "r2", "--json", "-"])
        assert res.exit_code == 0, res.output
        start = res.stdout.index("{")
        data = json.loads(res.stdout[start:])
        got = data["reference"]["all"]
        assert set(got) == {"nonzero-mae", "r2", "cells"}
        assert got["nonzero-mae"] == pytest.approx(np_metrics(p, t)["nonzero-mae"], rel=1e-9)

    def test_json_file_and_plot(self, tmp_path: Path, sample_dir: Path) -> None:
        out_json, out_png = tmp_path / "r.json", tmp_path / "cmp.png"
        res = runner.invoke(app, ["evaluate", str(sample_dir / "truth_100m.tif"), "--reference",
                                  str(sample_dir / "emissions_1km.tif"), "--totals", str(sample_dir / "emissions_1km.tif"),
                                  "--json", str(out_json), "--plot", str(out_png)])
        assert res.exit_code == 0, res.output
        data = json.loads(out_json.read_text())
        assert data["conservation"]["ok"] is True
        assert data["reference"]["all"]["r2"] == pytest.approx(1.0)
        head = out_png.read_bytes()[:8]
        assert head == b"\x89PNG\r\n\x1a\n"
        assert 10_000 < out_png.stat().st_size < 300_000
        # existing outputs are not replaced without --overwrite
        res2 = runner.invoke(app, ["evaluate", str(sample_dir / "truth_100m.tif"), "--reference",
                                   str(sample_dir / "emissions_1km.tif"), "--plot", str(out_png)])
        assert res2.exit_code == 1 and "already exists" in " ".join(res2.output.split())

    @pytest.mark.parametrize(
        ("args", "code", "needle"),
        [
            (["evaluate", "{d}/missing.tif", "--totals", "{d}/missing2.tif"], 1, "file not found"),
            (["evaluate", "{d}/text.tif", "--reference", "{d}/text.tif"], 1, "not a raster"),
            (["evaluate", "{d}/text.tif"], 2, "--totals"),
            (["evaluate", "{d}/text.tif", "--reference", "{d}/text.tif", "--metric", "mape"], 2, "unknown metric"),
            (["evaluate", "{d}/text.tif", "--reference", "{d}/text.tif", "--region", "1,2,0,4"], 2, "minx,miny"),
            (["evaluate", "--model", "{d}/x.pth"], 2, "--main"),
        ],
    )
    def test_bad_inputs_one_line(self, tmp_path: Path, args: list[str], code: int, needle: str) -> None:
        (tmp_path / "text.tif").write_text("hello, not a raster\n")
        res = runner.invoke(app, [a.format(d=tmp_path) for a in args])
        assert res.exit_code == code, res.output
        text = " ".join(res.output.split())
        assert needle in text
        assert "Traceback" not in text
