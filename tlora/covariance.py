"""Activation covariance of each target module's input over the calibration samples (DESIGN §1.2).

For every shared-input group g (q/k/v read one tensor, and so do gate/up) and every calibration sample s,
with X_s ``[n_s, d_in]`` the group's input at the sample's valid tokens (attention mask 1: prompt and
response alike, never padding) and μ_s their mean:

    S_g = Σ_s (X_s − 1·μ_sᵀ)ᵀ (X_s − 1·μ_sᵀ)        C_g = S_g / n_samples

Invariants (tested): S is kept as float64 sums plus counts, so shards add up (:func:`merge_covariances`)
and any batch size or padding side gives the S of batch size 1; S is exactly symmetric. Each sample is
centred *before* the GEMM rather than through Σxxᵀ − n·μμᵀ, which cancels catastrophically when |μ| is
large against the spread. Only the lower triangle of S is accumulated and mirrored once at the end: on CPU
by a BLAS SYRK (half the flops of the full GEMM, which is as large as the forward pass's own), elsewhere by
the lower block rows of a torch GEMM (5/8 of it).
The artifact is ``covariance.zarr`` (DESIGN §2): one float64 ``[d_in, d_in]`` matrix per group.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from scipy.linalg.blas import dsyrk, ssyrk
from torch import nn
from tqdm.auto import tqdm

from tlora._zarr_store import open_complete, read_float64, write_matrix, writing
from tlora.models import model_fingerprint as fingerprint_model
from tlora.targets import Targets, TargetSpec, find_targets, get_module

log = logging.getLogger(__name__)

Centering = Literal["per_sample"]
Precision = Literal["float32", "float64"]
_FORWARD_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
_BLOCKS = 4  # off CPU, S is accumulated in 4 block rows, lower part only; mirrored once at the end
_ADD_BLOCKS = 8  # on CPU, the float32 SYRK partial sum is added to the float64 sum in 8 block rows (9/16 of it)
# On CPU, float32 partial sums span at most this many tokens (or one batch, if larger) before they are added to
# the float64 sums. 0: every batch is added on its own, so sums over shards cut between batches (flows/shards.py,
# calibration mixtures) equal one pass in float64; carrying several batches in float32 (e.g. 2048) saves ~0.3 s
# on SmolLM2 but makes a split differ from one pass at float32 precision.
_FP32_TOKENS = 0


class CovarianceStats(BaseModel):
    """Everything a :class:`Covariance` holds but its tensors (for manifests and run logs)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    modules: dict[str, str]
    """Module name -> shared-input group name."""
    dims: dict[str, int]
    """Group name -> d_in."""
    n_tokens: int
    n_samples: int
    centering: Centering
    model_fingerprint: str | None
    data_fingerprint: str | None


@dataclass(frozen=True)
class Covariance:
    """Per-sample-centred activation sums of each shared-input group, plus the counts behind them."""

    sums: Mapping[str, torch.Tensor]  # group -> [d_in, d_in], float64, S = Σ_s Xcᵀ Xc (a dict, or StoredSums)
    modules: dict[str, str]  # module -> group
    n_tokens: int
    n_samples: int
    centering: Centering = "per_sample"
    model_fingerprint: str | None = None
    data_fingerprint: str | None = None

    def __post_init__(self) -> None:
        missing = sorted(set(self.modules.values()) - set(self.sums))
        if missing:
            raise ValueError(f"modules refer to groups without a sum: {missing}")
        for group, s in ({} if isinstance(self.sums, StoredSums) else self.sums).items():
            if s.dim() != 2 or s.shape[0] != s.shape[1] or s.dtype != torch.float64:
                raise ValueError(f"sum of group {group!r} must be a square float64 matrix, got "
                                 f"{tuple(s.shape)} {s.dtype}")
        if self.n_samples < 1 or self.n_tokens < self.n_samples:
            raise ValueError(f"need n_tokens >= n_samples >= 1, got n_tokens={self.n_tokens}, "
                             f"n_samples={self.n_samples}")

    @property
    def groups(self) -> dict[str, list[str]]:
        """Group name -> its member modules, in module order."""
        out: dict[str, list[str]] = {g: [] for g in self.sums}
        for module, group in self.modules.items():
            out[group].append(module)
        return out

    def matrix(self, module: str) -> torch.Tensor:
        """``C = S / n_samples`` for the module's group: ``[d_in, d_in]``, float64."""
        if module not in self.modules:
            raise ValueError(f"module {module!r} has no covariance; it holds {len(self.modules)} modules, "
                             f"e.g. {list(self.modules)[:3]}")
        return self.sums[self.modules[module]] / self.n_samples

    def dim(self, group: str) -> int:
        """d_in of a group (from the store's metadata for stored sums: nothing is read)."""
        sums = self.sums
        return sums.dim(group) if isinstance(sums, StoredSums) else int(sums[group].shape[0])

    @property
    def stats(self) -> CovarianceStats:
        return CovarianceStats(
            modules=dict(self.modules), dims={g: self.dim(g) for g in self.sums},
            n_tokens=self.n_tokens, n_samples=self.n_samples, centering=self.centering,
            model_fingerprint=self.model_fingerprint, data_fingerprint=self.data_fingerprint)


def collect_covariance(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    targets: Targets | TargetSpec,
    *,
    precision: Precision = "float32",
    model_fingerprint: str | None = None,
    data_fingerprint: str | None = None,
    progress: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
) -> Covariance:
    """Run the model over calibration batches and accumulate each group's per-sample-centred input sums.

    Args:
        batches: dicts with ``input_ids`` and ``attention_mask`` ``[B, T]`` (padding on either side;
            ``labels`` are ignored). All of them are checked before the first forward pass.
        targets: from :func:`tlora.targets.find_targets`, or a spec to pass to it.
        precision: dtype of the centred activations and their GEMM. ``float32`` partial sums span one
            batch and are accumulated into float64 sums (so shards cut between batches add up exactly);
            ``float64`` makes the whole sum float64.
        model_fingerprint: recorded as given; computed from the model's weights when ``None``.
        on_progress: called as ``on_progress(batches_done, n_batches)`` after each batch.

    Returns:
        The sums (on CPU) with ``n_tokens`` valid tokens over ``n_samples`` samples.

    Raises:
        ValueError: no batches, a batch without ``input_ids``/``attention_mask``, a sample that is all
            padding (before any compute); non-finite activations at a module (names it).
    """
    if not isinstance(targets, Targets):
        targets = find_targets(model, targets)
    batches = list(batches)
    _check_batches(batches)
    if model_fingerprint is None:
        model_fingerprint = fingerprint_model(model)
    device = next(model.parameters()).device
    dtype = torch.float64 if precision == "float64" else torch.float32
    hooked = {group: get_module(model, group) for group in targets.groups}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    keep_logits = all(head is not m for m in hooked.values())
    acc = _Accumulator(targets.groups, dtype)
    handles = [module.register_forward_pre_hook(acc.hook(group)) for group, module in hooked.items()]
    was_training = model.training
    try:
        model.eval()  # dropout would make the activations random
        with torch.no_grad():
            for j, batch in enumerate(tqdm(batches, desc="covariance", unit="batch", disable=not progress)):
                inputs = forward_inputs(model, batch, device, one_logit=keep_logits)
                acc.start(inputs["attention_mask"].ne(0))
                model(**inputs)
                acc.finish(j)
                if on_progress is not None:
                    on_progress(j + 1, len(batches))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    cov = Covariance(
        sums={g: acc.result(g).cpu() for g in targets.groups},  # module order, not call order
        modules={name: t.group for name, t in targets.modules.items()},
        n_tokens=acc.n_tokens, n_samples=acc.n_samples, centering="per_sample",
        model_fingerprint=model_fingerprint, data_fingerprint=data_fingerprint)
    log.info("covariance of %d groups (%d modules) over %d samples, %d tokens",
             len(cov.sums), len(cov.modules), cov.n_samples, cov.n_tokens)
    return cov


def forward_inputs(model: nn.Module, batch: Mapping[str, torch.Tensor], device: torch.device | str, *,
                   one_logit: bool = True) -> dict[str, Any]:
    """The keyword inputs of a statistics forward pass over a padded batch, on ``device``.

    Position ids count from each sample's first real token where the model takes them (absolute-position models,
    GPT-2 and BERT, would see left-padded samples at shifted positions); no KV cache; with ``one_logit``, only the
    last position's logits (the ``[B, T, vocab]`` logits are never read).
    """
    params = inspect.signature(model.forward).parameters
    inputs: dict[str, Any] = {k: batch[k].to(device) for k in _FORWARD_KEYS if k in batch}
    if "position_ids" in params and "position_ids" not in inputs:
        inputs["position_ids"] = (inputs["attention_mask"].ne(0).long().cumsum(1) - 1).clamp(min=0)
    if "use_cache" in params:
        inputs["use_cache"] = False
    if one_logit and "logits_to_keep" in params:
        inputs["logits_to_keep"] = 1
    return inputs


def merge_covariances(parts: Sequence[Covariance], *, data_fingerprint: str | None = None) -> Covariance:
    """Add the sums and counts of covariances collected on disjoint shards of the calibration data.

    Args:
        data_fingerprint: the fingerprint of the union of the shards (each part carries its own).

    Raises:
        ValueError: no parts, or parts that disagree on modules, groups, shapes, centering or model.
    """
    if not parts:
        raise ValueError("merge_covariances needs at least one covariance")
    first = parts[0]
    for i, part in enumerate(parts[1:], start=1):
        if part.modules != first.modules:
            raise ValueError(f"part {i} covers other modules or groups than part 0")
        for group, s in part.sums.items():
            if s.shape != first.sums[group].shape:
                raise ValueError(f"group {group!r}: part {i} has shape {tuple(s.shape)}, part 0 "
                                 f"{tuple(first.sums[group].shape)}")
        if part.centering != first.centering:
            raise ValueError(f"part {i} is centred {part.centering!r}, part 0 {first.centering!r}")
        if part.model_fingerprint != first.model_fingerprint:
            raise ValueError(f"part {i} was collected on another model than part 0 "
                             f"({part.model_fingerprint} != {first.model_fingerprint})")
    sums = {g: torch.stack([p.sums[g] for p in parts]).sum(0) for g in first.sums}
    return Covariance(sums=sums, modules=dict(first.modules), n_tokens=sum(p.n_tokens for p in parts),
                      n_samples=sum(p.n_samples for p in parts), centering=first.centering,
                      model_fingerprint=first.model_fingerprint, data_fingerprint=data_fingerprint)


def save_covariance(path: str | Path, cov: Covariance, *, compressors: Any = "default") -> None:
    """Write ``cov`` as a Zarr v3 group: one float64 ``[d_in, d_in]`` array per group, the rest as attributes.

    ``complete`` is written ``false`` first and ``true`` last, so an interrupted write is refused on load.
    ``compressors``: ``"default"`` is :data:`tlora._zarr_store.CODEC` (uncompressed: reads about as fast as
    ``numpy.load``); ``"compact"`` (:data:`tlora._zarr_store.COMPACT_CODEC`, Blosc LZ4) stores about half the
    bytes at several times the time; anything else is passed to zarr's ``create_array``.
    """
    names = {group: _array_name(group, i) for i, group in enumerate(cov.sums)}
    with writing(path) as root:
        for group, s in cov.sums.items():
            write_matrix(root, names[group], s, compressors=compressors)
        root.attrs.update({
            "modules": {m: names[g] for m, g in cov.modules.items()}, "n_tokens": cov.n_tokens,
            "n_samples": cov.n_samples, "centering": cov.centering, "model_fingerprint": cov.model_fingerprint,
            "data_fingerprint": cov.data_fingerprint})


class StoredSums(Mapping[str, torch.Tensor]):
    """A covariance store's sums, each read from the store when it is asked for (none held in memory)."""

    def __init__(self, root: Any, names: Iterable[str]) -> None:
        self.root = root
        self.names = list(names)
        self._shapes = {name: tuple(root[name].shape) for name in self.names}

    def __getitem__(self, group: str) -> torch.Tensor:
        if group not in self._shapes:
            raise KeyError(group)
        return read_float64(self.root[group])

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def dim(self, group: str) -> int:
        return int(self._shapes[group][0])


def load_covariance(path: str | Path, *, lazy: bool = False) -> Covariance:
    """Read a store written by :func:`save_covariance`; group names are the store's array names.

    ``lazy``: the sums are read one at a time when asked for (:class:`StoredSums`), for models whose sums do not
    fit in memory together.

    Raises:
        ValueError: no store at ``path``, a store whose ``complete`` attribute is not true, or one with
            missing or malformed attributes.
    """
    root, attrs = open_complete(path, "covariance")
    try:
        modules = attrs["modules"]
        names = list(dict.fromkeys(modules.values()))
        sums: Mapping[str, torch.Tensor] = StoredSums(root, names) if lazy else {
            name: read_float64(root[name]) for name in names}
        dims = {g: sums.dim(g) for g in names} if lazy else {g: s.shape[0] for g, s in sums.items()}
        stats = CovarianceStats.model_validate(
            {k: attrs[k] for k in ("modules", "n_tokens", "n_samples", "centering", "model_fingerprint",
                                   "data_fingerprint")} | {"dims": dims})
    except (KeyError, ValidationError) as err:
        raise ValueError(f"covariance store {path} is malformed: {err}") from err
    return Covariance(sums=sums, modules=stats.modules, n_tokens=stats.n_tokens, n_samples=stats.n_samples,
                      centering=stats.centering, model_fingerprint=stats.model_fingerprint,
                      data_fingerprint=stats.data_fingerprint)


def _check_batches(batches: list[Mapping[str, torch.Tensor]]) -> None:
    """Refuse unusable calibration data before any forward pass, naming the batch and sample."""
    if not batches:
        raise ValueError("no calibration batches: the covariance needs at least one sample")
    masks = []
    for j, batch in enumerate(batches):
        missing = [k for k in ("input_ids", "attention_mask") if k not in batch]
        if missing:
            raise ValueError(f"batch {j} has no {' or '.join(missing)} (keys: {sorted(batch)}); the covariance "
                             "counts valid tokens by attention mask")
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if ids.dim() != 2 or mask.shape != ids.shape or ids.shape[0] == 0:
            raise ValueError(f"batch {j}: input_ids {tuple(ids.shape)} and attention_mask {tuple(mask.shape)} "
                             "must both be [B, T] with B >= 1")
        if ((mask != 0) & (mask != 1)).any():
            raise ValueError(f"batch {j}: attention_mask must hold only 0 and 1")
        masks.append(mask)
    if not any(bool(m.any()) for m in masks):
        raise ValueError("the calibration data is all padding: attention_mask is 0 everywhere")
    for j, mask in enumerate(masks):
        empty = (mask.sum(1) == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"sample {empty[0]} of batch {j} is all padding (attention_mask all 0); drop it")


class _Accumulator:
    """Running sums per group, fed by one forward pre-hook per group, one batch at a time."""

    def __init__(self, groups: Mapping[str, list[str]], dtype: torch.dtype) -> None:
        self.groups = groups
        self.dtype = dtype
        self.sums: dict[str, torch.Tensor] = {}  # group -> float64; its lower triangle is S's, the rest unused
        self.scratch: dict[str, np.ndarray] = {}  # group -> float32 Fortran [d, d], the CPU SYRK's partial sum
        self.pending: set[str] = set()  # groups whose scratch holds a partial sum not yet in self.sums
        self.pending_tokens = 0
        self.n_tokens = 0
        self.n_samples = 0

    def start(self, mask: torch.Tensor) -> None:
        """Prepare the valid-token index of a batch (mask ``[B, T]``, bool)."""
        self.shape = tuple(mask.shape)
        self.rows = mask.reshape(-1).nonzero().squeeze(1)  # [N] valid rows of the flattened [B*T, d] input
        self.sample = self.rows // mask.shape[1]  # [N] the sample each valid row belongs to
        self.counts = mask.sum(1).to(torch.float64)[:, None]  # [B, 1]
        if self.pending_tokens and self.pending_tokens + len(self.rows) > _FP32_TOKENS:
            self._flush()
        self.pending_tokens += len(self.rows)
        self.calls = dict.fromkeys(self.groups, 0)
        self.n_tokens += len(self.rows)
        self.n_samples += mask.shape[0]

    def hook(self, group: str):
        def pre_hook(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            b, t = self.shape
            if x.shape[:-1] not in ((b, t), (b * t,)):
                raise ValueError(f"module {group!r} reads {tuple(x.shape)}, not one vector per token "
                                 f"([{b}, {t}, d]): its token covariance is undefined; leave it out of the targets")
            # [N, d] valid rows, centred in float64 whatever the GEMM's precision: a float32 mean and subtraction
            # would err by ~(eps32·|μ|/σ)², past 1e-5 near |μ|/σ ≈ 3e4 (LLMs' massive activations come close).
            x = x.reshape(b * t, x.shape[-1]).index_select(0, self.rows).to(torch.float64)
            mean = torch.zeros(b, x.shape[1], dtype=torch.float64, device=x.device).index_add_(0, self.sample, x)
            xc = x.sub_((mean / self.counts).index_select(0, self.sample)).to(self.dtype)
            self._accumulate(group, xc)
            self.calls[group] += 1

        return pre_hook

    def _accumulate(self, group: str, xc: torch.Tensor) -> None:
        """Add the lower triangle of ``xcᵀ xc`` to the group's float64 sum (its upper part is not kept)."""
        d = xc.shape[1]
        if group not in self.sums:
            self.sums[group] = torch.zeros(d, d, dtype=torch.float64, device=xc.device)
        low = self.sums[group]
        if not _use_syrk(xc):
            # Block rows of the lower part, [i0:i1, :i1]: (B+1)/2B of the GEMM (5/8 with 4 blocks).
            for i0, i1 in _blocks(d):
                if self.dtype == torch.float64:
                    low[i0:i1, :i1].addmm_(xc[:, i0:i1].T, xc[:, :i1])
                else:
                    low[i0:i1, :i1].add_(xc[:, i0:i1].T @ xc[:, :i1])  # float64 accumulation across batches
            return
        # A C-contiguous [N, d] array is the Fortran [d, N] array xcᵀ, and the C-contiguous float64 sum the
        # Fortran sumᵀ: SYRK's "upper triangle of a·aᵀ" in those terms is the lower triangle of xcᵀ xc.
        a = xc.detach().numpy().T
        if self.dtype == torch.float64:
            dsyrk(1.0, a, beta=1.0, c=low.numpy().T, trans=0, lower=0, overwrite_c=1)  # in place
            return
        if group not in self.scratch:
            self.scratch[group] = np.zeros((d, d), dtype=np.float32, order="F")
        beta = 1.0 if group in self.pending else 0.0  # 0: overwrite what was flushed already
        ssyrk(1.0, a, beta=beta, c=self.scratch[group], trans=0, lower=0, overwrite_c=1)  # in place
        self.pending.add(group)

    def _flush(self) -> None:
        """Add the float32 partial sums to the float64 sums (lower triangle, in block rows)."""
        for group in self.pending:
            low, part = self.sums[group], torch.from_numpy(self.scratch[group]).T  # both C-contiguous
            for i0, i1 in _blocks(low.shape[0], _ADD_BLOCKS):
                low[i0:i1, :i1].add_(part[i0:i1, :i1])
        self.pending.clear()
        self.pending_tokens = 0

    def result(self, group: str) -> torch.Tensor:
        """The group's full S, its upper triangle mirrored from the lower one in place (exactly symmetric).

        By block rows: each block's upper-right rectangle is a transposed copy of the lower part below it,
        the diagonal block mirrors itself; one pass over half the matrix (``tril`` and a sum took four).
        """
        self._flush()
        s = self.sums[group]
        for i0, i1 in _blocks(s.shape[0], _ADD_BLOCKS):
            s[i0:i1, i1:] = s[i1:, i0:i1].T
            diag = s[i0:i1, i0:i1]
            diag.copy_(diag.tril() + diag.tril(-1).T)
        return s

    def finish(self, j: int) -> None:
        """Check the batch just run: every group saw its input, and only finite values (module order)."""
        for group, members in self.groups.items():
            if self.calls[group] == 0:
                raise ValueError(f"module {group!r} was not called in batch {j}; it cannot be a target")
            # A NaN/Inf input makes its column's centred values non-finite, hence S's diagonal entry, which
            # is a sum of squares and so stays non-finite in every later batch: d values to check per batch.
            diag = (torch.from_numpy(self.scratch[group]).diagonal() if group in self.pending
                    else self.sums[group].diagonal())  # the scratch holds this batch when it is pending
            if not bool(torch.isfinite(diag).all()):
                shared = f" (shared by {', '.join(members[1:])})" if len(members) > 1 else ""
                raise ValueError(f"non-finite (NaN/Inf) input activations at module {group!r}{shared} in batch {j} "
                                 "(or values whose squares overflow)")


def _use_syrk(xc: torch.Tensor) -> bool:
    """Whether ``xc``'s Gram matrix is accumulated by scipy's BLAS SYRK (CPU) or torch's GEMM (elsewhere)."""
    return xc.device.type == "cpu"


def _blocks(d: int, n: int = _BLOCKS) -> list[tuple[int, int]]:
    """``n`` (or fewer) consecutive index ranges covering ``range(d)``."""
    size = -(-d // n)
    return [(i, min(i + size, d)) for i in range(0, d, size)]


def _array_name(group: str, index: int) -> str:
    """The group's name if Zarr can use it as a node name, else a stand-in (the mapping lands in attrs)."""
    if group and "/" not in group and not group.startswith("__") and set(group) != {"."}:
        return group
    return f"group_{index}"
