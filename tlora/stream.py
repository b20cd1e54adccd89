"""Sequential onloading: run a model one decoder layer at a time, loaded from its safetensors files (DESIGN §6a).

The model's skeleton lives on the meta device (accelerate's ``init_empty_weights``); its embeddings, norms and head
(everything outside the decoder-layer list) are loaded once, and each decoder layer is loaded onto the compute
device only while it runs, then its parameters go back to meta. This is the pattern of llm-compressor's sequential
pipeline and GPTQ's calibration: the loop over samples runs inside the loop over layers.

One generic rule, no per-architecture code: the decoder layers are the ``nn.ModuleList`` of identical blocks that
holds the most parameters (``model.layers`` in Llama, ``transformer.h`` in GPT-2, ``encoder.layer`` in BERT). The
inputs each layer receives besides its hidden states (masks, rotary embeddings, position ids) are captured from the
model's own forward with every layer replaced by a stub (:func:`capture`), and the model's own head and loss run
over a final hidden state the same way (:func:`tail`): whatever the architecture builds around its layers, it
builds itself.

Invariant (counted in :class:`LayerStream`, tested): at most ``max_resident`` decoder layers hold real weights at
any time (1 unless the caller keeps layers resident).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from tlora.models import _LOADING, fingerprint_tensors

log = logging.getLogger(__name__)

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"


class ModelFolder:
    """An HF model folder's config and where each of its tensors is stored, checked before any compute.

    Raises:
        ValueError: no ``config.json``; no safetensors file; several safetensors files but no index; an index
            that names a shard file which is missing (the message names the file).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise ValueError(f"{self.path} is not a model folder: it has no config.json")
        index = self.path / SAFE_INDEX
        shards = sorted(p.name for p in self.path.glob("*.safetensors"))
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise ValueError(f"{index} is not a safetensors index (no weight_map): {err}") from err
            missing = sorted({f for f in weight_map.values() if not (self.path / f).is_file()})
            if missing:
                raise ValueError(f"{self.path}: shard file {missing[0]} named by {SAFE_INDEX} is missing"
                                 + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        elif shards == [SAFE_SINGLE]:
            with safe_open(self.path / SAFE_SINGLE, framework="pt") as f:
                weight_map = dict.fromkeys(f.keys(), SAFE_SINGLE)
        elif not shards:
            raise ValueError(f"{self.path} holds no safetensors weights (only safetensors are read, never pickle)")
        else:
            raise ValueError(f"{self.path} has {len(shards)} safetensors files ({', '.join(shards[:3])}, ...) but no "
                             f"{SAFE_INDEX} to say which tensor is in which file")
        self.weight_map = weight_map
        self.config = AutoConfig.from_pretrained(self.path)

    def read(self, names: Mapping[str, str], device: torch.device | str, dtype: torch.dtype | None
             ) -> dict[str, torch.Tensor]:
        """``{model name: tensor}`` for ``{model name: checkpoint name}``, floats cast to ``dtype``, on ``device``.

        Each shard file is opened (memory-mapped) only while its tensors are copied out, so the file pages a
        process maps stay bounded by what one call reads.
        """
        by_file: dict[str, list[tuple[str, str]]] = {}
        for name, key in names.items():
            by_file.setdefault(self.weight_map[key], []).append((name, key))
        out = {}
        for file, pairs in by_file.items():
            with safe_open(self.path / file, framework="pt", device="cpu") as f:
                for name, key in pairs:
                    t = f.get_tensor(key)
                    if dtype is not None and t.is_floating_point():
                        t = t.to(dtype)
                    out[name] = t.to(device)
        return out


def model_class(config: Any) -> type:
    """The class named by the config's ``architectures`` (transformers' own), else the causal-LM auto class."""
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
            return cls
    return AutoModelForCausalLM


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's decoder-layer list: the ``nn.ModuleList`` of same-type blocks holding the most parameters."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if size and (best is None or size > best[0]):
                best = (size, name, module)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no list of identical blocks (nn.ModuleList) to stream layer "
                         "by layer; load it whole instead")
    return best[1], best[2]


class LayerStream:
    """A model skeleton on the meta device whose decoder layers are loaded from a :class:`ModelFolder` on demand.

    Args:
        folder: the model folder (checked on construction).
        device: where loaded weights go and the layers run.
        dtype: the compute dtype of floating weights (the files' own dtype is cast on load).
        max_resident: how many decoder layers may hold real weights at once (1: strictly one at a time).

    Raises:
        ValueError: a weight the model needs is in no shard file (before any compute).
    """

    def __init__(self, folder: ModelFolder | str | Path, *, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, max_resident: int = 1) -> None:
        self.folder = folder if isinstance(folder, ModelFolder) else ModelFolder(folder)
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_resident = max_resident
        # init_empty_weights patches nn.Module for the whole process while it is open: under the loading lock, so a
        # model another thread builds meanwhile (shards, Prefect tasks) never gets meta parameters
        with _LOADING, init_empty_weights(include_buffers=False):
            cls = model_class(self.folder.config)
            build = cls._from_config if issubclass(cls, PreTrainedModel) else cls.from_config
            self.model = build(self.folder.config, dtype=dtype)
        self.model.eval()
        self.prefix, self.layers = decoder_layers(self.model)
        tied = set(getattr(self.model, "all_tied_weights_keys", None) or {})
        self._keys: dict[str, str] = {}  # model tensor name -> checkpoint name
        missing = []
        names = [n for n, _ in self.model.named_parameters(remove_duplicate=False)]
        names += [n for n in self.model.state_dict() if n not in names]  # persistent buffers
        for name in names:
            key = self._checkpoint_key(name)
            if key is not None:
                self._keys[name] = key
            elif name not in tied:
                missing.append(name)
        meta_buffers = [n for n, b in self.model.named_buffers() if b.is_meta and n not in self._keys]
        if missing or meta_buffers:
            absent = missing or meta_buffers
            raise ValueError(f"{self.folder.path}: {len(absent)} tensors of {type(self.model).__name__} are in no "
                             f"shard file, e.g. {absent[:3]}")
        self.resident: list[int] = []  # decoder layers holding real weights, oldest first
        self.loads = 0  # decoder-layer loads so far
        self.peak_resident = 0  # the most decoder layers that held real weights at once
        self._outside_loaded = False

    def _checkpoint_key(self, name: str) -> str | None:
        """The checkpoint's name for a model tensor: the same, or without/with the base-model prefix."""
        base = getattr(self.model, "base_model_prefix", "")
        for key in (name, name.removeprefix(base + ".") if base else name, f"{base}.{name}" if base else name):
            if key in self.folder.weight_map:
                return key
        return None

    def layer_names(self, i: int) -> list[str]:
        """Full tensor names of decoder layer ``i`` (parameters and persistent buffers)."""
        return [f"{self.prefix}.{i}.{n}" for n in self.layers[i].state_dict()]

    def load_outside(self) -> None:
        """Load every weight outside the decoder layers (embeddings, norms, head) once, and tie tied weights."""
        if self._outside_loaded:
            return
        inside = f"{self.prefix}."
        names = {n: k for n, k in self._keys.items() if not n.startswith(inside)}
        self._assign(self.folder.read(names, self.device, self.dtype))
        self.model.tie_weights()
        for name, _b in self.model.named_buffers():  # non-persistent buffers (rotary frequencies) were built on CPU
            if not name.startswith(inside):
                set_module_tensor_to_device(self.model, name, self.device)
        self._outside_loaded = True

    def load(self, i: int) -> nn.Module:
        """Decoder layer ``i`` with real weights on the device (freeing the oldest resident layer if needed)."""
        if i in self.resident:
            return self.layers[i]
        while len(self.resident) >= self.max_resident:
            self.free(self.resident[0])
        names = {n: self._keys[n] for n in self.layer_names(i) if n in self._keys}
        self._assign(self.folder.read(names, self.device, self.dtype))
        layer = self.layers[i]
        for name, b in layer.named_buffers():
            if b.device != self.device:
                set_module_tensor_to_device(layer, name, self.device)
        self.resident.append(i)
        self.loads += 1
        self.peak_resident = max(self.peak_resident, len(self.resident))
        return layer

    def free(self, i: int) -> None:
        """Send decoder layer ``i``'s parameters back to the meta device (their memory is released)."""
        layer = self.layers[i]
        for name, p in list(layer.named_parameters()):
            set_module_tensor_to_device(layer, name, "meta")
            p.grad = None
        if i in self.resident:
            self.resident.remove(i)

    def free_all(self) -> None:
        for i in list(self.resident):
            self.free(i)

    @contextmanager
    def layer(self, i: int) -> Iterator[nn.Module]:
        """Decoder layer ``i`` loaded for the ``with`` body, freed afterwards unless layers stay resident."""
        layer = self.load(i)
        try:
            yield layer
        finally:
            if self.max_resident == 1:
                self.free(i)

    def _assign(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            set_module_tensor_to_device(self.model, name, self.device, value=t)

    def weight_bytes(self) -> int:
        """Bytes of every parameter of the model in the compute dtype (floats) or its own (others)."""
        size = torch.tensor([], dtype=self.dtype).element_size()
        return sum(p.numel() * (size if p.is_floating_point() else p.element_size()) for p in self.model.parameters())

    def fingerprint(self) -> str:
        """:func:`tlora.models.model_fingerprint` of the model loaded whole in this dtype, one tensor at a time."""
        tied = getattr(self.model, "all_tied_weights_keys", None) or {}

        def tensors() -> Iterator[tuple[str, torch.Tensor]]:
            for name, t in sorted(self.model.state_dict().items()):
                key = self._keys.get(name) or self._keys.get(tied.get(name, ""))
                if key is None:  # a buffer the files do not hold: as the model built it
                    yield name, t
                    continue
                yield name, self.folder.read({name: key}, "cpu", self.dtype if t.is_floating_point() else None)[name]

        return fingerprint_tensors(self.model.config, tensors())

    def materialised_layers(self) -> int:
        """How many decoder layers hold any real (non-meta) parameter now: counted from the modules themselves."""
        return sum(any(not p.is_meta for p in layer.parameters()) for layer in self.layers)


@dataclass
class LayerCall:
    """What a decoder layer receives besides its hidden states, as the model's own forward passed it."""

    args: tuple
    kwargs: dict[str, Any]
    keyword: bool  # hidden states passed as ``hidden_states=`` rather than first positional argument

    def __call__(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The layer's output hidden states, on ``hidden``'s device (kept on the host when they do not fit the
        device: each batch goes over and back as the layer runs)."""
        device = next(layer.parameters()).device
        x = hidden.to(device)
        out = layer(*self.args, hidden_states=x, **self.kwargs) if self.keyword else \
            layer(x, *self.args, **self.kwargs)
        out = out[0] if isinstance(out, tuple) else out
        return out.to(hidden.device)


class _Stop(Exception):
    """Raised by the last stub of a capture pass: nothing after the decoder layers needs to run."""


class _Stub(nn.Module):
    """Stands in for decoder layer ``index``: hands its call to ``run``; other attributes read the real layer's."""

    def __init__(self, index: int, layer: nn.Module, run: Callable[[int, tuple, dict], Any]) -> None:
        super().__init__()
        self.index = index
        object.__setattr__(self, "real", layer)  # not a submodule: its parameters stay out of the skeleton's view
        object.__setattr__(self, "run", run)

    def __getattr__(self, name: str) -> Any:  # e.g. Gemma's ``attention_type``, read by the model's layer loop
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "real"), name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.run(self.index, args, kwargs)


@contextmanager
def _stubbed(layers: nn.ModuleList, run: Callable[[int, tuple, dict], Any]) -> Iterator[None]:
    real = list(layers)
    try:
        for i, layer in enumerate(real):
            layers[i] = _Stub(i, layer, run)
        yield
    finally:
        for i, layer in enumerate(real):
            layers[i] = layer


def _split(args: tuple, kwargs: dict) -> tuple[torch.Tensor, LayerCall]:
    if args:
        return args[0], LayerCall(args[1:], dict(kwargs), keyword=False)
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), LayerCall((), kwargs, keyword=True)


def capture(model: nn.Module, layers: nn.ModuleList, inputs: Mapping[str, Any]
            ) -> tuple[torch.Tensor, list[LayerCall]]:
    """The first layer's hidden states and every layer's other inputs, from the model's own forward.

    Every layer is a stub that records its call and passes its hidden states through unchanged; the layer inputs a
    model builds (masks, rotary embeddings) depend on its inputs only, so each stub sees what the real layer would.
    """
    calls: list[LayerCall | None] = [None] * len(layers)
    first: list[torch.Tensor] = []

    def run(i: int, args: tuple, kwargs: dict) -> torch.Tensor:
        hidden, call = _split(args, kwargs)
        if i == 0:
            first.append(hidden)
        calls[i] = call
        if i == len(layers) - 1:
            raise _Stop
        return hidden

    with _stubbed(layers, run), torch.no_grad(), suppress(_Stop):
        model(**inputs)
    if not first or any(c is None for c in calls):
        raise ValueError(f"{type(model).__name__}'s forward did not call each of its {len(layers)} decoder layers "
                         "once; it cannot be streamed")
    return first[0], calls  # type: ignore[return-value]


def tail(model: nn.Module, layers: nn.ModuleList, inputs: Mapping[str, Any], final: torch.Tensor) -> Any:
    """The model's own output (head, loss) for ``inputs`` with ``final`` as the last decoder layer's output."""
    def run(i: int, args: tuple, kwargs: dict) -> torch.Tensor:
        return final if i == len(layers) - 1 else _split(args, kwargs)[0]

    with _stubbed(layers, run):
        return model(**inputs)
