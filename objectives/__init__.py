"""Objectives: the abstract contract and the built-in objectives (Web-MAE; Web-DINO and CLIP follow)."""

from lit_webssl.objectives.base import Objective, ObjectiveOutput, ViewSpec
from lit_webssl.objectives.mae import MAE

__all__ = ["MAE", "Objective", "ObjectiveOutput", "ViewSpec"]
