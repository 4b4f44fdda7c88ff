"""Loss modules, one per file; objectives compose and weight them."""

from lit_webssl.objectives.losses.mae_loss import MAELoss, patchify

__all__ = ["MAELoss", "patchify"]
