"""TLoRA: task-aware LoRA. A from the task's activation covariance (frozen), ranks and scales from a
sensitivity score under a budget, only B trained. See DESIGN §1 and the README."""

from tlora.models import load_model, model_fingerprint
from tlora.targets import Target, Targets, find_targets

__all__ = [
    "Target",
    "Targets",
    "find_targets",
    "load_model",
    "model_fingerprint",
]
