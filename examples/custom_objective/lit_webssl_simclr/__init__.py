"""SimCLR for lit_webssl: an objective in its own package, selected with ``class_path: simclr``."""

from lit_webssl_simclr.ntxent_loss import NTXentLoss
from lit_webssl_simclr.simclr import ProjectionHead, SimCLR

__all__ = ["NTXentLoss", "ProjectionHead", "SimCLR"]
