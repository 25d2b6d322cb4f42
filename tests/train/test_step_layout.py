"""What the CUDA training step changes around the model (issue 21): convolution weights stored
channels-last (their gradients then match DDP's buckets), checkpoints still contiguous, and the
ranks' stop agreement every few steps instead of every step."""

from __future__ import annotations

import torch

from carbonsr_cli.distributed import HALT_AGREE_EVERY, halt_agreement_due
from carbonsr_cli.train.step import contiguous_state, match_conv_layout
from models.config import preset as model_preset
from models.network import DSTCarbonFormer


def _model() -> DSTCarbonFormer:
    torch.manual_seed(0)
    return DSTCarbonFormer(model_preset("tiny", aux_channels=3, max_years=1))


def test_conv_weights_go_channels_last_with_the_same_values() -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params_before = list(model.parameters())
    n = match_conv_layout(model)
    conv = [p for p in model.parameters() if p.ndim in (4, 5)]
    assert n > 0 and n <= len(conv)
    assert all(p.is_contiguous(memory_format=torch.channels_last if p.ndim == 4 else torch.channels_last_3d) for p in conv)
    assert any(not p.is_contiguous() for p in conv)  # some weights really changed layout
    assert list(model.parameters()) == params_before  # same Parameter objects: the optimiser keeps them
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert match_conv_layout(model) == 0  # idempotent


def test_a_channels_first_model_is_left_alone() -> None:
    model = _model()
    model.channels_last = False
    assert match_conv_layout(model) == 0
    assert all(p.is_contiguous() for p in model.parameters())


def test_checkpoint_state_is_contiguous_and_loads_into_a_fresh_model() -> None:
    model = _model()
    match_conv_layout(model)
    state = contiguous_state(model)
    assert hasattr(state, "_metadata") and list(state) == list(model.state_dict())
    assert all(v.is_contiguous() for v in state.values())
    fresh = _model()
    for p in fresh.parameters():
        torch.nn.init.zeros_(p)
    fresh.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


def test_ranks_agree_on_stopping_every_few_steps_and_at_max_steps() -> None:
    due = [s for s in range(1, 3 * HALT_AGREE_EVERY + 1) if halt_agreement_due(s, None)]
    assert due == [HALT_AGREE_EVERY, 2 * HALT_AGREE_EVERY, 3 * HALT_AGREE_EVERY]
    assert not halt_agreement_due(7, "max_time") and not halt_agreement_due(7, "interrupted")
    assert halt_agreement_due(7, "max_steps")  # every rank reaches max_steps at the same step
    assert halt_agreement_due(7, "max_time", last_of_epoch=True)  # before the epoch's validation


def test_the_unet_replays_cuda_graphs_on_cuda_only(monkeypatch) -> None:  # noqa: ANN001
    from carbonsr_cli.train.step import compile_mode

    monkeypatch.delenv("CARBONSR_COMPILE_MODE", raising=False)
    assert compile_mode(torch.device("cuda", 0)) == "reduce-overhead"
    assert compile_mode(torch.device("cpu")) is None and compile_mode(None) is None
    monkeypatch.setenv("CARBONSR_COMPILE_MODE", "default")
    assert compile_mode(torch.device("cuda")) is None
    monkeypatch.setenv("CARBONSR_COMPILE_MODE", "max-autotune")
    assert compile_mode(torch.device("cpu")) == "max-autotune"


def test_gradients_come_in_the_weights_layout() -> None:
    """DDP copies every gradient whose strides differ from its weight's (its bucket view's):
    after the conversion a backward pass gives each gradient exactly its weight's strides
    (CPU here; before, the depthwise weights [C, 1, k, k] differed in their size-1 dimension)."""
    model = _model()
    match_conv_layout(model)
    aux, main = torch.rand(2, 3, 1, 24, 24), torch.rand(2, 1, 1, 24, 24)
    raw, _ = model(aux.contiguous(memory_format=torch.channels_last_3d), main)
    raw.float().sum().backward()
    bad = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.stride() != p.stride()]
    assert bad == []
