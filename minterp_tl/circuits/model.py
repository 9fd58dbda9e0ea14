""":class:`CircuitModel`: masks attached to a ``TransformerBridge``, their controls, persistence and plot.

The model is not copied: each targeted weight's ``nn.Linear`` (or GPT-2 ``Conv1D``) gets a masked
``forward`` (an instance attribute that shadows the class method, removed again by
:meth:`CircuitModel.detach`), which computes ``F.linear(x, W * m_W, b * m_b)``; the model's parameters
are never modified. Ablation modes, ``use_masks``, L0 statistics and temperature follow NeuroSurgeon's
``CircuitModel``; masks save to and load from a :class:`minterp_tl.store.StateStore` (safetensors,
written atomically, verified on load).
"""

from __future__ import annotations

import math
import os
import types
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional, Union, cast

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.model_bridge import TransformerBridge

from minterp_tl import _deprecated
from minterp_tl._checks import did_you_mean
from minterp_tl.circuits.config import _WEIGHTS, ABLATIONS, CircuitConfig
from minterp_tl.circuits.layer import _SAMPLED, _is_conv1d, _MaskLayer
from minterp_tl.circuits.masks import MaskMethod, _is_real
from minterp_tl.circuits.plots import plot_masks
from minterp_tl.specs import resolve

_FORMAT = "minterp_tl.circuits/1"  # the store metadata's "format" of saved masks


class CircuitModel(nn.Module):
    """A ``TransformerBridge`` with learned (or magnitude) masks on some of its weights.

    The model is not copied: each targeted ``nn.Linear`` gets an instance ``forward`` that applies
    its mask, until :meth:`detach` (also on ``with CircuitModel(...) as circuit:`` exit) restores the
    module and the parameters' ``requires_grad``. Only one CircuitModel can be attached to a module at
    a time.

    Args:
        config: What to mask and how (:class:`CircuitConfig`).
        model: The model; its parameters are never modified. With ``config.freeze_base`` every
            parameter is set to ``requires_grad=False`` while attached.

    Attributes:
        model: The wrapped model.
        mask_layers: ``nn.ModuleDict`` of the mask layers, keyed by canonical weight name with dots
            replaced by ``"/"`` (``"blocks/1/attn/W_O"``); use :attr:`names` for the names.
        names: The canonical names of the masked weights (``"blocks.1.attn.W_O"``), in layer order.
        method: The mask method (:mod:`minterp_tl.circuits.masks`), built once from the config.
    """

    def __init__(self, config: CircuitConfig, model: TransformerBridge) -> None:
        super().__init__()
        if not isinstance(config, CircuitConfig):
            raise ValueError(f"CircuitModel: config must be a CircuitConfig, got {type(config).__name__}")
        if not isinstance(model, TransformerBridge):
            raise ValueError(
                "CircuitModel: model must be a transformer_lens TransformerBridge, got "
                f"{type(model).__name__}"
            )
        self.config = config
        self.model = model
        self.method: MaskMethod = config.method
        self.names: list[str] = []
        self.mask_layers: dict[str, _MaskLayer] = nn.ModuleDict()  # type: ignore[assignment]
        self._generator = torch.Generator().manual_seed(0)
        self._attached = False
        for name, (linear, side, group) in _resolve_targets(config, model).items():
            if getattr(linear, "_minterp_circuit_mask", None) is not None:
                raise ValueError(
                    f"CircuitModel: {name} is already masked by another CircuitModel; call its detach() first"
                )
            self.names.append(name)
            self.mask_layers[_key(name)] = _MaskLayer(name, linear, side, group, config, self.method)
        self._requires_grad = {id(p): p.requires_grad for p in model.parameters()}
        self._training = [(m, m.training) for m in _all_modules(model)]  # restored by detach()
        self._attach()
        self.set_ablate_mode(config.ablation)
        self.train(model.training)

    # -- attach / detach ------------------------------------------------------------------

    def _attach(self) -> None:
        for layer in self._layers():
            linear = layer.linear
            object.__setattr__(linear, "_minterp_circuit_mask", layer)
            linear.forward = types.MethodType(_masked_forward, linear)  # type: ignore[method-assign]
        self._attached = True

    def detach(self) -> TransformerBridge:
        """Remove the masks from the model and restore ``requires_grad`` and the train / eval mode of
        every module as they were when the masks were attached; return the model.

        The CircuitModel is unusable afterwards (its masks stay readable, e.g. for saving).
        """
        if self._attached:
            for layer in self._layers():
                linear = layer.linear
                if getattr(linear, "_minterp_circuit_mask", None) is layer:
                    del linear.forward
                    object.__setattr__(linear, "_minterp_circuit_mask", None)
            for p in self.model.parameters():
                p.requires_grad_(self._requires_grad.get(id(p), p.requires_grad))
            for module, training in self._training:
                module.training = training
            self._attached = False
        return self.model

    def __enter__(self) -> CircuitModel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def _layers(self) -> list[_MaskLayer]:
        return [self.mask_layers[_key(name)] for name in self.names]

    def _check_attached(self) -> None:
        if not self._attached:
            raise ValueError("CircuitModel: the masks were detached from the model; build a new CircuitModel")

    # -- nn.Module ------------------------------------------------------------------------

    def train(self, mode: bool = True) -> CircuitModel:
        """Set train / eval mode on the model and the masks (soft masks in training, hard in eval).

        With ``config.freeze_base``, every parameter of the model stays ``requires_grad=False``
        whatever the mode; only the mask logits train.
        """
        if not isinstance(mode, bool):
            raise ValueError(f"CircuitModel.train: mode must be True or False, got {mode!r}")
        super().train(mode)
        if self.config.freeze_base and self._attached:
            for p in self.model.parameters():
                p.requires_grad_(False)
        return self

    def mask_parameters(self) -> list[nn.Parameter]:
        """The trainable mask logits (empty for magnitude pruning)."""
        return [p for layer in self._layers() for p in layer.parameters(recurse=False)]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the masked model: ``circuit(tokens, return_type=...)`` takes the model's arguments.

        Returns the model's output. When the model computes a loss (``return_type="loss"`` or
        ``"both"``) and ``config.add_l0``, ``l0_lambda * L0`` (L0 of the current mode, see
        :meth:`l0`) is added to that loss.

        Raises:
            RuntimeError: A full forward pass never called a masked weight's ``nn.Linear`` (a bridge
                that computes with processed copies of the weights): the masks would do nothing.
        """
        self._check_attached()
        before = [layer.calls for layer in self._layers()]
        out = self.model(*args, **kwargs)
        if kwargs.get("start_at_layer") is None and kwargs.get("stop_at_layer") is None:
            idle = [l.name for l, n in zip(self._layers(), before) if l.use_mask and l.calls == n]
            if idle:
                raise RuntimeError(
                    f"CircuitModel: the forward pass never called the nn.Linear of {', '.join(idle[:4])}, so "
                    f"its mask had no effect; this bridge computes with other copies of these weights"
                )
        return_type = kwargs.get("return_type", args[1] if len(args) > 1 else "logits")
        if not self.config.add_l0 or return_type not in ("loss", "both"):
            return out
        penalty = self.config.l0_lambda * self.l0()
        if return_type == "loss":
            return out + penalty
        logits, loss = out
        return logits, loss + penalty

    def l0(self) -> Float[Tensor, ""]:
        """Total L0 of the found masks in the current mode (differentiable in training)."""
        layers = self._layers()
        total = layers[0].l0()
        for layer in layers[1:]:
            total = total + layer.l0().to(total.device)
        return total

    # -- NeuroSurgeon API -----------------------------------------------------------------

    @property
    def temperature(self) -> float:
        """Temperature ``T`` of continuous-sparsification masks (training mask ``sigmoid(T s)``)."""
        self._require_temperature()
        return float(self._layers()[0].temperature)

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._require_temperature()
        if not _is_real(value) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"CircuitModel.temperature must be a finite number > 0, got {value!r}")
        for layer in self._layers():
            layer.temperature = float(value)

    def _require_temperature(self) -> None:
        if not self.method.has_temperature:
            raise ValueError(
                f"CircuitModel.temperature applies to continuous_sparsification masks only; this model uses "
                f"{self.config.mask_method}"
            )

    def set_ablate_mode(
        self,
        ablation: str,
        force_resample: bool = False,
        *,
        seed: Optional[int] = None,
        remove: bool = False,
    ) -> None:
        """Change how masks are produced from the mask parameters (every mask layer).

        Args:
            ablation: ``"none"``, ``"zero_ablate"``, ``"random_ablate"``, ``"randomly_sampled"`` or
                ``"complement_sampled"`` (see :mod:`minterp_tl.circuits.layer`).
            force_resample: Draw new random masks (sampled modes) or new random weights
                (``random_ablate``) even when some exist. Otherwise a sample is reused while the
                found mask keeps its size.
            seed: Reseed the CircuitModel's generator first (samples are then reproducible).
            remove: For the sampled modes: remove the sampled units instead of keeping them
                (NeuroSurgeon's convention).
        """
        if ablation not in ABLATIONS:
            raise ValueError(
                f"set_ablate_mode: unknown ablation {ablation!r}; valid: {', '.join(ABLATIONS)}"
                + did_you_mean(ablation, ABLATIONS)
            )
        if seed is not None:
            self._generator.manual_seed(int(seed))
        for layer in self._layers():
            if ablation in _SAMPLED and (force_resample or not layer.has_sample(ablation)):
                layer.sample(ablation, self._generator)
            if ablation == "random_ablate" and (force_resample or not layer.has_random_weights()):
                layer.reinitialise(self._generator)
        for layer in self._layers():
            layer.ablation = ablation
            layer.remove_sampled = bool(remove)

    @property
    def ablation(self) -> str:
        """The current ablation mode."""
        return self._layers()[0].ablation

    def use_masks(self, value: bool, name_list: Optional[Iterable[str]] = None) -> None:
        """Turn masking on or off, for every masked weight or only those in ``name_list``.

        With masks off a weight's ``nn.Linear`` runs its own forward, so ``use_masks(False)`` gives
        exactly (``torch.equal``) the model's own output.

        Args:
            value: Whether to apply the masks.
            name_list: Canonical names (``"blocks.1.attn.W_O"``, as in :attr:`names`); ``None``: all.
        """
        if not isinstance(value, bool):
            raise ValueError(f"use_masks: value must be True or False, got {value!r}")
        names = self.names if name_list is None else list(name_list)
        for name in names:
            if name not in self.names:
                raise ValueError(
                    f"use_masks: {name!r} is not a masked weight; masked: {', '.join(self.names)}"
                    + did_you_mean(name, self.names)
                )
            self.mask_layers[_key(name)].use_mask = value

    def compute_l0_statistics(self) -> dict[str, Any]:
        """L0 statistics of the found masks in the current mode.

        Returns:
            ``{"total_l0": float, "max_l0": int, "layer2l0": {name: float}, "layer2maxl0": {name: int}}``:
            the summed L0 (soft / expected in training, the number of kept units in eval), the number of
            mask entries, and both per masked weight.
        """
        with torch.no_grad():
            layer2l0 = {layer.name: float(layer.l0()) for layer in self._layers()}
        layer2max = {layer.name: layer.n_units for layer in self._layers()}
        return {
            "total_l0": float(sum(layer2l0.values())),
            "max_l0": int(sum(layer2max.values())),
            "layer2l0": layer2l0,
            "layer2maxl0": layer2max,
        }

    # -- inspection -----------------------------------------------------------------------

    def hard_masks(self) -> dict[str, Tensor]:
        """The found binary masks, ``{name: bool tensor}`` (unit-shaped: ``[n_heads]`` for heads,
        ``[n_units]`` for neurons, ``[out_features, in_features]`` for weights); bias masks as
        ``"{name}.bias"``."""
        out: dict[str, Tensor] = {}
        for layer in self._layers():
            out[layer.name] = layer.hard("weight").bool()
            if layer.has_bias_mask:
                out[f"{layer.name}.bias"] = layer.hard("bias").bool()
        return out

    def current_masks(self) -> dict[str, Tensor]:
        """The masks the forward pass uses now (mode, ablation), detached, unit-shaped."""
        with torch.no_grad():
            return {layer.name: layer.mask("weight").detach().clone() for layer in self._layers()}

    def kept_heads(self) -> list[tuple[int, int]]:
        """``(layer, head)`` of the heads the found masks keep, for head masks on ``attn.W_O``.

        A head is kept when its ``W_O`` mask is 1 (its output reaches the residual stream).
        """
        if self.config.mask_unit != "head":
            raise ValueError(
                f"kept_heads needs mask_unit 'head', this circuit uses {self.config.mask_unit!r}"
            )
        if not any(name.endswith("attn.W_O") for name in self.names):
            raise ValueError(
                f"kept_heads needs attn.W_O among the masked weights; masked: {', '.join(self.names)}"
            )
        heads = []
        for layer in self._layers():
            if layer.name.endswith("attn.W_O"):
                l = int(layer.name.split(".")[1])
                heads += [(l, int(h)) for h in layer.hard().nonzero()[:, 0]]
        return heads

    def plot_masks(self, path: Union[str, os.PathLike[str]]) -> Path:
        """PNG of the found masks: a masked-weights x units heatmap for head / neuron masks, the
        fraction kept per masked weight for weight masks."""
        masks = {layer.name: layer.hard().float().cpu() for layer in self._layers()}
        title = f"{self.config.mask_method} masks (kept = 1)"
        return plot_masks(masks, self.config.mask_unit, title, path)

    # -- save / load ----------------------------------------------------------------------

    def mask_state(self) -> dict[str, Tensor]:
        """The mask parameters (logits, or pruning masks), ``{"{name}.weight_logits": tensor, ...}``."""
        out: dict[str, Tensor] = {}
        for layer in self._layers():
            for key, tensor in _mask_tensors(layer):
                out[f"{layer.name}.{key}"] = tensor.detach().cpu().contiguous().clone()
        return out

    def write_masks(self, root: Union[str, os.PathLike[str]]) -> Any:
        """Write the mask parameters and the config to a :class:`minterp_tl.store.StateStore` directory.

        The store writes each tensor as safetensors (temporary file, then rename) and rewrites only
        the tensors that changed since the last save to the same directory.

        Args:
            root: The store's directory (created if missing).

        Returns:
            The store's ``SaveReport`` (what was written, kept, removed). The store's metadata holds
            the config (``"config"``, JSON), the model's name and, for continuous sparsification, the
            temperature.
        """
        from minterp_tl.store import StateStore

        meta = {
            "config": self.config.to_json(),
            "model": str(getattr(self.model, "_minterp_name", None) or self.model.cfg.model_name),
            "format": _FORMAT,
        }
        if self.method.has_temperature:
            meta["temperature"] = repr(self.temperature)
        return StateStore(root).save(self.mask_state(), meta)

    def read_masks(self, root: Union[str, os.PathLike[str]]) -> None:
        """Read mask parameters written by :meth:`write_masks` into this CircuitModel.

        Raises:
            ValueError: Nothing saved there, or its tensors do not match this model's masks (names or
                shapes; the message lists the differences), or a stored file fails its hash check.
        """
        tensors, meta = _read_store(root, "read_masks")
        mine = self.mask_state()
        if set(tensors) != set(mine):
            missing = sorted(set(mine) - set(tensors))
            extra = sorted(set(tensors) - set(mine))
            raise ValueError(
                f"read_masks: the masks at {str(root)!r} do not match this CircuitModel's masks; missing: "
                f"{missing[:5]}, unexpected: {extra[:5]}"
            )
        for key, tensor in tensors.items():
            if tensor.shape != mine[key].shape:
                raise ValueError(
                    f"read_masks: {key} has shape {tuple(tensor.shape)} at {str(root)!r}, expected "
                    f"{tuple(mine[key].shape)}"
                )
        with torch.no_grad():
            for layer in self._layers():
                for key, target in _mask_tensors(layer):
                    target.copy_(tensors[f"{layer.name}.{key}"].to(target.device, target.dtype))
        if "temperature" in meta and self.method.has_temperature:
            self.temperature = float(meta["temperature"])

    @classmethod
    def read(cls, root: Union[str, os.PathLike[str]], model: TransformerBridge) -> CircuitModel:
        """Rebuild a CircuitModel on ``model`` from masks written by :meth:`write_masks`."""
        _, meta = _read_store(root, "CircuitModel.read")
        circuit = cls(CircuitConfig.from_json(meta["config"]), model)
        try:
            circuit.read_masks(root)
        except ValueError:
            circuit.detach()
            raise
        return circuit

    def save_masks(self, root: Union[str, os.PathLike[str]]) -> Any:
        """Deprecated spelling of :meth:`write_masks`."""
        _deprecated.warn("CircuitModel.save_masks", "CircuitModel.write_masks")
        return self.write_masks(root)

    def load_masks(self, root: Union[str, os.PathLike[str]]) -> None:
        """Deprecated spelling of :meth:`read_masks`."""
        _deprecated.warn("CircuitModel.load_masks", "CircuitModel.read_masks")
        self.read_masks(root)

    @classmethod
    def load(cls, root: Union[str, os.PathLike[str]], model: TransformerBridge) -> CircuitModel:
        """Deprecated spelling of :meth:`read`."""
        _deprecated.warn("CircuitModel.load", "CircuitModel.read")
        return cls.read(root, model)


# --------------------------------------------------------------------------------------------
# Helpers: targets on a bridge, the installed forward, the store
# --------------------------------------------------------------------------------------------


def _resolve_targets(
    config: CircuitConfig, model: TransformerBridge
) -> dict[str, tuple[nn.Linear, str, int]]:
    """``{canonical weight name: (linear, side, group)}`` of every targeted weight, in layer order."""
    n_layers = int(model.cfg.n_layers)
    found: dict[str, tuple[nn.Linear, str, int]] = {}
    for target in config.targets():
        layers = resolve(target.layers, n_layers, what="layer")
        explicit = len(target.weights) == 1
        for layer in sorted(layers):
            block = model.blocks[layer]
            for weight in target.weights:
                path, side = _WEIGHTS[weight]
                linear = _linear(block, path)
                if linear is None:
                    if explicit:
                        have = [w for w, (p, _) in _WEIGHTS.items() if _linear(block, p) is not None]
                        raise ValueError(
                            f"target {target.text!r}: blocks.{layer} has no {weight} (this model's block "
                            f"weights: {', '.join(have) or 'none'})"
                        )
                    continue  # a group skips what the architecture lacks (W_gate, MLPs of attn-only)
                group = _group(model, weight, config.mask_unit, target.text)
                found[f"blocks.{layer}.{weight}"] = (linear, side, group)
    if not found:
        raise ValueError(
            f"CircuitModel: the targets {list(config.target_layers)!r} select no weight on this model "
            f"(n_layers={n_layers}, attn_only={bool(getattr(model.cfg, 'attn_only', False))})"
        )
    order = {w: i for i, w in enumerate(_WEIGHTS)}
    layer_order = lambda kv: (int(kv[0].split(".")[1]), order[kv[0].split(".", 2)[2]])  # noqa: E731
    return dict(sorted(found.items(), key=layer_order))


def _linear(block: nn.Module, path: str) -> Optional[nn.Linear]:
    """The ``nn.Linear`` (or ``Conv1D``) at ``path`` (``"attn.q"``) of a bridge block; ``None`` if absent."""
    try:
        module = block.get_submodule(path)
    except AttributeError:
        return None
    linear = getattr(module, "original_component", module)
    if not (isinstance(linear, nn.Linear) or _is_conv1d(linear)):
        raise ValueError(
            f"CircuitModel: {path} of this model is a {type(linear).__name__}, not an nn.Linear or a Conv1D; "
            f"masks support those weights only"
        )
    return linear  # type: ignore[return-value]


def _group(model: TransformerBridge, weight: str, unit: str, target: str) -> int:
    """Consecutive features per mask unit: 0 for weights, 1 for neurons, ``d_head`` for heads."""
    if unit == "weight":
        return 0
    if unit == "neuron":
        return 1
    if not weight.startswith("attn."):
        raise ValueError(
            f"target {target!r}: mask_unit 'head' applies to attention weights (W_Q, W_K, W_V, W_O), not "
            f"{weight}; use mask_unit 'neuron' for MLP neurons"
        )
    return int(model.cfg.d_head)


def _all_modules(model: nn.Module) -> list[nn.Module]:
    """Every module of ``model``, including the wrapped HF model a TransformerBridge keeps outside its
    registered children (``original_model``), whose train / eval mode ``model.train()`` also sets."""
    modules = {id(m): m for m in model.modules()}
    inner = getattr(model, "original_model", None)
    if isinstance(inner, nn.Module):
        modules.update({id(m): m for m in inner.modules()})
    return list(modules.values())


def _masked_forward(self: nn.Linear, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"]:
    """The ``forward`` a CircuitModel installs on a targeted ``nn.Linear`` (``self`` is the linear)."""
    mask = cast(_MaskLayer, self._minterp_circuit_mask)
    return mask(x)


def _key(name: str) -> str:
    """The ``mask_layers`` key of a canonical weight name (``nn.ModuleDict`` keys hold no dots)."""
    return name.replace(".", "/")


def _mask_tensors(layer: _MaskLayer) -> list[tuple[str, Tensor]]:
    """A mask layer's saved tensors: its parameters, then its buffers, by name."""
    return list(layer.named_parameters(recurse=False)) + list(layer.named_buffers(recurse=False))


def _read_store(root: Union[str, os.PathLike[str]], caller: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and metadata of masks saved at ``root``; ``ValueError`` naming ``caller`` if none."""
    from minterp_tl.store import StateStore

    store = StateStore(root)
    if not store.exists():
        raise ValueError(f"{caller}: no saved masks at {str(root)!r} (write them with write_masks)")
    meta = store.metadata
    if meta.get("format") != _FORMAT or "config" not in meta:
        raise ValueError(f"{caller}: the store at {str(root)!r} holds no masks written by write_masks")
    return store.load(), meta


__all__ = ["CircuitModel"]
