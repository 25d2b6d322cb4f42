"""Every registered method against the physics contract, and ``--method`` parsing."""

from __future__ import annotations


import pytest
import torch

from carbonsr_cli.errors import UsageError
from carbonsr_cli.methods import REGISTRY, MethodSpec, parse_method
from carbonsr_cli.methods.dasymetric import match_layer
from models.physics import block_sum

LAYERS = ["lights", "pop", "roads:length", "roads:length:motorway", "plants:co2_t_yr"]
POINTS = ["plants:co2_t_yr"]
HOST_METHODS = sorted(n for n, m in REGISTRY.items() if not m.runs_model and n != "auto")


def _inputs(seed: int = 0, block: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Totals ``[1, 1, 2, 4, 6]`` (zeros, a NaN, a huge total) and layers ``[L, 1, 1, 2, 20, 30]``."""
    g = torch.Generator().manual_seed(seed)
    totals = torch.rand(1, 1, 2, 4, 6, generator=g, dtype=torch.float64) * 100
    totals[0, 0, 0, 0, :2] = 0.0
    totals[0, 0, 1, 3, 5] = float("nan")
    totals[0, 0, 1, 2, 2] = 1e7
    layers = torch.rand(len(LAYERS), 1, 1, 2, 4 * block, 6 * block, generator=g, dtype=torch.float64) * 10
    layers[:, ..., :block, :block] = 0.0  # a block where every layer is 0 (uniform fallback)
    layers[-1] = 0.0
    layers[-1, ..., 3, 4] = 500.0  # one listed plant; its block total is smaller than its attribute
    layers[-1, ..., 12, 17] = 2.0
    return totals, layers


def test_registry_has_the_documented_methods() -> None:
    assert {"uniform", "dasymetric", "points", "fitted", "model", "auto"} <= set(REGISTRY)
    assert all(m.summary and m.name == n for n, m in REGISTRY.items())


@pytest.mark.parametrize("name", HOST_METHODS)
def test_every_host_method_keeps_the_physics_contract(name: str) -> None:
    method = REGISTRY[name]
    totals, layers = _inputs()
    block = 5
    specs = method.variants(LAYERS, POINTS)
    assert specs, f"{name} has no variant to validate"
    for spec in specs:
        idx = [LAYERS.index(n) for n in method.layers(spec, LAYERS, POINTS)]
        kids = method.fill(totals, layers[idx] if idx else None, block)
        assert kids.dtype == torch.float64 and kids.shape == (1, 1, 2, 20, 30)
        nodata = torch.isnan(totals)
        sums = block_sum(torch.nan_to_num(kids, nan=0.0), block)
        k = kids.reshape(1, 1, 2, 4, block, 6, block)
        assert torch.isnan(k).all(dim=(4, 6)).eq(nodata).all(), spec.label
        valid = kids[~torch.isnan(kids)]
        assert (valid >= 0).all() and torch.isfinite(valid).all(), spec.label
        torch.testing.assert_close(sums[~nodata], totals[~nodata], rtol=1e-12, atol=0.0, msg=spec.label)


def test_points_first_places_listed_mass_then_the_surface() -> None:
    method = REGISTRY["points"]
    spec = method.resolve(MethodSpec("points", "pop"), LAYERS, POINTS)
    idx = [LAYERS.index(n) for n in method.layers(spec, LAYERS, POINTS)]
    assert [LAYERS[i] for i in idx] == ["pop", "plants:co2_t_yr"]
    totals, layers = _inputs()
    kids = method.fill(totals, layers[idx], 5)
    s = float(totals[0, 0, 0, 0, 0])  # block (0, 0): total 0 -> nothing placed
    assert s == 0.0 and float(kids[0, 0, 0, 3, 4]) == 0.0
    big = float(totals[0, 0, 0, 2, 3])  # block holding the 2.0 plant at child (12, 17)
    assert float(kids[0, 0, 0, 12, 17]) >= min(2.0, big) - 1e-9


def test_parse_method_rules() -> None:
    assert parse_method(None, "x.pth") == MethodSpec("model")
    assert parse_method("dasymetric:pop", None).layer == "pop"
    assert parse_method("auto", "x.pth").kind == "auto"
    for bad, ckpt in (("bogus", None), ("uniform:pop", None), ("model", None), ("fitted", None), ("uniform", "x.pth"), (None, None)):
        with pytest.raises(UsageError):
            parse_method(bad, ckpt)


def test_match_layer_accepts_an_unambiguous_prefix() -> None:
    assert match_layer("roads", LAYERS) == "roads:length"  # the family total
    assert match_layer("pop", LAYERS) == "pop"
    assert match_layer("plants", LAYERS) == "plants:co2_t_yr"
    with pytest.raises(UsageError, match="not among"):
        match_layer("ndvi", LAYERS)


def test_dasymetric_resolve_names_the_layer_used() -> None:
    spec = REGISTRY["dasymetric"].resolve(MethodSpec("dasymetric"), LAYERS, POINTS)
    assert spec.label == "dasymetric:lights"
    with pytest.raises(UsageError, match="point layer"):
        REGISTRY["points"].resolve(MethodSpec("points"), ["a", "b"], [])
