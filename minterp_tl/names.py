"""Hook names: one canonical name per hook point, whatever spelling the caller uses.

A ``TransformerBridge`` exposes every hook point under several names: the HookedTransformer name
(``blocks.3.hook_resid_pre``) and the bridge's own module name (``blocks.3.hook_in``) point to the
same ``HookPoint``. Analyses in minterp_tl always speak in *canonical* names: the HookedTransformer
name where one exists, else the bridge name (``ln_final.hook_out``, ``blocks.3.attn.q.hook_in``).

- :func:`canonical_names` -- every canonical name of a model, grouped by kind (``"resid"``, ``"attn"``,
  ...), each hook point exactly once.
- :func:`resolve_name` -- any accepted spelling -> the canonical name, checked against the model:

  - any full name, bridge aliases included: ``"blocks.0.hook_in"`` -> ``"blocks.0.hook_resid_pre"``;
  - ``get_act_name`` short forms: ``("resid_pre", 3)``, ``("z", 2, "attn")``, ``"k2"``;
  - block-relative names with a layer: ``("attn.hook_pattern", 1)``;
  - minterp style: ``"layer_3"`` / ``"layer_-1"`` (block outputs), ``"embed"``, ``"lm_head"``,
    ``"logits"``;
  - nnterp style: ``"layers.3"`` / ``"layers.3.output"``, ``"layers.3.input"``,
    ``"layers.3.self_attn"`` (``.input`` / ``.output``), ``"layers.3.mlp"`` (``.input`` / ``.output``),
    ``"embed_tokens"``, ``"ln_final"`` / ``"norm"``.

- :func:`resolve_names` -- :func:`resolve_name` for a list of layers.
- :func:`expand_name` -- a name at a layer selection: per-layer names at each layer, others once.
- :func:`short_name` -- a canonical name -> ``(short, layer)`` such that
  ``resolve_name(model, short, layer)`` gives it back.

Every failure is a ``ValueError`` that says what was asked for and what would work instead.
"""

from __future__ import annotations

import difflib
import operator
import re
import weakref
from dataclasses import dataclass
from typing import Optional, Union

from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.utilities import get_act_name

__all__ = [
    "KINDS",
    "NameSpec",
    "canonical_names",
    "expand_name",
    "resolve_name",
    "resolve_names",
    "short_name",
]

NameSpec = Union[str, tuple]
"""What :func:`resolve_name` accepts as ``name``: a string, or a tuple of ``get_act_name`` arguments."""

KINDS: tuple[str, ...] = ("embed", "resid", "attn", "mlp", "norm", "unembed", "other", "bridge")
"""The groups of :func:`canonical_names`, in order."""

_BRIDGE_SUFFIXES: tuple[str, ...] = (".hook_in", ".hook_out")

# Hook names (relative to ``blocks.{l}.``) that HookedTransformer models may have: a name built from
# these that the model lacks "does not exist on this model" rather than being a typo.
# fmt: off
_STANDARD_BLOCK_HOOKS: frozenset[str] = frozenset({
    "hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_in", "hook_q_input", "hook_k_input",
    "hook_v_input", "hook_mlp_in", "hook_attn_out", "hook_mlp_out",
    "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z", "attn.hook_attn_scores", "attn.hook_pattern",
    "attn.hook_result", "attn.hook_rot_q", "attn.hook_rot_k",
    "mlp.hook_pre", "mlp.hook_mid", "mlp.hook_post", "mlp.hook_pre_linear",
    "ln1.hook_scale", "ln1.hook_normalized", "ln2.hook_scale", "ln2.hook_normalized",
})
_STANDARD_GLOBAL_HOOKS: frozenset[str] = frozenset({
    "hook_tokens", "hook_embed", "hook_pos_embed", "hook_unembed", "ln_final.hook_scale",
    "ln_final.hook_normalized",
})
# fmt: on
# Bridge module hooks, which exist on some architectures only (``mlp.hook_out`` on an MLP model, ...).
_STANDARD_BRIDGE_BLOCK_HOOK = re.compile(r"(?:(?:attn|mlp|ln1|ln2)(?:\.\w+)?\.)?hook_(?:in|out)")
_STANDARD_BRIDGE_GLOBAL_HOOK = re.compile(r"(?:embed|pos_embed|ln_final|unembed)\.hook_(?:in|out)")

# Global names that come before the blocks when sorting (everything else global comes after).
_PRE_BLOCK_ROOTS: frozenset[str] = frozenset(
    {"hook_tokens", "hook_embed", "hook_pos_embed", "embed", "pos_embed", "rotary_emb"}
)

_BLOCK_NAME = re.compile(r"blocks\.(-?\d+)\.(.+)")
# get_act_name's own rule for a layer inside a short name: "k6", "scale4ln1".
_EMBEDDED_LAYER = re.compile(r"([a-z]+)(\d+)([a-z]?.*)")
_MINTERP_LAYER = re.compile(r"layer(?:_(-?\d+))?")
_NNTERP_LAYER = re.compile(r"(?:model\.)?layers\.(-?\d+)(?:\.(self_attn|attn|mlp))?(?:\.(input|output))?")
_NNTERP_GLOBAL = re.compile(r"(?:model\.)?(embed_tokens|ln_final|norm|lm_head)(?:\.output)?")

# get_act_name's aliases of short names: offered as suggestions when their target exists.
_ACT_NAME_ALIASES: dict[str, str] = {
    "attn": "pattern",
    "attn_logits": "attn_scores",
    "key": "k",
    "query": "q",
    "value": "v",
    "mlp_pre": "pre",
    "mlp_mid": "mid",
    "mlp_post": "post",
}
_GLOBAL_WORDS: tuple[str, ...] = ("embed", "lm_head", "logits", "embed_tokens", "ln_final", "norm")
# nnterp spellings of one layer, "layers.{l}" + suffix: offered as suggestions.
# fmt: off
_NNTERP_SUFFIXES: tuple[str, ...] = (
    "", ".input", ".output", ".self_attn", ".self_attn.input", ".self_attn.output", ".mlp", ".mlp.input",
    ".mlp.output",
)
# fmt: on


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def canonical_names(model: TransformerBridge) -> dict[str, list[str]]:
    """Return every canonical hook name of ``model``, grouped by kind.

    Each ``HookPoint`` of ``model.hook_dict`` appears exactly once, under its canonical name: its
    HookedTransformer name (the alias not ending in ``.hook_in`` / ``.hook_out``; the
    ``blocks.{l}.hook_*`` / shortest one if there are several), else its bridge name.

    The groups, in this order and only when non-empty:

    - ``"embed"``: ``hook_embed``, ``hook_pos_embed``, ``hook_tokens``.
    - ``"resid"``: ``blocks.{l}.hook_resid_pre`` / ``_mid`` / ``_post``.
    - ``"attn"``: ``blocks.{l}.attn.hook_*``, ``blocks.{l}.hook_attn_in`` / ``_out``,
      ``blocks.{l}.hook_q_input`` / ``k_input`` / ``v_input``.
    - ``"mlp"``: ``blocks.{l}.mlp.hook_*``, ``blocks.{l}.hook_mlp_in`` / ``_out``.
    - ``"norm"``: ``ln1`` / ``ln2`` / ``ln_final`` hooks (``hook_scale``, ``hook_normalized``).
    - ``"unembed"``: ``hook_unembed``.
    - ``"other"``: HookedTransformer-style names that fit none of the above.
    - ``"bridge"``: bridge names with no HookedTransformer alias (``ln_final.hook_out``,
      ``blocks.{l}.attn.q.hook_in``, ...).

    Within a group, names are sorted by layer (numerically; names before the blocks first, names after
    them last), then alphabetically. The result is computed once per model and cached.

    Args:
        model: The model whose ``hook_dict`` to read.

    Returns:
        A new dict kind -> list of canonical names (safe to modify).
    """
    return {kind: list(names) for kind, names in _index(model).groups.items()}


def resolve_name(
    model: TransformerBridge,
    name: NameSpec,
    layer: Optional[int] = None,
    layer_type: Optional[str] = None,
) -> str:
    """Return the canonical hook name that ``name`` refers to on ``model``.

    The result is always a key of ``model.hook_dict`` (see :func:`canonical_names` for what canonical
    means). Accepted spellings, tried in this order:

    1. Any full name in ``model.hook_dict``, bridge aliases included
       (``"blocks.0.hook_in"`` -> ``"blocks.0.hook_resid_pre"``). A ``blocks.{l}.`` name may use a
       negative layer (``"blocks.-1.hook_resid_post"``).
    2. minterp style: ``"layer_3"`` -> ``"blocks.3.hook_resid_post"`` (the output of layer 3), also
       ``"layer"`` with ``layer=3``; ``"embed"`` -> ``"hook_embed"``; ``"lm_head"`` / ``"logits"`` ->
       ``"hook_unembed"``.
    3. nnterp / Hugging Face style (optional ``"model."`` prefix): ``"layers.3"`` /
       ``"layers.3.output"`` -> ``"blocks.3.hook_resid_post"``; ``"layers.3.input"`` ->
       ``"blocks.3.hook_resid_pre"``; ``"layers.3.self_attn"`` or ``"layers.3.attn"`` (optionally
       ``.output``) -> ``"blocks.3.hook_attn_out"``; ``"layers.3.self_attn.input"`` ->
       ``"blocks.3.attn.hook_in"``; ``"layers.3.mlp"`` (/``.output``) -> ``"blocks.3.hook_mlp_out"``;
       ``"layers.3.mlp.input"`` -> ``"blocks.3.mlp.hook_in"``; ``"embed_tokens"`` -> ``"hook_embed"``;
       ``"ln_final"`` / ``"norm"`` -> ``"ln_final.hook_normalized"`` (``"ln_final.hook_out"`` when the
       model has no ``hook_normalized``).
    4. A name relative to a block, with ``layer``: ``("attn.hook_pattern", 1)``,
       ``("hook_resid_pre", 2)``, ``("ln1.hook_in", 0)``.
    5. ``transformer_lens.utilities.get_act_name`` short forms, with the layer from ``layer`` or inside
       the name: ``("resid_pre", 3)``, ``("z", 2, "attn")``, ``"k2"``, ``("attn_out", 1)``,
       ``("mlp_post", 1)``, ``("q_input", 0)``, ``"scale"`` (-> ``"ln_final.hook_scale"``).

    Args:
        model: The model whose hooks the name must exist on.
        name: The name: a string, or a tuple ``(name, layer, layer_type)`` (trailing items optional) as
            passed to ``get_act_name``.
        layer: The block index for per-layer names; negative counts from the end (``-1`` is the last
            block). Must be left ``None`` when ``name`` already says the layer.
        layer_type: ``get_act_name``'s layer type (``"attn"``, ``"mlp"``, ``"ln1"``, ``"a"``, ...), for
            short names that occur in several places of a block (``"scale"``, ``"normalized"``).

    Returns:
        The canonical name, a key of ``model.hook_dict``.

    Raises:
        ValueError: If ``name`` is not a str or tuple; the layer is given twice, is not an int or is out
            of range (the message names ``n_layers`` and the valid range); a per-layer name has no layer
            (the message shows the layer-0 name as an example); the name is a standard hook that does
            not exist on this model (``"resid_mid"`` on an attention-only model); or the name is unknown
            (the message lists the closest real names and short names).
    """
    text, layer, layer_type = _unpack(name, layer, layer_type)
    return _resolve(_index(model), text, layer, layer_type)


def resolve_names(model: TransformerBridge, name: NameSpec, layers: list[int]) -> list[str]:
    """Resolve one per-layer name at several layers.

    Args:
        model: The model whose hooks the names must exist on.
        name: A per-layer name without a layer, in any form :func:`resolve_name` accepts with a
            ``layer`` (``"resid_pre"``, ``"pattern"``, ``"attn.hook_z"``, ``"layer"``).
        layers: The block indices (negative counts from the end).

    Returns:
        ``[resolve_name(model, name, layer) for layer in layers]``.

    Raises:
        ValueError: As :func:`resolve_name`, for the first layer that fails.
    """
    return [resolve_name(model, name, layer) for layer in layers]


def expand_name(model: TransformerBridge, name: NameSpec, layers: list[int]) -> list[str]:
    """Resolve ``name`` at a layer selection, whether or not it is per-layer.

    A per-layer name without a layer (``"resid_pre"``, ``"attn.hook_z"``) gives one canonical name per
    layer of ``layers``; a name that says its layer (``"blocks.3.hook_resid_pre"``, ``"layers.3"``) or
    has none (``"hook_embed"``, ``"ln_final"``) gives its one canonical name and ignores ``layers``.

    Raises:
        ValueError: As :func:`resolve_name`.
    """
    text, layer, layer_type = _unpack(name, None, None)
    if layer is not None or layer_type is not None:
        return [resolve_name(model, name)]
    if _try_resolve(_index(model), text, None) is not None:
        return [resolve_name(model, text)]
    return [resolve_name(model, text, layer) for layer in layers]


def short_name(canonical: str) -> tuple[str, Optional[int]]:
    """Split a canonical hook name into a short name and a layer.

    The inverse of :func:`resolve_name`: ``resolve_name(model, *short_name(c)) == c`` for every
    canonical name ``c`` of a model. The short name is the ``get_act_name`` word where one gives the
    name back, else the name relative to its block.

    Examples:
        ``"blocks.3.attn.hook_pattern"`` -> ``("pattern", 3)``;
        ``"blocks.0.hook_resid_pre"`` -> ``("resid_pre", 0)``;
        ``"blocks.2.ln1.hook_scale"`` -> ``("ln1.hook_scale", 2)``;
        ``"hook_embed"`` -> ``("embed", None)``;
        ``"ln_final.hook_out"`` -> ``("ln_final.hook_out", None)``.

    Args:
        canonical: A canonical hook name (no model is needed).

    Returns:
        ``(short, layer)``, with ``layer`` ``None`` for names outside the blocks.
    """
    layer, relative = _split_layer(canonical)
    match = re.fullmatch(r"(?:(?:attn|mlp)\.)?hook_(\w+)|ln_final\.hook_(scale|normalized)", relative)
    if match is not None:
        word = match.group(1) or match.group(2)
        if get_act_name(word, layer) == canonical:
            return word, layer
    return relative, layer


# --------------------------------------------------------------------------------------------
# The per-model index
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _HookIndex:
    """Everything name resolution needs to know about one model, computed once.

    Attributes:
        n_layers: Number of blocks.
        canonical: Every ``hook_dict`` name -> its canonical name.
        groups: :func:`canonical_names`'s result.
        vocabulary: Short names that resolve on this model (``"pattern"``, ``"resid_pre"``, ...), for
            suggestions.
    """

    n_layers: int
    canonical: dict[str, str]
    groups: dict[str, list[str]]
    vocabulary: tuple[str, ...]


_INDEX_CACHE: weakref.WeakKeyDictionary[TransformerBridge, _HookIndex] = weakref.WeakKeyDictionary()


def _index(model: TransformerBridge) -> _HookIndex:
    """The cached :class:`_HookIndex` of ``model``, built on first use."""
    index = _INDEX_CACHE.get(model)
    if index is None:
        index = _build_index(model)
        _INDEX_CACHE[model] = index
    return index


def _build_index(model: TransformerBridge) -> _HookIndex:
    """Group ``model.hook_dict`` by hook point, choose canonical names and sort them into kinds."""
    n_layers = int(model.cfg.n_layers)
    aliases: dict[int, list[str]] = {}
    for name, hook_point in model.hook_dict.items():
        aliases.setdefault(id(hook_point), []).append(name)

    canonical: dict[str, str] = {}
    for names in aliases.values():
        chosen = _choose_canonical(names)
        for name in names:
            canonical[name] = chosen

    grouped: dict[str, list[str]] = {kind: [] for kind in KINDS}
    for name in set(canonical.values()):
        grouped[_kind(name)].append(name)
    groups = {
        kind: sorted(names, key=lambda n: _sort_key(n, n_layers)) for kind, names in grouped.items() if names
    }

    words = {short for short, _ in map(short_name, canonical.values()) if "." not in short}
    words |= {alias for alias, target in _ACT_NAME_ALIASES.items() if target in words}
    words |= set(_GLOBAL_WORDS) | {"layer"}
    return _HookIndex(n_layers, canonical, groups, tuple(sorted(words)))


def _choose_canonical(names: list[str]) -> str:
    """The canonical name among ``names``, all the ``hook_dict`` names of one ``HookPoint``.

    HookedTransformer names (not ending in ``.hook_in`` / ``.hook_out``) win over bridge names; among
    several, ``blocks.{l}.hook_*`` / ``hook_*`` forms first, then the shortest, then alphabetical.
    """
    legacy = [name for name in names if not name.endswith(_BRIDGE_SUFFIXES)]
    candidates = legacy or names

    def preference(name: str) -> tuple[bool, int, str]:
        _, relative = _split_layer(name)
        return (not relative.startswith("hook_"), len(name), name)

    return min(candidates, key=preference)


def _kind(canonical: str) -> str:
    """The :func:`canonical_names` group of a canonical name."""
    if canonical.endswith(_BRIDGE_SUFFIXES):
        return "bridge"
    _, relative = _split_layer(canonical)
    if relative in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post"):
        return "resid"
    if relative in ("hook_tokens", "hook_embed", "hook_pos_embed"):
        return "embed"
    if relative == "hook_unembed":
        return "unembed"
    attn_inputs = ("hook_attn_in", "hook_attn_out", "hook_q_input", "hook_k_input", "hook_v_input")
    if relative.startswith("attn.") or relative in attn_inputs:
        return "attn"
    if relative.startswith("mlp.") or relative in ("hook_mlp_in", "hook_mlp_out"):
        return "mlp"
    if relative.startswith(("ln1.", "ln2.", "ln_final.")):
        return "norm"
    return "other"


def _sort_key(canonical: str, n_layers: int) -> tuple[int, str]:
    """Sort key of a canonical name: layer (pre-block globals as -1, post-block globals as ``n_layers``, the
    model's number of blocks), then name."""
    layer, _ = _split_layer(canonical)
    if layer is None:
        layer = -1 if canonical.split(".")[0] in _PRE_BLOCK_ROOTS else n_layers
    return layer, canonical


def _split_layer(name: str) -> tuple[Optional[int], str]:
    """Split ``"blocks.{l}.rest"`` into ``(l, "rest")``; other names into ``(None, name)``."""
    match = _BLOCK_NAME.fullmatch(name)
    if match is None:
        return None, name
    return int(match.group(1)), match.group(2)


# --------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------


def _unpack(
    name: NameSpec, layer: Optional[int], layer_type: Optional[str]
) -> tuple[str, Optional[int], Optional[str]]:
    """Check the argument types (as for :func:`resolve_name`) and unpack a tuple ``name`` into
    ``(name, layer, layer_type)``."""
    if isinstance(name, tuple):
        if not 1 <= len(name) <= 3:
            raise ValueError(
                f"A tuple hook name must be (name, layer, layer_type) with 1 to 3 items, got {name!r}."
            )
        if len(name) > 1 and layer is not None:
            raise ValueError(f"The layer is given twice: in the tuple {name!r} and as layer={layer!r}.")
        if len(name) > 2 and layer_type is not None:
            raise ValueError(f"The layer type is given twice: in {name!r} and as layer_type={layer_type!r}.")
        text = name[0]
        layer = name[1] if len(name) > 1 else layer
        layer_type = name[2] if len(name) > 2 else layer_type
    else:
        text = name
    if not isinstance(text, str):
        raise ValueError(
            f"A hook name must be a str or a tuple such as ('resid_pre', 3), got {type(name).__name__} "
            f"{name!r}."
        )
    if layer is not None:
        if isinstance(layer, bool):
            raise ValueError(f"The layer of {text!r} must be an int, got {layer!r}.")
        try:
            layer = operator.index(layer)
        except TypeError:
            raise ValueError(
                f"The layer of {text!r} must be an int, got {type(layer).__name__} {layer!r}."
            ) from None
    if layer_type is not None and not isinstance(layer_type, str):
        raise ValueError(f"layer_type must be a str, got {layer_type!r}.")
    return text.strip(), layer, layer_type


def _resolve(
    index: _HookIndex,
    name: str,
    layer: Optional[int],
    layer_type: Optional[str],
    suggest: bool = True,
) -> str:
    """Resolve ``name`` (already unpacked) on the model of ``index``; see :func:`resolve_name`.

    ``suggest`` says whether error messages list the closest real names (off while computing them).
    """
    plain = layer is None and layer_type is None

    # 1. Full names, bridge aliases included.
    if plain and name in index.canonical:
        return index.canonical[name]
    block = _BLOCK_NAME.fullmatch(name)
    if block is not None:
        _no_second_layer(name, layer)
        l: Optional[int] = _check_layer(index, name, int(block.group(1)))
        return _lookup(index, name, f"blocks.{l}.{block.group(2)}", None, suggest)

    # 2-3. minterp and nnterp styles.
    target = _minterp_or_nnterp(index, name, layer) if layer_type is None else None
    if target is not None:
        return _lookup(index, name, target, layer, suggest)

    # 4. A name relative to a block.
    if "." in name or name.startswith("hook_"):
        if layer is not None:
            l = _check_layer(index, name, layer)
            return _lookup(index, name, f"blocks.{l}.{name}", layer, suggest)
        if plain:
            return _lookup(index, name, name, None, suggest)

    # 5. get_act_name short forms.
    embedded = _EMBEDDED_LAYER.fullmatch(name)
    if embedded is not None:
        _no_second_layer(name, layer)
        word, layer = embedded.group(1), int(embedded.group(2))
        layer_type = embedded.group(3) or layer_type
    else:
        word = name
    l = None if layer is None else _check_layer(index, name, layer)
    return _lookup(index, name, get_act_name(word, l, layer_type), layer, suggest)


def _minterp_or_nnterp(index: _HookIndex, name: str, layer: Optional[int]) -> Optional[str]:
    """The (not yet validated) full name of a minterp / nnterp spelling ``name`` (with the ``layer``
    argument, or ``None``), or ``None``."""
    minterp = _MINTERP_LAYER.fullmatch(name)
    if minterp is not None:
        if minterp.group(1) is not None:
            _no_second_layer(name, layer)
            layer = int(minterp.group(1))
        elif layer is None:
            raise ValueError(_needs_layer_message(index, name, "blocks.0.hook_resid_post"))
        return f"blocks.{_check_layer(index, name, layer)}.hook_resid_post"

    nnterp = _NNTERP_LAYER.fullmatch(name)
    if nnterp is not None:
        _no_second_layer(name, layer)
        l = _check_layer(index, name, int(nnterp.group(1)))
        module, port = nnterp.group(2), nnterp.group(3) or "output"
        if module is None:
            return f"blocks.{l}.hook_resid_{'pre' if port == 'input' else 'post'}"
        module = "attn" if module == "self_attn" else module
        return f"blocks.{l}.{module}.hook_{'in' if port == 'input' else 'out'}"

    match = _NNTERP_GLOBAL.fullmatch(name)
    word = match.group(1) if match is not None else name
    if word in ("embed", "embed_tokens", "lm_head", "logits", "ln_final", "norm") and layer is not None:
        raise ValueError(f"Hook {name!r} is not per-layer, so it takes no layer (got layer={layer}).")
    if word in ("embed", "embed_tokens"):
        return "hook_embed"
    if word in ("lm_head", "logits"):
        return "hook_unembed"
    if word in ("ln_final", "norm"):
        normalized = "ln_final.hook_normalized"
        return normalized if normalized in index.canonical else "ln_final.hook_out"
    return None


def _lookup(index: _HookIndex, asked: str, full: str, layer: Optional[int], suggest: bool = True) -> str:
    """The canonical name of ``full``, the full name that ``asked`` (as the caller wrote it, at the caller's
    ``layer``) was turned into, or the most helpful ``ValueError`` (listing the closest real names if
    ``suggest``)."""
    if full in index.canonical:
        return index.canonical[full]
    at = "" if layer is None else f" at layer {layer}"
    if f"blocks.0.{full}" in index.canonical:
        raise ValueError(_needs_layer_message(index, asked, f"blocks.0.{full}"))
    hint = _suggest(index, asked, layer) if suggest else ""
    if _is_standard(full):
        raise ValueError(
            f"Hook {asked!r}{at} means {full!r}, a standard hook name that does not exist on this "
            f"model: its architecture has no such activation.{hint}"
        )
    shown = "" if full == asked else f" (read as {full!r})"
    raise ValueError(f"Unknown hook name {asked!r}{at}{shown}.{hint}")


def _is_standard(full: str) -> bool:
    """Whether the full hook name ``full`` is a well-formed one that some TransformerLens models have."""
    layer, relative = _split_layer(full)
    if layer is None:
        return full in _STANDARD_GLOBAL_HOOKS or _STANDARD_BRIDGE_GLOBAL_HOOK.fullmatch(full) is not None
    return relative in _STANDARD_BLOCK_HOOKS or _STANDARD_BRIDGE_BLOCK_HOOK.fullmatch(relative) is not None


def _check_layer(index: _HookIndex, name: str, layer: int) -> int:
    """Range-check ``layer`` (of the hook ``name``, for the message) and turn a negative one into its
    positive index."""
    n = index.n_layers
    if not -n <= layer < n:
        raise ValueError(
            f"Layer {layer} of hook {name!r} is out of range: the model has n_layers={n}, so the layer "
            f"must be in 0..{n - 1} (or -{n}..-1 counting from the end)."
        )
    return layer % n


def _no_second_layer(name: str, layer: Optional[int]) -> None:
    """Raise if the ``layer`` argument is given for a ``name`` that already contains its layer."""
    if layer is not None:
        raise ValueError(f"The layer is given twice: inside {name!r} and as layer={layer}.")


def _needs_layer_message(index: _HookIndex, name: str, layer0: str) -> str:
    """The message for a per-layer ``name`` given without a layer; ``layer0`` is its full name at layer 0."""
    return (
        f"Hook {name!r} is per-layer and needs a layer (0..{index.n_layers - 1}, or negative), e.g. "
        f"resolve_name(model, {name!r}, 0) -> {index.canonical[layer0]!r}."
    )


def _suggest(index: _HookIndex, name: str, layer: Optional[int]) -> str:
    """The "closest real names" sentence for an unknown name ("" if there are none).

    Matches ``name`` (and ``blocks.{layer}.name``, and the word before an embedded layer) against every
    ``hook_dict`` name, the model's short-name vocabulary and the nnterp names of the layer in question;
    short names are shown with what they resolve to.
    """
    digits = re.search(r"-?\d+", name)
    example_layer = layer if layer is not None else int(digits.group()) if digits else 0
    if not -index.n_layers <= example_layer < index.n_layers:
        example_layer = 0

    queries = [name]
    if layer is not None:
        queries.append(f"blocks.{layer % index.n_layers}.{name}")
    embedded = _EMBEDDED_LAYER.fullmatch(name)
    if embedded is not None:
        queries.append(embedded.group(1))

    full_names = sorted(index.canonical)
    nnterp = [f"layers.{example_layer}{suffix}" for suffix in _NNTERP_SUFFIXES]
    words = list(index.vocabulary) + nnterp + [f"layer_{example_layer}"]
    found: list[str] = []
    for query in queries:
        found += difflib.get_close_matches(query, full_names, n=5)
        for word in difflib.get_close_matches(query, words, n=5):
            target = _try_resolve(index, word, None) or _try_resolve(index, word, example_layer)
            if target is not None:
                found.append(word if target == word else f"{word} (= {target})")
    unique = list(dict.fromkeys(found))
    if not unique:
        return ""
    return " Closest real names: " + ", ".join(unique[:8]) + "."


def _try_resolve(index: _HookIndex, name: str, layer: Optional[int]) -> Optional[str]:
    """:func:`_resolve` that returns ``None`` instead of raising."""
    try:
        return _resolve(index, name, layer, None, suggest=False)
    except ValueError:
        return None
