"""``model`` and ``fitted``: a checkpoint's network, or the fitted layer mix it started from."""

from __future__ import annotations

from typing import Any

from carbonsr_cli.methods.base import Method, register

__all__ = ["Fitted", "Model", "prior_only_model"]


@register
class Model(Method):
    """The trained network of ``--model CKPT``."""

    name = "model"
    summary = "the trained network (--model CKPT)"
    needs_checkpoint = True
    runs_model = True
    needs_aux = True


@register
class Fitted(Method):
    """The additive layer mix fitted on the training parent cells of ``--model CKPT``'s run
    (popRF-style fitted dasymetric); runs through the tile engine like the model."""

    name = "fitted"
    summary = "the layer mix fitted on the training run's parent cells (--model CKPT)"
    needs_checkpoint = True
    runs_model = True
    needs_aux = True


def prior_only_model(checkpoint: dict[str, Any], normalizer: Any) -> Any:
    """A network that outputs the fitted prior of ``checkpoint`` (no pointwise head, no context).

    Raises:
        CheckpointError: the checkpoint holds no fitted prior (written before it existed).
    """
    from carbonsr_cli.errors import CheckpointError
    from carbonsr_cli.train.prior_fit import PriorFit, build_fitted_prior
    from models.config import ModelConfig
    from models.network import DSTCarbonFormer

    if not checkpoint.get("prior_fit"):
        raise CheckpointError("the checkpoint holds no fitted layer mix (trained before carbonsr 0.3); retrain")
    fit = PriorFit.from_dict(checkpoint["prior_fit"])
    cfg = ModelConfig.from_dict(checkpoint["model_config"]).replace(
        allocation="dasymetric", use_prior=True, use_pointwise=False, use_context=False, prior_exponents=fit.exponents, prior_smooth=fit.smooth,
        prior_kind="mix", point_sites=False,
    )
    net = DSTCarbonFormer(cfg)
    net.prior.load_state_dict(build_fitted_prior(fit, normalizer).state_dict())
    return net.eval()
