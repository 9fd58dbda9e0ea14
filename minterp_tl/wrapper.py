"""ModelWrapper and Experiment: run phases on a TransformerBridge with only the hooks they need.

:meth:`ModelWrapper.run` takes a :class:`~minterp_tl.context.RepresentationContext` (prompts and
default specs) and a :class:`~minterp_tl.state.StateManager` (saved states, and each phase's
:class:`~minterp_tl.state.StateConfig`). It

1. tokenizes the prompts (strings one by one, padded on the right, so each prompt's positions are
   its own: right padding leaves a causal model's real positions untouched);
2. resolves every rule's layer / position / head specs and hook names against the model, and looks
   up and prepares every value a load rule writes -- bad names, specs and missing states fail here,
   before the forward pass (whether a value fits the activation is checked when its hook runs, with
   a ``ValueError`` naming both shapes);
3. installs one hook per hook point the phase touches (never a full ``run_with_cache``): loads are
   written first, then saves copy out just the selected positions / heads;
4. runs the forward pass, stores what was saved in the manager, pops / drops what the config says,
   and returns a :class:`RunResult` with the logits and this phase's saved tensors.

:class:`Experiment` runs a list of :class:`Phase` objects in order against one manager: a
clean -> corrupted patch is two phases, a steering run is one ``put`` and one phase, a logit lens is
one phase that saves every layer's last-position residual.

Numerics are the model's own (no LayerNorm folding): logits equal the underlying HF model's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional, Union, cast

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from minterp_tl._checks import text_tokens, token_ids
from minterp_tl.context import RepresentationContext
from minterp_tl.hooks import SWITCHES, gather, has_heads, hook_layout, layer_of, n_heads
from minterp_tl.interventions import BatchLayout, Intervention, Step, apply_step, resolve_steps
from minterp_tl.names import expand_name
from minterp_tl.specs import SpecLike, resolve, resolve_positions
from minterp_tl.state import LoadRule, SavedState, SaveRule, StateConfig, StateManager, format_key


@dataclass(frozen=True, eq=False)
class Batch:
    """Tokenized prompts.

    Attributes:
        tokens: ``[batch, pos]`` token ids, padded on the right.
        str_tokens: Each prompt's token strings (its real tokens only). Models without a tokenizer
            use the ids written as decimal strings.
        lengths: Each prompt's number of real tokens.
    """

    tokens: Int[Tensor, "batch pos"]
    str_tokens: tuple[tuple[str, ...], ...]
    lengths: tuple[int, ...]


@dataclass(eq=False)
class RunResult:
    """What one phase returns.

    Attributes:
        phase: The phase name.
        logits: ``[batch, pos, d_vocab]`` logits of the (patched) run, or ``None`` if not asked for.
        saved: ``{key: tensor}`` saved in this phase; keys are canonical hook names, ``"tag/name"``
            for tagged saves (the same tensors the manager holds).
        batch: The tokenized prompts.
        layers: ``{(tag, state as written in the rule): [(layer or None, canonical name), ...]}``,
            for :meth:`stack`.
    """

    phase: str
    logits: Optional[Float[Tensor, "batch pos d_vocab"]]
    saved: dict[str, Tensor]
    batch: Batch
    layers: dict[tuple[str, str], list[tuple[Optional[int], str]]] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Tensor:
        if key not in self.saved:
            raise KeyError(f"{key!r} was not saved in phase {self.phase!r}; saved: {list(self.saved)[:8]}")
        return self.saved[key]

    def stack(self, state: str, tag: str = "") -> Tensor:
        """The saves of ``state`` (as written in the rule, e.g. ``"resid_post"``) at every layer,
        stacked in layer order: ``[n_layers_saved, *saved shape]``."""
        entries = self.layers.get((tag, state))
        if not entries:
            raise ValueError(
                f"State {state!r} (tag {tag!r}) was not saved in phase {self.phase!r}; saved states: "
                f"{sorted({s for _, s in self.layers})}."
            )
        return torch.stack([self.saved[format_key(tag, name)] for _, name in entries])

    def last_logits(self) -> Float[Tensor, "batch d_vocab"]:
        """Each prompt's logits at its own last real token."""
        if self.logits is None:
            raise ValueError(f"Phase {self.phase!r} was run with return_logits=False.")
        last = torch.tensor(self.batch.lengths, device=self.logits.device) - 1
        return self.logits[torch.arange(len(last), device=self.logits.device), last]


@dataclass
class _Save:
    name: str
    key: tuple[str, str]
    positions: Optional[Tensor]
    heads: Optional[tuple[int, ...]]
    concat: bool


@dataclass
class _Plan:
    saves: dict[str, list[_Save]] = field(default_factory=dict)
    loads: dict[str, list[Step]] = field(default_factory=dict)  # load rules and interventions, in order
    pops: list[tuple[str, str]] = field(default_factory=list)
    layers: dict[tuple[str, str], list[tuple[Optional[int], str]]] = field(default_factory=dict)

    @property
    def hook_names(self) -> list[str]:
        return list(dict.fromkeys([*self.loads, *self.saves]))


class ModelWrapper:
    """Runs :class:`~minterp_tl.context.RepresentationContext` phases on a ``TransformerBridge``.

    Args:
        model: The model.
    """

    def __init__(self, model: TransformerBridge) -> None:
        if not isinstance(model, TransformerBridge):
            raise ValueError(f"ModelWrapper needs a TransformerBridge, got {type(model).__name__}.")
        self.model = model

    @property
    def n_layers(self) -> int:
        return int(self.model.cfg.n_layers)

    # ---- tokenization -------------------------------------------------------------------------
    def tokenize(self, context: RepresentationContext) -> Batch:
        """Tokenize ``context.prompts``: strings one by one, padded on the right (see :class:`Batch`)."""
        model, prompts = self.model, context.prompts
        device = model.cfg.device
        if isinstance(prompts, Tensor):
            rows = [row for row in token_ids(model, prompts, "prompts").to(device)]
        elif isinstance(prompts[0], str):
            if model.tokenizer is None:
                raise ValueError(
                    "This model has no tokenizer, so its prompts must be token ids (a [batch, pos] "
                    f"tensor or lists of ids), not strings like {prompts[0]!r}."
                )
            texts = [p for p in prompts if isinstance(p, str)]
            rows = [text_tokens(model, p, "prompt", context.prepend_bos)[0].to(device) for p in texts]
        else:
            rows = [
                token_ids(model, torch.tensor([p], dtype=torch.long), "prompt ids")[0].to(device)
                for p in prompts
            ]
        lengths = tuple(int(r.shape[0]) for r in rows)
        pad = 0
        if model.tokenizer is not None and model.tokenizer.pad_token_id is not None:
            pad = int(model.tokenizer.pad_token_id)
        tokens = torch.full((len(rows), max(lengths)), pad, dtype=torch.long, device=device)
        for i, r in enumerate(rows):
            tokens[i, : r.shape[0]] = r
        return Batch(tokens, tuple(self._str_tokens(r) for r in rows), lengths)

    def _str_tokens(self, ids: Tensor) -> tuple[str, ...]:
        if self.model.tokenizer is None:
            return tuple(str(int(t)) for t in ids)
        return tuple(str(t) for t in self.model.to_str_tokens(ids))

    # ---- running ------------------------------------------------------------------------------
    def run(
        self,
        context: RepresentationContext,
        state_manager: Optional[StateManager] = None,
        phase: Optional[str] = None,
        *,
        return_logits: bool = True,
    ) -> RunResult:
        """Run one phase.

        Args:
            context: The phase's prompts and default specs.
            state_manager: Where saved states live and where the phase's config is looked up. ``None``:
                a fresh manager (the saved states are still in the result).
            phase: The config to use: ``state_manager.config(phase)``. ``None``: ``context.name`` if the
                manager has a config of that name, else ``StateConfig(save=True)`` (save the context's
                ``states``).
            return_logits: Return the logits (else ``RunResult.logits`` is ``None``).

        Returns:
            A :class:`RunResult`. The manager now also holds this phase's saves.

        Raises:
            ValueError: Before the forward pass, for any bad name, spec or missing saved state; during
                it, if a loaded value does not fit the activation; after it, if a hook to save never ran
                (with the switch that turns it on, where there is one). Hooks are removed in every case.
        """
        manager = StateManager() if state_manager is None else state_manager
        name = phase if phase is not None else context.name
        if phase is not None:
            config = manager.config(phase)
        elif context.name and context.name in manager.configs:
            config = manager.configs[context.name]
        else:
            config = StateConfig(save=True)
        batch = self.tokenize(context)
        plan = self._plan(context, config, manager, batch)

        captured: dict[tuple[str, str], SavedState] = {}
        fired: set[str] = set()
        layout = BatchLayout(batch.lengths, int(batch.tokens.shape[1]), "right", batch.str_tokens)
        hooks: list[tuple[Union[str, Callable], Callable]] = [
            (h, self._hook_fn(h, plan, layout, captured, fired)) for h in plan.hook_names
        ]
        with torch.no_grad():
            logits = self.model.run_with_hooks(
                batch.tokens, fwd_hooks=hooks, return_type="logits" if return_logits else None
            )
        missing = [h for h in plan.hook_names if h not in fired]
        if missing:
            hints = sorted({f"{h}: needs {s}" for h in missing for k, s in SWITCHES.items() if h.endswith(k)})
            raise ValueError(
                f"Phase {name!r}: hook(s) {missing[:6]} did not run in this forward pass, so nothing "
                "was saved or loaded there." + (f" Switches: {hints}." if hints else "")
            )
        str_tokens = batch.str_tokens
        saved: dict[str, Tensor] = {}
        for key, state in captured.items():
            concat = any(s.concat for ss in plan.saves.values() for s in ss if s.key == key)
            manager.set(
                SavedState(
                    state.tensor,
                    state.name,
                    state.tag,
                    state.positions,
                    state.heads,
                    state.pos_axis,
                    state.head_axis,
                    str_tokens,
                ),
                concat=concat,
            )
            saved[format_key(*key)] = manager.get(key[1], tag=key[0])
        for tag, source in plan.pops:
            if (tag, source) in manager:
                manager.pop(source, tag=tag)
        for item in config.drop:
            manager.drop(item)
        return RunResult(name, logits if return_logits else None, saved, batch, plan.layers)

    @staticmethod
    def _hook_fn(hook_name: str, plan: _Plan, layout: BatchLayout, captured: dict, fired: set):
        steps, saves = plan.loads.get(hook_name, []), plan.saves.get(hook_name, [])

        def hook_fn(act: Tensor, hook=None) -> Tensor:
            fired.add(hook_name)
            for step in steps:
                act = apply_step(act, step, layout, hook)
            pos_axis, head_axis = hook_layout(hook_name, act.ndim)
            for save in saves:
                captured[save.key] = SavedState(
                    gather(act, pos_axis, head_axis, save.positions, save.heads),
                    save.name,
                    save.key[0],
                    save.positions,
                    save.heads,
                    pos_axis,
                    head_axis,
                )
            return act

        return hook_fn

    # ---- planning -----------------------------------------------------------------------------
    def _plan(
        self, context: RepresentationContext, config: StateConfig, manager: StateManager, batch: Batch
    ) -> _Plan:
        plan = _Plan()
        for rule in cast(tuple[SaveRule, ...], config.save):
            for state, layer, name in self._targets(rule, context):
                positions = self._positions(_pick(rule.positions, context.positions), batch, name)
                heads = self._heads(rule.heads, context.heads, name)
                key = (rule.tag, name)
                if any(s.key == key for ss in plan.saves.values() for s in ss):
                    raise ValueError(
                        f"Two save rules of this phase write the same state {format_key(*key)!r}; give "
                        "one of them a different tag."
                    )
                plan.saves.setdefault(name, []).append(_Save(name, key, positions, heads, rule.concat))
                plan.layers.setdefault((rule.tag, state), []).append((layer, name))
        for load in cast(tuple[LoadRule, ...], config.load):
            targets = self._targets(load, context)
            sources = self._sources(load, context, targets)
            for (_, _, name), source in zip(targets, sources):
                entry = manager.entry(source, tag=load.tag)
                positions = self._positions(_pick(load.positions, context.positions), batch, name)
                heads = self._heads(load.heads, context.heads, name)
                what = f"{format_key(load.tag, source)} into {name}"
                value = self._value(load, entry, positions, heads, batch, what)
                record = Intervention(
                    name, load.mode, value, positions=positions, heads=None if heads is None else list(heads)
                )
                plan.loads.setdefault(name, []).append(Step(name, record, heads, value, what))
                if load.pop:
                    plan.pops.append((load.tag, source))
        for i, record in enumerate(config.interventions):
            for step in resolve_steps(self.model, record, what=f"intervention #{i}"):
                plan.loads.setdefault(step.hook, []).append(step)
        return plan

    def _targets(
        self, rule: Union[SaveRule, LoadRule], context: RepresentationContext
    ) -> list[tuple[str, Optional[int], str]]:
        """``(state as written, layer, canonical name)`` for every hook a rule touches."""
        states = (rule.hook,) if rule.hook is not None else context.hooks
        layers = resolve(_pick(rule.layers, context.layers), self.n_layers, what="layer")
        out = []
        for state in states:
            for name in expand_name(self.model, state, layers):
                out.append((state, layer_of(name), name))
        return out

    def _sources(self, rule: LoadRule, context: RepresentationContext, targets: list) -> list[str]:
        if rule.source is not None:
            return [rule.source] * len(targets)
        if rule.source_layers is None:
            return [name for _, _, name in targets]
        src_layers = resolve(rule.source_layers, self.n_layers, what="layer")
        states = (rule.hook,) if rule.hook is not None else context.hooks
        out: list[str] = []
        for state in states:
            tgt = [t for t in targets if t[0] == state]
            src = expand_name(self.model, state, src_layers)
            if len(src) == 1:
                src = src * len(tgt)
            if len(src) != len(tgt):
                raise ValueError(
                    f"LoadRule source_layers={rule.source_layers!r} gives {len(src)} layer(s) but "
                    f"layers gives {len(tgt)} for state {state!r}; give one source layer or as many as "
                    "target layers."
                )
            out.extend(src)
        return out

    def _positions(self, spec: SpecLike, batch: Batch, name: str) -> Optional[Tensor]:
        """``[batch, k]`` positions for ``spec``, or ``None`` for every position."""
        if spec is None or (isinstance(spec, str) and spec.strip() == "all"):
            return None
        per_prompt = resolve_positions(
            spec, batch.str_tokens, padding_side="right", padded_length=batch.tokens.shape[1]
        )
        counts = {len(p) for p in per_prompt}
        if len(counts) != 1:
            raise ValueError(
                f"Position spec {spec!r} selects different numbers of positions in different prompts "
                f"({[len(p) for p in per_prompt]}) for {name}; a state must have the same number of "
                "positions for every prompt (use 'last', an index, or prompts of equal length)."
            )
        return torch.tensor(per_prompt, dtype=torch.long, device=batch.tokens.device)

    def _heads(self, rule_heads: SpecLike, context_heads: SpecLike, name: str) -> Optional[tuple[int, ...]]:
        spec = _pick(rule_heads, context_heads)
        if not has_heads(name):
            if rule_heads is not None and not (isinstance(rule_heads, str) and rule_heads.strip() == "all"):
                raise ValueError(
                    f"heads={rule_heads!r} was given for {name}, which has no head axis; heads apply to "
                    "q, k, v, z, result, pattern and attn_scores hooks."
                )
            return None
        if spec is None or (isinstance(spec, str) and spec.strip() == "all"):
            return None
        return tuple(resolve(spec, n_heads(self.model, name), what="head"))

    def _value(
        self,
        rule: LoadRule,
        entry: SavedState,
        positions: Optional[Tensor],
        heads: Optional[tuple[int, ...]],
        batch: Batch,
        what: str,
    ) -> Tensor:
        """The tensor a load rule writes: the saved selection it asks for, transformed."""
        value = entry.tensor
        if rule.source_positions is not None:
            value = self._source_positions(rule.source_positions, entry, what)
        elif positions is not None and entry.positions is None and entry.pos_axis is not None:
            # Same-position patching from a state saved at every position.
            n_saved = value.shape[entry.pos_axis]
            if int(positions.max()) >= n_saved:
                raise ValueError(
                    f"Cannot load {what}: position {int(positions.max())} of this run is past the "
                    f"{n_saved} saved positions; pass source_positions= to say which saved positions to use."
                )
            if value.shape[0] == positions.shape[0] or bool((positions == positions[:1]).all()):
                pos = (
                    positions
                    if value.shape[0] == positions.shape[0]
                    else positions[:1].expand(value.shape[0], -1)
                )
                value = gather(value, entry.pos_axis, None, pos, None)
            else:
                raise ValueError(
                    f"Cannot load {what}: the saved batch is {value.shape[0]} but this run's is "
                    f"{positions.shape[0]} and its positions differ between prompts."
                )
        if heads is not None and entry.head_axis is not None:
            if entry.heads is None:
                value = value.index_select(entry.head_axis, torch.as_tensor(heads, device=value.device))
            elif len(entry.heads) not in (1, len(heads)):
                raise ValueError(
                    f"Cannot load {what}: {len(entry.heads)} head(s) {list(entry.heads)} were saved but "
                    f"{len(heads)} head(s) {list(heads)} are selected here."
                )
        elif heads is None and entry.heads is not None and entry.head_axis is not None:
            raise ValueError(
                f"Cannot load {what}: only heads {list(entry.heads)} were saved; select heads to write "
                "them to (heads=...)."
            )
        if rule.transform is not None:
            value = rule.transform(value)
            if not isinstance(value, Tensor):
                raise ValueError(
                    f"LoadRule transform {rule.transform!r} returned {type(value).__name__}, not a tensor."
                )
        return value

    def _source_positions(self, spec: SpecLike, entry: SavedState, what: str) -> Tensor:
        if entry.pos_axis is None or entry.str_tokens is None:
            raise ValueError(
                f"Cannot load {what} with source_positions: the saved state has no recorded positions "
                "(it was put() without str_tokens / pos_axis)."
            )
        wanted = resolve_positions(spec, entry.str_tokens, padding_side="right")
        rows = []
        for i, want in enumerate(wanted):
            held = (
                list(range(entry.tensor.shape[entry.pos_axis]))
                if entry.positions is None
                else entry.positions[i].tolist()
            )
            missing = [p for p in want if p not in held]
            if missing:
                raise ValueError(
                    f"Cannot load {what}: source position(s) {missing} of prompt {i} were not saved "
                    f"(saved positions: {held})."
                )
            rows.append([held.index(p) for p in want])
        if len({len(r) for r in rows}) != 1:
            raise ValueError(
                f"Cannot load {what}: source_positions={spec!r} selects different counts per prompt."
            )
        index = torch.tensor(rows, dtype=torch.long, device=entry.tensor.device)
        return gather(entry.tensor, entry.pos_axis, None, index, None)


def _pick(rule_value: SpecLike, context_value: SpecLike) -> SpecLike:
    return context_value if rule_value is None else rule_value


# --------------------------------------------------------------------------------------------------
# Experiments
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Phase:
    """One step of an :class:`Experiment`: a name, a context and what it saves / loads."""

    name: str
    context: RepresentationContext
    config: StateConfig = field(default_factory=lambda: StateConfig(save=True))


@dataclass(eq=False)
class ExperimentResult:
    """The :class:`RunResult` of each phase (``result["clean"]``) and the manager afterwards."""

    results: dict[str, RunResult]
    manager: StateManager

    def __getitem__(self, phase: str) -> RunResult:
        if phase not in self.results:
            raise KeyError(f"No phase {phase!r}; phases: {list(self.results)}")
        return self.results[phase]


class Experiment:
    """Phases run in order against one :class:`~minterp_tl.state.StateManager`.

    Args:
        model: A ``TransformerBridge`` or a :class:`ModelWrapper`.
        phases: The phases; names must be unique.
        manager: The manager to use (e.g. one holding a steering vector); ``None``: a new one.

    Example (activation patching of the residual stream at the last position)::

        ctx = RepresentationContext(clean_prompts, layers="all", positions="last", hooks=("resid_pre",))
        res = Experiment(model, [
            Phase("clean", ctx, StateConfig(save=True)),
            Phase("patched", ctx.clone(prompts=corrupted_prompts, layers=6), StateConfig(load=True)),
        ]).run()
        res["patched"].last_logits()
    """

    def __init__(
        self,
        model: Union[TransformerBridge, ModelWrapper],
        phases: Sequence[Phase],
        manager: Optional[StateManager] = None,
    ) -> None:
        self.wrapper = model if isinstance(model, ModelWrapper) else ModelWrapper(model)
        names = [p.name for p in phases]
        if len(set(names)) != len(names):
            raise ValueError(f"Experiment phase names must be unique, got {names}.")
        self.phases = list(phases)
        self.manager = StateManager() if manager is None else manager
        for p in self.phases:
            self.manager.configure(p.name, p.config)

    def run(self, *, progress: bool = False) -> ExperimentResult:
        """Run every phase in order; ``progress`` shows a bar over phases."""
        results: dict[str, RunResult] = {}
        for p in tqdm(self.phases, desc="phases", disable=not progress):
            results[p.name] = self.wrapper.run(p.context, self.manager, phase=p.name)
        return ExperimentResult(results, self.manager)


__all__ = [
    "Batch",
    "Experiment",
    "ExperimentResult",
    "ModelWrapper",
    "Phase",
    "RunResult",
]
