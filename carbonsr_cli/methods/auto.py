"""``auto``: the model, unless its run validated it worse than uniform (recorded at training;
:func:`carbonsr_cli.train.validation.selection`)."""

from __future__ import annotations

from typing import Any

from carbonsr_cli.errors import CheckpointError
from carbonsr_cli.methods.base import Method, MethodSpec, register


@register
class Auto(Method):
    """Resolved before running: :func:`choose` reads the run's ``selection`` record."""

    name = "auto"
    summary = "the model, unless its run validated it worse than uniform at 1 km (--model CKPT)"
    needs_checkpoint = True
    needs_aux = True


def choose(checkpoint: dict[str, Any]) -> tuple[MethodSpec, str]:
    """The method the run's validation chose, and why (one sentence).

    Raises:
        CheckpointError: the checkpoint has no selection record (trained before it existed).
    """
    sel = checkpoint.get("selection")
    if not sel or "method" not in sel:
        raise CheckpointError("the checkpoint has no validation record for --method auto; use --method model")
    kind, _, layer = str(sel["method"]).partition(":")
    return MethodSpec(kind, layer or None), str(sel.get("reason", ""))
