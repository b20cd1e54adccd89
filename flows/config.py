"""PipelineConfig: one pydantic section per stage, loaded from YAML with dotted ``--set`` overrides.

Every section forbids unknown fields and is frozen, so a typo fails before anything runs, with an error that
names the field (``allocation.r: Input should be greater than 0``). Overrides are applied to the YAML's dict
before validation (``--set allocation.budget.rank=840``), so they are checked like the file itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tlora.allocation import Budget
from tlora.data import TaskSpec
from tlora.methods import Method
from tlora.targets import TargetSpec


class Section(BaseModel):
    """A config section: unknown fields are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class ModelConfig(Section):
    source: str = "demo"
    """An HF folder, a ``.gguf`` file, a hub id, or ``demo`` (SmolLM2-135M-Instruct, shipped offline)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights' dtype in every stage: ``auto`` is bfloat16 on CUDA, float32 elsewhere (resolved before keys are made;
    the statistics stay float32 products into float64 sums whatever it is)."""
    trust_remote_code: bool = False


class CalibrationSource(Section):
    """One dataset of a calibration mixture."""

    task: TaskSpec
    n_calib: int | None = Field(None, gt=0)
    """Samples drawn from this dataset (default: ``calibration.n_calib``)."""
    weight: float = Field(1.0, gt=0)
    """Each of its samples counts ``weight`` times (all 1: the plain union of the samples)."""


class CalibrationConfig(Section):
    n_calib: int = Field(32, gt=0)
    seed: int = 0
    max_length: int = Field(256, gt=1)
    mixture: list[CalibrationSource] = Field(default_factory=list)
    """Calibrate on several datasets at once; empty: the pipeline's ``task`` alone."""


class CovarianceConfig(Section):
    precision: Literal["float32", "float64"] = "float32"
    batch_size: int = Field(4, gt=0)
    """Samples per forward pass; any batch size gives the same covariance, so it is not part of the key."""
    shards: int = Field(1, gt=0)
    """Split the samples into this many shards of whole batches, each its own cached task run on ``runner``."""


class SpectrumConfig(Section):
    r_max: int = Field(32, gt=0)
    """Singular vectors kept per module: computed once, sliced per budget (ranks above it are refused)."""
    solver: Literal["auto", "exact", "gram", "krylov"] = "auto"


class SensitivityConfig(Section):
    mode: Literal["per_sample", "batched"] = "per_sample"
    batch_size: int = Field(4, gt=0)
    """Samples per backward in ``batched`` mode (``per_sample`` runs one at a time whatever it is)."""
    shards: int = Field(1, gt=0)
    """Split the samples into this many shards, each its own cached task run on ``runner``."""

    @property
    def step(self) -> int:
        """Samples per backward: shard boundaries fall between steps."""
        return self.batch_size if self.mode == "batched" else 1


class RunnerConfig(Section):
    """Where the shards of covariance and sensitivity run (one shard: in the flow's own process)."""

    kind: Literal["default", "ray", "dask"] = "default"
    """``default``: Prefect's thread pool in this process; ``ray``: one Ray task per shard; ``dask``: one Dask task
    per shard."""
    address: str | None = None
    """A running Ray cluster (``auto``, ``ray://head:10001``) or Dask scheduler (``tcp://head:8786``) whose workers
    can import ``flows``; default: a local Ray or Dask cluster started for the shards and shut down after them."""
    num_cpus: int | None = Field(None, gt=0)
    """CPUs of the local Ray, worker processes of the local Dask cluster, or threads of the default pool, so
    shards run at once (default: all cores)."""
    retries: int = Field(1, ge=0)
    """Times a failed shard is retried on its own (a lost worker) before the run fails."""


class AllocationConfig(Section):
    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    budget: Budget | None = None
    """Total rank (``{rank: R}``) or trainable parameters (``{params: P}``); default N·r."""
    min_rank: int = Field(0, ge=0)
    max_rank: int | None = Field(None, gt=0)
    """Default: ``spectrum.r_max`` for TLoRA's spectral init, unbounded otherwise."""


class TrainConfig(Section):
    max_steps: int = Field(100, gt=0)
    learning_rate: float = Field(2e-4, gt=0)
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    scheduler: str = "linear"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    """LoRA dropout, set when the adapter is built."""
    max_length: int = Field(256, gt=1)
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    logging_steps: int = Field(10, gt=0)
    save_steps: int | None = Field(None, gt=0)
    """Checkpoint every this many steps (default: at the end only); a killed run resumes from the last one."""


class EvaluateConfig(Section):
    split: Literal["validation", "test"] = "validation"
    max_examples: int | None = Field(64, gt=0)
    """Examples scored for held-out loss (a fixed subset; None: the whole split)."""
    max_generate: int = Field(16, ge=0)
    """Prompts answered greedily for the task metric (0: loss only)."""
    max_new_tokens: int = Field(64, gt=0)
    stop_strings: list[str] = Field(default_factory=list)
    max_length: int = Field(256, gt=1)
    batch_size: int = Field(8, gt=0)


class MergeConfig(Section):
    enabled: bool = True
    """Fold the trained adapter into a plain HF model folder."""


class TrackingConfig(Section):
    uri: str | None = None
    """MLflow tracking URI; default ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<store.root>/mlflow/mlflow.db``."""
    experiment: str = "tlora"
    register_model: bool = True
    """Register each trained adapter as a version of the MLflow model ``model_name``."""
    model_name: str | None = None
    """Default: ``tlora-<task>-<method>``."""


class StoreConfig(Section):
    root: str = "artifacts"
    """Local folder for the MLflow database, Prefect results and caches."""
    stages: str | None = None
    """Where stage artifacts go: a folder or an fsspec URI (``s3://bucket/tlora``); default ``<root>/stages``."""
    compress: bool = False
    """Blosc LZ4 on the covariance and spectrum Zarr arrays: about 0.56× the bytes for several times the write and
    read time (``benchmarks/RESULTS.md``); worth it for a store on S3 or a full disk. Keys do not change."""

    @property
    def stages_uri(self) -> str:
        return self.stages if self.stages is not None else str(Path(self.root) / "stages")


class PipelineConfig(Section):
    """The whole pipeline, one section per stage of DESIGN §2, plus where things are kept and tracked."""

    name: str = "tlora"
    model: ModelConfig = ModelConfig()
    task: TaskSpec
    targets: TargetSpec = "all-linear"
    """``all-linear``, a regex over full module names, or a list of names / name suffixes."""
    calibration: CalibrationConfig = CalibrationConfig()
    covariance: CovarianceConfig = CovarianceConfig()
    spectrum: SpectrumConfig = SpectrumConfig()
    sensitivity: SensitivityConfig = SensitivityConfig()
    allocation: AllocationConfig = AllocationConfig()
    method: Method = Method()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    merge: MergeConfig = MergeConfig()
    tracking: TrackingConfig = TrackingConfig()
    store: StoreConfig = StoreConfig()
    runner: RunnerConfig = RunnerConfig()
    device: str = "auto"
    """``auto`` (cuda when available), ``cpu``, ``cuda:1``...; not part of any cache key."""
    threads: int | None = Field(None, gt=0)
    """torch CPU threads (default: torch's choice); fewer than the cores helps on a shared machine."""

    @model_validator(mode="after")
    def _ranks_fit_the_spectrum(self) -> PipelineConfig:
        if self.method.needs_spectrum:
            r_max = self.spectrum.r_max
            if self.allocation.max_rank is not None and self.allocation.max_rank > r_max:
                raise ValueError(f"allocation.max_rank={self.allocation.max_rank} exceeds spectrum.r_max={r_max}: "
                                 "the spectrum holds no more vectors; raise spectrum.r_max")
            if self.allocation.r > r_max:
                raise ValueError(f"allocation.r={self.allocation.r} exceeds spectrum.r_max={r_max}")
        for source in self.calibration_sources:
            for stage, shards, step in (("covariance", self.covariance.shards, self.covariance.batch_size),
                                        ("sensitivity", self.sensitivity.shards, self.sensitivity.step)):
                check_shard_count(shards, source.n_calib, step, name=f"{stage}.shards", of=f" of {source.task.name}")
        names = [source.task.name for source in self.calibration.mixture]
        if len(set(names)) != len(names):
            raise ValueError(f"calibration.mixture names a task twice: {names}")
        return self

    @property
    def calibration_sources(self) -> list[CalibrationSource]:
        """The datasets calibrated on, each with its ``n_calib`` filled in."""
        sources = self.calibration.mixture or [CalibrationSource(task=self.task)]
        return [s.model_copy(update={"n_calib": s.n_calib or self.calibration.n_calib}) for s in sources]

    def with_branch(self, *, budget: Budget | None = None, method: Method | None = None) -> PipelineConfig:
        """This config with another budget and/or method (validated again)."""
        data = self.model_dump()
        if budget is not None:
            data["allocation"]["budget"] = budget.model_dump()
        if method is not None:
            data["method"] = method.model_dump()
        return PipelineConfig.model_validate(data)


def check_shard_count(n_shards: int, n_samples: int, step: int, *, name: str = "shards", of: str = "") -> int:
    """The steps of ``step`` samples in ``n_samples`` (the last may be short): a shard is whole steps, so at most
    that many shards.

    Raises:
        ValueError: ``n_shards`` exceeds the steps; the message names the field ``name`` and the samples ``of``.
    """
    n_steps = -(-n_samples // step)
    if n_shards > n_steps:
        raise ValueError(f"{name}={n_shards} exceeds the {n_steps} steps of {step} sample(s) in {n_samples} "
                         f"calibration samples{of}")
    return n_steps


class ConfigError(ValueError):
    """A config that does not validate; the message has one line per problem, each naming its field."""


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Read a YAML config, apply ``key.path=value`` overrides (values parsed as YAML), and validate it.

    Raises:
        ConfigError: the file is missing or not a mapping, an override is malformed, or validation fails.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config is a mapping of sections, got {type(data).__name__}")
    for override in overrides:
        data = apply_override(data, override)
    return validate_config(data, source=str(path))


def validate_config(data: dict[str, Any], *, source: str = "config") -> PipelineConfig:
    """Validate a config dict, turning pydantic's errors into one line per field."""
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        lines = [f"  {'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']}"
                 + (f" (got {e['input']!r})" if e["type"] != "missing" and not isinstance(e["input"], dict) else "")
                 for e in err.errors()]
        raise ConfigError(f"{source} is not a valid config:\n" + "\n".join(lines)) from None


def apply_override(data: dict[str, Any], override: str) -> dict[str, Any]:
    """``data`` with ``a.b.c=value`` set (a copy); the value is parsed as YAML (``8``, ``1e-4``, ``[q_proj]``)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.field=value")
    dotted, raw = override.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(keys):
        raise ConfigError(f"override {override!r} has an empty key")
    out = _deep_copy(data)
    node = out
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {'.'.join(keys[:i + 1])} is a value, not a section")
        node = child
    try:
        node[keys[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {override!r}: the value of {dotted.strip()} is not valid YAML "
                          f"({str(err).splitlines()[0]})") from err
    return out


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data
