"""Loss modules, one per file; objectives compose and weight them."""

from lit_webssl.objectives.losses.clip_loss import CLIPLoss
from lit_webssl.objectives.losses.dino_clstoken_loss import DINOLoss
from lit_webssl.objectives.losses.ibot_patch_loss import iBOTPatchLoss
from lit_webssl.objectives.losses.koleo_loss import KoLeoLoss
from lit_webssl.objectives.losses.mae_loss import MAELoss, patchify

__all__ = ["CLIPLoss", "DINOLoss", "KoLeoLoss", "MAELoss", "iBOTPatchLoss", "patchify"]
