"""Objectives: the abstract contract and the built-in objectives (Web-MAE, Web-DINO; CLIP follows)."""

from lit_webssl.objectives.base import Objective, ObjectiveOutput, ViewSpec
from lit_webssl.objectives.dino import DINOv2
from lit_webssl.objectives.mae import MAE

__all__ = ["DINOv2", "MAE", "Objective", "ObjectiveOutput", "ViewSpec"]
