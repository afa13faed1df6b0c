"""IR to a flat code plan (see :mod:`.plan`): :func:`lower` is the entry point."""

from .model import lower
from .plan import ClassPlan, ModelPlan, Namespace

__all__ = ["lower", "ClassPlan", "ModelPlan", "Namespace"]
