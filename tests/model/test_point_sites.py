"""Point sites: listed points spread over their sites, the block surplus placed there, physics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.config import ModelConfig, preset
from models.dasymetric import DasymetricPrior, softmax_children
from models.network import DSTCarbonFormer
from models.point_sites import PointSites, listed_mass, site_signature

F = 10
#: Channels of the synthetic rasters: 0 = listed mass (t CO2 / yr), 1 = built-up, 2 = noise.
C = 3


def _surface(floor: float = 1.0) -> DasymetricPrior:
    """A surface prior of ``floor`` t per child cell (raw = normalised input: identity normaliser)."""
    prior = DasymetricPrior(C, exponents=(1.0,), smooth=(1,))
    prior.basis.set_normalisation([False] * C, [0.0] * C, [1.0] * C, [0.0] * C, [1.0] * C)
    prior.set_coefficients(np.zeros(C), floor)
    prior.set_active(np.array([False, True, True]))
    return prior


def _sites(delta: float = 0.5, point_weight: float = 1.0) -> PointSites:
    sites = PointSites(C, _surface(), window=3, delta=delta, point_weight=point_weight)
    sites.set_sites([0], [0.0, 1.0, 0.0])
    return sites


def _layers(h: int = 20, w: int = 20) -> torch.Tensor:
    """``[1, C, 1, H, W]``: a 90 t point at (3, 4) whose site is (3, 4), (3, 5), (4, 4); a 50 t
    point at (4, 10), on the edge of block (0, 1), built-up also at (4, 9) (block (0, 0))."""
    x = torch.zeros((1, C, 1, h, w))
    x[0, 0, 0, 3, 4] = 90.0
    x[0, 1, 0, 3, 4] = x[0, 1, 0, 3, 5] = x[0, 1, 0, 4, 4] = 1.0
    x[0, 0, 0, 4, 10] = 50.0
    x[0, 1, 0, 4, 9] = x[0, 1, 0, 4, 10] = 1.0
    x[0, 2] = torch.rand((1, h, w), generator=torch.Generator().manual_seed(0)) * 0.1  # unweighted noise
    return x


def test_spread_shares_each_point_among_similar_cells_of_its_block() -> None:
    spread = _sites().spread(_layers(), F)[0, 0, 0]
    for r, c in [(3, 4), (3, 5), (4, 4)]:
        assert spread[r, c].item() == pytest.approx(30.0)
    assert spread[4, 10].item() == pytest.approx(50.0)  # (4, 9) is alike but in another block
    assert spread[4, 9].item() == 0.0
    assert spread.sum().item() == pytest.approx(140.0)
    assert int((spread > 0).sum()) == 4


def test_the_point_cell_weighs_point_weight_against_one_for_each_other_site_cell() -> None:
    spread = _sites(point_weight=2.0).spread(_layers(), F)[0, 0, 0]
    assert spread[3, 4].item() == pytest.approx(45.0)  # 90 t over weights 2 + 1 + 1
    assert spread[3, 5].item() == pytest.approx(22.5)
    assert spread[4, 4].item() == pytest.approx(22.5)
    assert spread[4, 10].item() == pytest.approx(50.0)  # a site of one cell keeps all its mass
    assert spread.sum().item() == pytest.approx(140.0)
    with pytest.raises(ValueError, match="point_weight"):
        PointSites(C, _surface(), point_weight=0.5)


def test_surplus_over_the_surface_goes_to_the_sites_and_blocks_conserve() -> None:
    sites = _sites()
    x = _layers()
    totals = torch.tensor([[1100.0, 100.0], [250.0, 80.0]], dtype=torch.float64)[None, None, None]  # [1, 1, 1, 2, 2]
    main = torch.log1p(totals / (F * F)).repeat_interleave(F, -2).repeat_interleave(F, -1).float()
    log_w = torch.zeros((1, 1, 1, 20, 20))  # the network: uniform shares of the rest
    children = softmax_children(sites(log_w, x, main, F), totals, F)[0, 0, 0]
    blocks = children.reshape(2, F, 2, F).sum(dim=(1, 3))
    assert torch.allclose(blocks, totals[0, 0, 0], rtol=1e-12)
    assert bool((children >= 0).all())
    # block (0, 0): surface 100 t, total 1100 t -> 1000 t on the 3 site cells, 1 t on every cell
    assert children[3, 4].item() == pytest.approx(1000.0 / 3 + 1.0, rel=1e-5)
    assert children[0, 0].item() == pytest.approx(1.0, rel=1e-5)
    # block (0, 1): the 50 t point but total = surface (100 t): no surplus, uniform shares
    assert children[4, 10].item() == pytest.approx(1.0, rel=1e-5)
    assert children[4, 11].item() == pytest.approx(1.0, rel=1e-5)
    # blocks without a point keep the network's shares
    assert torch.allclose(children[10:, :10], torch.full((10, 10), 2.5, dtype=torch.float64))


def test_unlisted_sources_take_the_excess_of_blocks_far_above_the_surface() -> None:
    """Block (1, 0): no listed point, 1000 t against a 100 t surface (> 2 x, and 10 x its second
    most raised neighbour: a lone spike): the 900 t excess goes to its two cells that look like a
    listed point's cell. Block (1, 1): 80 t, below 2 x the surface: the network's shares, though
    it holds such a cell. Listed blocks as without it."""
    sites = _sites()
    sites.set_unlisted([0.0, 1.0, 0.0], ratio=2.0)
    x = _layers()
    x[0, 1, 0, 12, 3] = x[0, 1, 0, 15, 6] = x[0, 1, 0, 14, 14] = 1.0
    totals = torch.tensor([[1100.0, 100.0], [1000.0, 80.0]], dtype=torch.float64)[None, None, None]
    main = torch.log1p(totals / (F * F)).repeat_interleave(F, -2).repeat_interleave(F, -1).float()
    log_w = torch.zeros((1, 1, 1, 20, 20))
    children = softmax_children(sites(log_w, x, main, F), totals, F)[0, 0, 0]
    torch.testing.assert_close(children.reshape(2, F, 2, F).sum(dim=(1, 3)), totals[0, 0, 0], rtol=1e-12, atol=0.0)
    assert children[12, 3].item() == pytest.approx(451.0, rel=1e-5)
    assert children[15, 6].item() == pytest.approx(451.0, rel=1e-5)
    assert children[11, 1].item() == pytest.approx(1.0, rel=1e-5)
    assert torch.allclose(children[10:, 10:], torch.full((10, 10), 0.8, dtype=torch.float64))
    assert children[3, 4].item() == pytest.approx(1000.0 / 3 + 1.0, rel=1e-5)
    # ratio 0 turns it off; a state dict from before the feature loads with it off
    state = {k: v for k, v in sites.state_dict().items() if k not in ("profile", "unlisted_ratio")}
    fresh = _sites()
    fresh.set_unlisted([0.0, 1.0, 0.0], ratio=3.0)
    fresh.load_state_dict(state)
    assert float(fresh.unlisted_ratio) == 0.0
    plain = softmax_children(fresh(log_w, x, main, F), totals, F)[0, 0, 0]
    assert plain[12, 3].item() == pytest.approx(10.0, rel=1e-5)


def test_unlisted_excess_needs_a_compact_site_unless_the_block_is_far_above_the_threshold() -> None:
    """Twelve look-alike cells (more than a 3 x 3 site) in a block: 5 x the surface (above the
    threshold 2) moves nothing; 25 x (above UNLISTED_CERTAIN * 2 = 20) moves the excess there."""
    from models.point_sites import UNLISTED_CERTAIN

    assert UNLISTED_CERTAIN == 10.0
    sites = _sites()
    sites.set_unlisted([0.0, 1.0, 0.0], ratio=2.0)
    x = _layers()
    x[0, 1, 0, 10:13, 0:4] = 1.0  # 12 cells of block (1, 0)
    log_w = torch.zeros((1, 1, 1, 20, 20))
    for total, expect in [(500.0, 5.0), (2500.0, 1.0 + 2400.0 / 12)]:
        totals = torch.tensor([[1100.0, 100.0], [total, 80.0]], dtype=torch.float64)[None, None, None]
        main = torch.log1p(totals / (F * F)).repeat_interleave(F, -2).repeat_interleave(F, -1).float()
        children = softmax_children(sites(log_w, x, main, F), totals, F)[0, 0, 0]
        assert children[11, 2].item() == pytest.approx(expect, rel=1e-5), total
        assert children[10:, :10].sum().item() == pytest.approx(total, rel=1e-12)


def test_unlisted_excess_needs_a_lone_spike_not_a_line_of_raised_blocks() -> None:
    """3 x 3 blocks, the centre 1200 t against a 100 t surface with two look-alike cells. With its
    neighbours at the surface (100 t) it is a lone spike and its excess goes to those cells; with
    two neighbours at 400 t (a line the surface misses: 12 / 4 < UNLISTED_ISOLATION) nothing moves;
    one raised neighbour (two plants side by side) does not stop it."""
    from models.point_sites import UNLISTED_ISOLATION, second_neighbour

    assert UNLISTED_ISOLATION == 8.0
    sites = _sites()
    sites.set_unlisted([0.0, 1.0, 0.0], ratio=2.0)
    x = torch.zeros((1, C, 1, 30, 30))
    x[0, 1, 0, 13, 13] = x[0, 1, 0, 16, 16] = 1.0  # two look-alike cells in the centre block
    log_w = torch.zeros((1, 1, 1, 30, 30))
    cases = [({}, 1.0 + 1100.0 / 2), ({(0, 0): 400.0, (2, 2): 400.0}, 12.0), ({(0, 0): 400.0}, 1.0 + 1100.0 / 2)]
    for raised, expect in cases:
        totals = torch.full((3, 3), 100.0, dtype=torch.float64)
        totals[1, 1] = 1200.0
        for (r, c), v in raised.items():
            totals[r, c] = v
        totals = totals[None, None, None]
        main = torch.log1p(totals / (F * F)).repeat_interleave(F, -2).repeat_interleave(F, -1).float()
        children = softmax_children(sites(log_w, x, main, F), totals, F)[0, 0, 0]
        assert children[13, 13].item() == pytest.approx(expect, rel=1e-5), raised
        assert children[10:20, 10:20].sum().item() == pytest.approx(1200.0, rel=1e-12)
        assert bool((children >= 0).all())
    q = torch.tensor([[0.0, 1.0, 0.0], [5.0, 9.0, 2.0], [0.0, 3.0, 0.0]])
    assert second_neighbour(q)[1, 1].item() == 3.0  # the centre's neighbours: 5, 3, 2, 1, 0, ...
    assert second_neighbour(q)[0, 0].item() == 5.0  # beyond the edge counts as 0


def test_unlisted_ratio_sits_far_outside_the_blocks_spread() -> None:
    from carbonsr_cli.train.prior_fit import MIN_UNLISTED_RATIO, unlisted_ratio

    rng = np.random.default_rng(0)
    surface = rng.uniform(50, 500, 2000)
    totals = surface * np.exp(rng.normal(0.0, 0.5, 2000))
    totals[:3] *= 1000.0  # three unlisted plants do not move the threshold
    r = unlisted_ratio(totals, surface)
    assert np.exp(5 * 0.5 * 0.9) < r < np.exp(5 * 0.5 * 1.1)
    assert unlisted_ratio(surface * 1.01, surface) == MIN_UNLISTED_RATIO
    assert unlisted_ratio(totals[:10], surface[:10]) == 0.0  # too few blocks: off


def test_listed_mass_reads_a_float16_zero_as_zero() -> None:
    basis = DasymetricPrior(2, exponents=(1.0,), smooth=(1,)).basis
    basis.set_normalisation([True, False], [3.0, 0.5], [2.0, 1.0], [0.0, 0.0])
    raw = torch.tensor([0.0, 0.0, 1234.5, 0.0])
    z = ((torch.log1p(raw) - 3.0) / 2.0).half().float()  # what the training cache holds
    x = torch.stack([z, torch.zeros(4)])[None, :, None, None]  # [1, 2, 1, 1, 4]
    mass = listed_mass(basis, x, torch.tensor([1.0, 0.0]))[0, 0, 0, 0]
    assert mass[0].item() == 0.0 and mass[1].item() == 0.0 and mass[3].item() == 0.0
    assert mass[2].item() == pytest.approx(1234.5, rel=2e-3)


def test_site_signature_weights_local_contrast_against_its_usual_level() -> None:
    """Channel 1 stands out at the points (contrast 2 where cells usually differ by 0.5 from their
    neighbours), channel 2 is just as different at the points as anywhere (a street grid), channel
    3 is nearly constant everywhere: its denominator is floored at a tenth of the mean level."""
    sig = site_signature(np.array([9.0, 2.0, 1.0, 0.1]), np.array([3.0, 0.5, 1.0, 1e-9]), [0])
    assert sig[0] == 0.0
    assert sig.sum() == pytest.approx(1.0)
    assert sig[1] > sig[3] > sig[2]
    assert sig[3] / sig[1] == pytest.approx((0.1 / (1.5 / 3 / 10)) / (2.0 / 0.5))
    assert not site_signature(np.zeros(3), np.zeros(3), [0]).any()


def test_network_with_sites_conserves_and_trains_only_the_rest() -> None:
    cfg = preset("prior", aux_channels=C, prior_exponents=(1.0,), prior_smooth=(1,), site_delta=0.5)
    assert cfg.point_sites
    net = DSTCarbonFormer(cfg)
    assert net.sites is not None
    net.prior.load_state_dict(_surface().state_dict())
    net.sites.load_state_dict(_sites().state_dict())
    x = _layers()
    totals = torch.tensor([[1100.0, 100.0], [250.0, 80.0]], dtype=torch.float64)[None, None, None]
    main = torch.log1p(totals / (F * F)).repeat_interleave(F, -2).repeat_interleave(F, -1).float()
    log_w, _ = net(x, main, context_block=F)
    children = softmax_children(log_w, totals, F)
    assert torch.allclose(children[0, 0, 0].reshape(2, F, 2, F).sum(dim=(1, 3)), totals[0, 0, 0], rtol=1e-12)
    assert children[0, 0, 0, 3, 4].item() > 300.0
    children.sum().backward()
    assert net.prior.log_floor.grad is not None  # the surface prior still trains the rest
    assert all(p.grad is None for p in net.sites.parameters())  # the frozen copy does not
    fresh = DSTCarbonFormer(cfg)
    fresh.load_state_dict(net.state_dict())
    assert torch.equal(fresh(x, main, context_block=F)[0], log_w.detach())


def test_configs_without_the_field_have_no_sites() -> None:
    cfg = ModelConfig.from_dict({"aux_channels": C, "allocation": "dasymetric"})
    assert not cfg.point_sites
    assert DSTCarbonFormer(cfg).sites is None
    with pytest.raises(ValueError, match="site_window"):
        ModelConfig(aux_channels=C, site_window=2)


def test_sparse_and_dense_spread_agree() -> None:
    """The gather path (CPU) and the dense path (GPU, CUDA graphs) are
    the same rule: random points, several blocks, batches and years, points on block edges."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn((2, C, 2, 30, 40), generator=gen)
    x[:, 0] = 0.0
    pts = torch.rand((2, 2, 30, 40), generator=gen) < 0.03
    x[:, 0] = torch.where(pts, torch.rand((2, 2, 30, 40), generator=gen) * 100 + 1, torch.zeros(()))
    for weight in (1.0, 2.5):
        sites = PointSites(C, _surface(), window=3, delta=1.5, point_weight=weight)
        sites.set_sites([0], [0.0, 0.7, 0.3])
        m = sites.listed_mass(x)
        sparse, dense = sites._spread_sparse(x, m, F), sites._spread_dense(x, m, F)
        torch.testing.assert_close(sparse, dense, rtol=1e-6, atol=1e-4)
        torch.testing.assert_close(sparse.sum(), m.sum(), rtol=1e-6, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sites_on_the_gpu_match_the_cpu() -> None:
    """On a GPU the dense path runs (no host synchronisation); same weights as the CPU."""
    sites = _sites(point_weight=2.0)
    sites.set_unlisted([0.0, 1.0, 0.0], ratio=2.0)
    x = _layers()
    x[0, 1, 0, 12, 3] = x[0, 1, 0, 15, 6] = 1.0  # an unlisted source's cells in block (1, 0)
    totals = torch.tensor([[1100.0, 100.0], [250.0, 80.0]], dtype=torch.float64)[None, None, None]
    main = torch.log1p(totals / (F * F)).repeat_interleave(F, -2).repeat_interleave(F, -1).float()
    log_w = torch.zeros((1, 1, 1, 20, 20))
    cpu = softmax_children(sites(log_w, x, main, F), totals, F)
    gpu = softmax_children(sites.cuda()(log_w.cuda(), x.cuda(), main.cuda(), F), totals.cuda(), F).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-5, atol=1e-4)


def test_sites_without_point_channels_pass_the_log_weights_through(monkeypatch: pytest.MonkeyPatch) -> None:
    """No point channel and no unlisted sources: nothing can hold listed mass, so the module
    returns the network's log-weights as they are, without evaluating anything (also on a GPU,
    where the per-batch check of the listed mass is not made)."""
    sites = PointSites(C, _surface(), window=3, delta=0.5, point_weight=1.0)
    monkeypatch.setattr(sites, "listed_mass", lambda x: (_ for _ in ()).throw(AssertionError("evaluated")))
    log_w = torch.randn(1, 1, 1, 20, 20)
    main = torch.log1p(torch.full((1, 1, 1, 20, 20), 3.0))
    assert sites(log_w, _layers(), main, F) is log_w
