"""Objectives: the abstract contract and the built-in objectives (Web-MAE, Web-DINO and the CLIP baseline)."""

from lit_webssl.objectives.base import Objective, ObjectiveOutput, StepContext, ViewSpec
from lit_webssl.objectives.clip import CLIP
from lit_webssl.objectives.dino import DINOv2
from lit_webssl.objectives.mae import MAE

__all__ = ["CLIP", "DINOv2", "MAE", "Objective", "ObjectiveOutput", "StepContext", "ViewSpec"]
