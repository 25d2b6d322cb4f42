"""Tests for models.config: presets, JSON round trip, validation."""

from __future__ import annotations

import json

import pytest

from models.config import PRESETS, ModelConfig, preset
from models.network import DSTCarbonFormer, count_parameters


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_round_trip_through_json(name: str) -> None:
    cfg = preset(name, aux_channels=7, dropout=0.1, use_moe=False)
    data = json.loads(json.dumps(cfg.to_dict()))
    back = ModelConfig.from_dict(data)
    assert back == cfg
    assert back.widths == cfg.widths and isinstance(back.widths, tuple)
    assert back.aux_channels == 7 and back.dropout == 0.1 and back.use_moe is False


def test_unknown_key_rejected_with_name() -> None:
    data = preset("tiny", 3).to_dict()
    data["n_expert"] = 4
    with pytest.raises(ValueError, match="n_expert"):
        ModelConfig.from_dict(data)


def test_missing_aux_channels_rejected() -> None:
    data = preset("tiny", 3).to_dict()
    del data["aux_channels"]
    with pytest.raises(ValueError, match="aux_channels"):
        ModelConfig.from_dict(data)


@pytest.mark.parametrize(
    ("field", "value"),
    [("top_k", 5), ("attn_heads", 3), ("depths", (1, 1)), ("temporal_kernel", 2), ("dropout", 1.0), ("mass_smooth", (2,)),
     ("mass_smooth", ())],
)
def test_invalid_values_rejected(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        preset("tiny", 3, **{field: value})


def test_zero_aux_channels_rejected() -> None:
    with pytest.raises(ValueError, match="aux_channels"):
        preset("tiny", 0)


def test_unknown_preset() -> None:
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("huge", 3)


def test_widths_derived_from_base_width() -> None:
    cfg = ModelConfig(aux_channels=2, base_width=8)
    assert cfg.widths == (8, 16, 24, 32)
    assert cfg.downsample_factor == 8


def test_preset_sizes() -> None:
    """tiny ~50-150 k parameters, base ~1-3 M, large bigger than base."""
    sizes = {name: count_parameters(DSTCarbonFormer(preset(name, 6))) for name in ("tiny", "base", "large")}
    assert 50_000 <= sizes["tiny"] <= 150_000, sizes
    assert 1_000_000 <= sizes["base"] <= 3_000_000, sizes
    assert sizes["large"] > 2 * sizes["base"], sizes
