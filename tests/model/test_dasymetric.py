"""Tests for models.dasymetric: the prior, its fit, softmax allocation, and the dasymetric network."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.config import preset
from models.dasymetric import DasymetricPrior, PriorBasis, fit_prior, nnls, share_blocks_of, softmax_children
from models.network import DSTCarbonFormer
from models.physics import block_sum


def test_nnls_matches_scipy() -> None:
    scipy_optimize = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(0)
    for _ in range(5):
        a = rng.normal(size=(60, 7))
        b = rng.normal(size=60)
        ref, _ = scipy_optimize.nnls(a, b)
        np.testing.assert_allclose(nnls(a, b), ref, atol=1e-8)


def test_basis_inverts_the_normaliser() -> None:
    from carbonsr_cli.stats import AuxNormalizer

    norm = AuxNormalizer(("roads", "ndvi"), (True, False), (1.0, 0.4), (1.5, 0.2), (0.0, -0.2), (6.0, 0.9))
    raw = np.stack([np.linspace(0, 300, 40), np.linspace(-0.2, 0.9, 40)]).reshape(2, 1, 5, 8).astype(np.float32)
    basis = PriorBasis(2, (1.0,), (1,))
    basis.set_normalisation(norm.log1p, norm.mean, norm.std, norm.clip_lo)
    u = basis.raw(torch.from_numpy(norm.apply(raw))[None])[0].numpy()
    np.testing.assert_allclose(u[0], np.minimum(raw[0], np.expm1(6.0)), rtol=1e-4, atol=1e-3)  # clipped at clip_hi
    np.testing.assert_allclose(u[1], raw[1] + 0.2, atol=1e-5)


def test_basis_smoothing_and_powers() -> None:
    x = torch.zeros(1, 1, 1, 5, 5)
    x[..., 2, 2] = 9.0
    phi = PriorBasis(1, (1.0, 2.0), (1, 3))(x)  # u = max(x, 0) before normalisation is set
    assert phi.shape == (1, 4, 1, 5, 5)
    assert float(phi[0, 0, 0, 2, 2]) == 9.0 and float(phi[0, 1, 0, 2, 2]) == 81.0
    assert float(phi[0, 2, 0, 1, 1]) == pytest.approx(1.0) and float(phi[0, 2, 0, 0, 0]) == 0.0
    assert float(phi[0, 3, 0, 1, 3]) == pytest.approx(1.0)  # (3x3 mean)^2


def test_softmax_children_conserve_and_propagate_nodata() -> None:
    g = torch.Generator().manual_seed(1)
    lw = torch.randn(2, 1, 1, 20, 20, generator=g, requires_grad=True)
    totals = torch.rand(2, 1, 1, 4, 4, generator=g, dtype=torch.float64) * 50
    totals[0, 0, 0, 1, 1] = float("nan")
    totals[1, 0, 0, 2, 3] = 0.0
    kids = softmax_children(lw, totals, 5)
    ok = ~torch.isnan(totals)
    torch.testing.assert_close(block_sum(torch.nan_to_num(kids), 5)[ok], totals[ok], rtol=1e-12, atol=1e-12)
    assert torch.isnan(kids[0, 0, 0, 5:10, 5:10]).all() and (kids[~torch.isnan(kids)] >= 0).all()
    torch.nan_to_num(kids).sum().backward()
    assert lw.grad is not None and torch.isfinite(lw.grad).all()


def test_fit_prior_recovers_an_additive_mix() -> None:
    """Children = 3 * road + 0.5 * pop (+ nothing from the third layer); fitted on parent sums only."""
    rng = np.random.default_rng(3)
    f, h, w = 5, 24, 24
    layers = rng.gamma(0.6, 2.0, (3, h * f, w * f)) * (rng.random((3, h * f, w * f)) < 0.4)
    prior = DasymetricPrior(3, (1.0,), (1,))
    x = torch.from_numpy(layers[None, :, None]).float()
    truth = 3.0 * layers[0] + 0.5 * layers[1]
    totals = truth.reshape(h, f, w, f).sum(axis=(1, 3))
    phi = block_sum(prior.basis(x).double(), f)[0, :, 0].numpy()  # [K, h, w]
    n = np.full((h, w), float(f * f))
    groups = share_blocks_of(phi, n, totals, np.ones((h, w), bool))
    coef, floor = fit_prior(phi.reshape(3, -1).T, n.ravel(), totals.ravel(), share_blocks=groups)
    assert coef[0] / coef[1] == pytest.approx(6.0, rel=0.05)
    assert coef[2] < 0.02 * coef[0] and floor < 0.05 * coef[0]
    prior.set_coefficients(coef, floor)
    with torch.no_grad():
        kids = softmax_children(prior(x), torch.from_numpy(totals)[None, None, None], f)[0, 0, 0].numpy()
    assert np.abs(kids - truth).mean() < 0.02 * truth.mean()


def test_dasymetric_network_starts_at_its_prior_and_trains() -> None:
    torch.manual_seed(0)
    net = DSTCarbonFormer(preset("tiny", 3, point_sites=False))  # sites: tests/model/test_point_sites.py
    assert net.dasymetric and net.prior is not None and net.pointwise is not None
    net.prior.set_coefficients(np.array([1.0] + [0.0] * (net.prior.basis.size - 1)), 0.1)
    aux = torch.randn(2, 3, 1, 40, 40)
    main = torch.rand(2, 1, 1, 40, 40)
    totals = torch.rand(2, 1, 1, 4, 4, dtype=torch.float64) * 10
    raw, con = net(aux, main, totals, 10)
    torch.testing.assert_close(raw, net.prior(aux))  # the head starts at 0
    torch.testing.assert_close(block_sum(torch.expm1(con), 10), totals, rtol=1e-10, atol=1e-10)
    loss = (torch.expm1(con) * torch.rand_like(con)).sum()
    loss.backward()
    for name in ("prior.log_coef", "pointwise.out.weight"):
        g = dict(net.named_parameters())[name].grad
        assert g is not None and float(g.abs().sum()) > 0, name


@pytest.mark.parametrize("switch", ["use_prior", "use_pointwise", "use_context"])
def test_dasymetric_ablations_build_and_run(switch: str) -> None:
    net = DSTCarbonFormer(preset("tiny", 2, **{switch: False})).eval()
    raw, con = net(torch.randn(1, 2, 1, 30, 30), torch.rand(1, 1, 1, 30, 30), torch.ones(1, 1, 1, 3, 3, dtype=torch.float64), 10)
    assert raw.shape == (1, 1, 1, 30, 30) and torch.isfinite(raw).all()
    torch.testing.assert_close(block_sum(torch.expm1(con), 10), torch.ones(1, 1, 1, 3, 3, dtype=torch.float64))
    if switch == "use_context":
        assert not hasattr(net, "enc_blocks")  # no U-Net built


def test_prior_computes_only_active_basis_functions_and_matches_the_full_sum() -> None:
    prior = DasymetricPrior(4)
    coef = np.zeros(prior.basis.size)
    coef[[0, 4, 7, 20]] = [1.0, 2.0, 0.5, 3.0]
    prior.set_coefficients(coef, 0.1)
    assert bool(prior.active.all())  # every basis function counts by default
    prior.set_active(coef > 0)
    x = torch.randn(2, 4, 1, 20, 20)
    with torch.no_grad():
        full = (prior.basis(x) * torch.from_numpy(coef).float().view(1, -1, 1, 1, 1)).sum(1, keepdim=True) + 0.1
        torch.testing.assert_close(prior.weights(x), full, rtol=1e-5, atol=1e-5)
        again = DasymetricPrior(4)
        again.weights(x)  # a plan for "all active" is cached, then replaced by loading
        again.load_state_dict(prior.state_dict())  # the active set travels with the checkpoint
        torch.testing.assert_close(again.weights(x), prior.weights(x), rtol=0, atol=0)
    with torch.inference_mode():  # an inference-mode deep copy (the bf16 path on CUDA) still works
        import copy

        torch.testing.assert_close(copy.deepcopy(prior).weights(x), prior.weights(x))
