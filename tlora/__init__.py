"""TLoRA: task-aware LoRA. A from the task's activation covariance (frozen), ranks and scales from a
sensitivity score under a budget, only B trained. See DESIGN §1 and the README."""

from tlora.adapters import AdapterInfo, init_adapters, load_adapters, save_adapters
from tlora.allocation import Allocation, Budget, ModuleAllocation, allocate
from tlora.covariance import Covariance, collect_covariance, load_covariance, merge_covariances, save_covariance
from tlora.evaluate import EvalResult, evaluate, heldout_loss, merge_adapters
from tlora.methods import ABLATIONS, Method, build_adapter, plan_allocation
from tlora.models import load_model, model_fingerprint
from tlora.preparation import Prepared, prepare
from tlora.sensitivity import Scores, score_sensitivity
from tlora.spectrum import Spectrum, compute_spectrum, load_spectrum, save_spectrum
from tlora.stream import LayerStream
from tlora.targets import Target, Targets, find_targets
from tlora.train import TrainResult, train

__all__ = [
    "ABLATIONS",
    "AdapterInfo",
    "Allocation",
    "Budget",
    "Covariance",
    "EvalResult",
    "LayerStream",
    "Method",
    "ModuleAllocation",
    "Prepared",
    "Scores",
    "Spectrum",
    "Target",
    "Targets",
    "TrainResult",
    "allocate",
    "build_adapter",
    "collect_covariance",
    "compute_spectrum",
    "evaluate",
    "find_targets",
    "heldout_loss",
    "init_adapters",
    "load_adapters",
    "load_covariance",
    "load_model",
    "load_spectrum",
    "merge_adapters",
    "merge_covariances",
    "model_fingerprint",
    "plan_allocation",
    "prepare",
    "save_adapters",
    "save_covariance",
    "save_spectrum",
    "score_sensitivity",
    "train",
]
