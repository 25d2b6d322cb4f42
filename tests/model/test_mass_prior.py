"""The mass prior (disaggregation regression): fit on block totals, placement inside blocks, physics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.config import ModelConfig
from models.dasymetric import softmax_children
from models.mass_prior import MassPrior, block_samples, fit_mass_prior
from models.network import DSTCarbonFormer

F = 10


def _region(seed: int, h: int = 16, w: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Raw layers ``[3, H, W]`` (roads, forest mask, listed plant t/yr) and the true mass ``[H, W]``.

    Truth = roads x (1 - forest) x 3 + plant mass: a product no additive mix of layers can express.
    """
    rng = np.random.default_rng(seed)
    hc, wc = h * F, w * F
    roads = rng.lognormal(0.0, 1.0, (hc, wc)) * (rng.random((hc, wc)) < 0.4)
    forest = (rng.random((h, w)) < 0.5).repeat(F, 0).repeat(F, 1) * (rng.random((hc, wc)) < 0.8)
    plants = np.zeros((hc, wc))
    idx = rng.choice(hc * wc, 12, replace=False)
    plants.flat[idx] = rng.lognormal(5.0, 0.5, 12)
    truth = 3.0 * roads * (1.0 - forest) + plants
    return np.stack([roads, forest.astype(float), plants]).astype(np.float32), truth


def _prior(channels: int = 3) -> MassPrior:
    """Mass prior whose mix is ``3 * roads + plants`` (blind to the forest): raw inputs (identity normaliser)."""
    prior = MassPrior(channels, hidden=16, smooth=(1,), exponents=(1.0,), mix_smooth=(1,))
    prior.mix.basis.set_normalisation([False] * channels, [0.0] * channels, [1.0] * channels, [0.0] * channels, [1.0] * channels)
    prior.mix.set_coefficients([3.0, 0.0, 1.0], 1e-3)
    return prior


def _fit(prior: MassPrior, layers: np.ndarray, truth: np.ndarray, steps: int = 300) -> float:
    x = torch.from_numpy(layers)[None, :, None]
    with torch.no_grad():
        feats = block_samples(prior.raw_features(x)[0, :, 0].numpy(), F).reshape(-1, F * F, prior.features_size)
        mix = block_samples(prior.mix(x)[0, :, 0].double().numpy(), F).reshape(-1, F * F)
    totals = truth.reshape(truth.shape[0] // F, F, truth.shape[1] // F, F).sum((1, 3)).reshape(-1)
    keep = totals > 0
    return fit_mass_prior(prior, torch.from_numpy(feats[keep]), torch.from_numpy(mix[keep]), torch.from_numpy(totals[keep]), steps=steps)


def _children(log_w: torch.Tensor, truth: np.ndarray) -> np.ndarray:
    totals = torch.from_numpy(truth.reshape(truth.shape[0] // F, F, truth.shape[1] // F, F).sum((1, 3)))
    return softmax_children(log_w.double(), totals, F).numpy()


def test_fit_learns_the_product_the_mix_cannot_express() -> None:
    layers, truth = _region(1)
    prior = _prior()
    x2 = torch.from_numpy(_region(2)[0])[None, :, None]
    with torch.no_grad():
        before = prior(x2)[0, 0, 0]
    loss = _fit(prior, layers, truth)
    assert np.isfinite(loss)
    # Held-out region (another draw): placement inside blocks, against the mix it started from.
    layers2, truth2 = _region(2)
    with torch.no_grad():
        log_w = prior(torch.from_numpy(layers2)[None, :, None])[0, 0, 0]
    kids = _children(log_w, truth2)
    mix_kids = _children(before, truth2)
    nz = truth2 > 0
    err = np.abs(kids - truth2)[nz].mean()
    err_mix = np.abs(mix_kids - truth2)[nz].mean()
    assert err < 0.5 * err_mix, (err, err_mix)
    # exact conservation and non-negativity of the allocation
    assert (kids >= 0).all() and np.isfinite(kids).all()
    sums = kids.reshape(16, F, 16, F).sum((1, 3))
    np.testing.assert_allclose(sums, truth2.reshape(16, F, 16, F).sum((1, 3)), rtol=1e-9)


def test_untrained_correction_is_zero_so_the_prior_is_the_mix() -> None:
    prior = _prior()
    x = torch.from_numpy(_region(4, 2, 2)[0])[None, :, None]
    with torch.no_grad():
        torch.testing.assert_close(prior(x), prior.mix(x))


def test_log_weights_are_finite_for_extreme_inputs() -> None:
    prior = _prior()
    x = torch.tensor([0.0, 1e6, -5.0]).view(1, 3, 1, 1, 1).expand(1, 3, 1, 4, 4).contiguous()
    out = prior(x)
    assert out.shape == (1, 1, 1, 4, 4)
    assert torch.isfinite(out).all()


def test_network_with_mass_prior_starts_at_it_and_conserves() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(aux_channels=3, allocation="dasymetric", prior_kind="mass", use_context=False, prior_smooth=(1,), prior_exponents=(1.0,))
    net = DSTCarbonFormer(cfg).eval()
    assert isinstance(net.prior, MassPrior)
    layers, truth = _region(3, 4, 4)
    prior = _prior()
    _fit(prior, layers, truth)
    net.prior.load_state_dict(prior.state_dict())
    x = torch.from_numpy(layers)[None, :, None]
    totals = torch.from_numpy(truth.reshape(4, F, 4, F).sum((1, 3)))[None, None, None].float()
    main = torch.log1p(totals / F**2).repeat_interleave(F, -2).repeat_interleave(F, -1)
    with torch.no_grad():
        raw, _ = net(x, main)
        np.testing.assert_allclose(raw.numpy(), prior(x).numpy(), rtol=1e-5, atol=1e-5)  # head starts at 0
        kids = softmax_children(raw.double(), totals.double(), F)
    assert (kids >= 0).all() and torch.isfinite(kids).all()
    torch.testing.assert_close(kids.reshape(4, F, 4, F).sum((1, 3)), totals.double()[0, 0, 0], rtol=1e-9, atol=1e-9)


def test_config_rejects_an_unknown_prior_kind() -> None:
    with pytest.raises(ValueError, match="prior_kind"):
        ModelConfig(aux_channels=3, allocation="dasymetric", prior_kind="forest")


def test_fit_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="bad shapes"):
        fit_mass_prior(_prior(), torch.zeros(4, 100, 3), torch.zeros(4, 99), torch.ones(4))


def test_members_are_fitted_apart_and_averaged() -> None:
    """``members=3``: the stored MLP (block-diagonal middle layer) gives the mean of the three
    members' corrections, each fitted on its own; member 0 is the single fit of the same seed."""
    layers, truth = _region(1)
    x = torch.from_numpy(layers)[None, :, None]
    single, three = _prior(), MassPrior(3, hidden=16, smooth=(1,), exponents=(1.0,), mix_smooth=(1,), members=3)
    three.mix.load_state_dict(single.mix.state_dict())
    _fit(single, layers, truth, steps=60)
    _fit(three, layers, truth, steps=60)
    assert three.mlp[0].out_features == 48
    off = three.mlp[2].weight.detach().clone()
    for k in range(3):
        off[16 * k : 16 * (k + 1), 16 * k : 16 * (k + 1)] = 0
    assert torch.count_nonzero(off) == 0  # members do not see each other's hidden units
    with torch.no_grad():  # each member from the stored MLP: its rows, its block, its last weights
        feats = three.raw_features(x).movedim(1, -1)
        h1 = torch.nn.functional.gelu(three.mlp[0]((feats - three.feat_mean) / three.feat_std))
        h2 = torch.nn.functional.gelu(three.mlp[2](h1))
        w = three.mlp[-1].weight[0] * 3  # the stored last layer holds the members' mean
        parts = [h2[..., 16 * k : 16 * (k + 1)] @ w[16 * k : 16 * (k + 1)] for k in range(3)]
        assert torch.allclose(three.correction(feats), (sum(parts) / 3 + three.mlp[-1].bias).clamp(-30, 30), atol=1e-5)
        # member 0 starts from the single fit's weights and sees the same data: the same field up
        # to its own bias (the stored bias is the members' mean)
        one = single.correction(feats).flatten()
        assert torch.corrcoef(torch.stack([one, parts[0].flatten()]))[0, 1] > 0.99
        assert torch.corrcoef(torch.stack([parts[0].flatten(), parts[1].flatten()]))[0, 1] < 0.99  # other weights, another member


def test_a_regional_trend_keeps_the_correction_off_a_layer_that_only_follows_it() -> None:
    """Totals that rise from south to north by a smooth factor the layers do not show, and a
    layer whose block means follow that rise but whose values inside a block say nothing: without
    the trend the correction leans on that layer and moves mass inside the blocks; with the
    fitted-then-dropped trend (``trend=1``) it stays near the mix, which places mass exactly here."""
    rng = np.random.default_rng(7)
    h = w = 16
    hc, wc = h * F, w * F
    roads = rng.lognormal(0.0, 1.0, (hc, wc)) * (rng.random((hc, wc)) < 0.6)
    rows = np.linspace(-1.0, 1.0, h).repeat(F)[:, None] * np.ones((1, wc))
    factor = np.exp(1.2 * rows)  # constant inside each block
    decoy = rng.random((hc, wc)) * factor
    truth = 3.0 * roads * factor
    layers = np.stack([roads, decoy, np.zeros_like(roads)]).astype(np.float32)
    x = torch.from_numpy(layers)[None, :, None]
    totals = truth.reshape(h, F, w, F).sum((1, 3))
    keep = totals.reshape(-1) > 0
    coords = torch.from_numpy(np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), -1).reshape(-1, 2)[keep].astype(np.float64))
    errors = {}
    for trend in (0, 1):
        prior = _prior()
        with torch.no_grad():
            feats = block_samples(prior.raw_features(x)[0, :, 0].numpy(), F).reshape(-1, F * F, prior.features_size)
            mix = block_samples(prior.mix(x)[0, :, 0].double().numpy(), F).reshape(-1, F * F)
        loss = fit_mass_prior(prior, torch.from_numpy(feats[keep]), torch.from_numpy(mix[keep]), torch.from_numpy(totals.reshape(-1)[keep]),
                              steps=300, coords=coords, trend=trend)
        assert np.isfinite(loss)
        assert set(prior.state_dict()) == set(_prior().state_dict())  # the trend is not stored
        with torch.no_grad():
            kids = _children(prior(x)[0, 0, 0], truth)
        errors[trend] = float(np.abs(kids - truth)[truth > 0].mean())
    assert errors[1] < 0.5 * errors[0], errors
    with pytest.raises(ValueError, match="coordinates"):
        fit_mass_prior(_prior(), torch.zeros(2, F * F, 3), torch.zeros(2, F * F, dtype=torch.float64), torch.ones(2, dtype=torch.float64),
                       steps=1, trend=1)
