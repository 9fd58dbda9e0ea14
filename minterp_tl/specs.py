"""Layer, head and position specs: one safe parser for every way a caller names a set of indices.

Analyses ask "which layers / heads / positions?" and accept the answer as a *spec*, which is resolved
against ``n`` (``n_layers``, ``n_heads`` or the number of positions) into a list of non-negative
indices in ``range(n)``, in the order written:

- :func:`resolve` -- a spec -> ``list[int]``. Accepted specs (:data:`SpecLike`):

  - ``None`` or ``"all"``: every index;
  - an ``int``: one index, negatives counting from the end as in Python (``-1`` is the last);
  - a ``slice`` or ``range`` object: ``list(range(n))[s]`` for a slice; for a range, each of its values
    is an index (negatives allowed, out of range is an error);
  - a string, made of comma-separated items, each one of:

    - a named range (:data:`NAMED_RANGES`): ``"first_half"``, ``"second_half"``, ``"first_third"``,
      ``"middle_third"``, ``"last_third"``, ``"first"``, ``"last"``, ``"all"``;
    - an integer expression over ``n``: one index (``"3"``, ``"-1"``, ``"n-1"``, ``"(n+1)//2"``);
    - a slice ``"start:stop"`` / ``"start:stop:step"`` of such expressions, each part optional, with
      Python's slicing semantics (``":n//2"``, ``"n//3:2*n//3"``, ``"-n//4:"``, ``"::-1"``);

  - a :class:`Token` (or, when the prompt's ``tokens`` are given, any string that is not valid spec
    grammar): the positions of the consecutive prompt tokens that spell a text (``" Paris"``);
  - a list or tuple of any of the above (not nested): the results in order.

  A list whose items select the same index twice is an error: silent duplicates would be counted
  twice (in patching, for instance).
- :func:`resolve_positions` -- a position spec resolved on every prompt of a padded batch, each
  against its own tokens, shifted by the padding when it is on the left.
- :func:`check_spec` -- the syntax checks of :func:`resolve` without ``n`` (to validate a spec before a
  model is known).

Named ranges are the Python slices ``[:n//2]``, ``[n//2:]``, ``[:n//3]``, ``[n//3:2*n//3]``,
``[2*n//3:]``, ``[:1]``, ``[n-1:]`` and ``[:]`` of ``range(n)``, so a third of a 2-layer model is an
empty list, not an error.

Expression grammar (integers only, with Python's floor division and modulo)::

    expr  := term (('+' | '-') term)*
    term  := unary (('*' | '//' | '%') unary)*
    unary := ('-' | '+') unary | atom
    atom  := INT | 'n' | '(' expr ')'

Strings are never given to ``eval``, ``exec``, ``compile`` or ``ast``: this module has its own
tokenizer and recursive-descent parser, and hard bounds make hostile input fail fast with a
``ValueError``: a spec string has at most 256 characters, an integer literal at most 7 digits, the
nesting (parentheses and unary signs) at most 50 levels, and every intermediate value is at most
``10**12`` in magnitude (so no recursion error and no slow big-integer arithmetic).

A string is first read as spec grammar (after stripping surrounding whitespace); only if that fails,
and the prompt's ``tokens`` are given, is it read as a token string, unstripped (leading spaces are
part of tokens such as ``" Paris"``). So a string that is valid grammar -- ``"1"``, ``"n"``,
``"last"`` -- is never a token string: select such a token with ``Token("1")``.

Every failure is a ``ValueError`` that names the spec, says what is wrong and what would be valid.
"""

from __future__ import annotations

import difflib
import functools
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

NAMED_RANGES: tuple[str, ...] = (
    "all",
    "first",
    "last",
    "first_half",
    "second_half",
    "first_third",
    "middle_third",
    "last_third",
)
"""The named ranges a spec string may use as an item: ``all`` = ``[:]``, ``first`` = ``[:1]``,
``last`` = ``[n-1:]``, ``first_half`` = ``[:n//2]``, ``second_half`` = ``[n//2:]``, ``first_third`` =
``[:n//3]``, ``middle_third`` = ``[n//3:2*n//3]``, ``last_third`` = ``[2*n//3:]`` (slices of
``range(n)``)."""


@dataclass(frozen=True, repr=False)
class Token:
    """A position given by text: the span(s) of consecutive prompt tokens whose concatenation equals
    ``text``.

    The span ``i..j`` selects every position ``i, ..., j-1`` of the tokens that spell ``text``
    (``Token(" capital of")`` -> two positions). Matching is exact: whitespace counts (``" Paris"`` is
    not ``"Paris"``).

    Attributes:
        text: The text to find; a non-empty string.
        occurrence: Which span, when the text occurs several times: 0-based, negative counting from the
            end (``-1`` is the last). ``None`` (default) means the text must occur exactly once.
    """

    text: str
    occurrence: int | None = None

    def __post_init__(self) -> None:
        """Check the fields: ``text`` a non-empty str, ``occurrence`` an int or ``None``."""
        if not isinstance(self.text, str) or not self.text:
            raise ValueError(
                f"Token text must be a non-empty str (the text of one or more prompt tokens, such as "
                f"' Paris'), got {_show(self.text)}."
            )
        if self.occurrence is not None:
            occurrence = _as_int(self.occurrence)
            if occurrence is None:
                raise ValueError(
                    f"Token({self.text!r}) occurrence must be an int (0-based, -1 for the last) or "
                    f"None, got {_show(self.occurrence)}."
                )
            object.__setattr__(self, "occurrence", occurrence)

    def __repr__(self) -> str:
        """``Token(' Paris')`` or ``Token(' is', occurrence=1)``."""
        if self.occurrence is None:
            return f"Token({self.text!r})"
        return f"Token({self.text!r}, occurrence={_int_text(self.occurrence)})"


SpecLike = int | str | slice | range | Token | Sequence[int | str | slice | range | Token] | None
"""What :func:`resolve` accepts: ``None``, an int, a spec string, a ``slice``, a ``range``, a
:class:`Token`, or a list / tuple of ints, strings, slices, ranges and Tokens (see the module
docstring for each form)."""

_MAX_LENGTH = 256
_MAX_DIGITS = 7
_MAX_VALUE = 10**12
_MAX_DEPTH = 50

# The name of ``n`` in messages, by the ``what`` of the spec.
_N_NAMES: dict[str, str] = {
    "layer": "n_layers",
    "head": "n_heads",
    "position": "n_positions",
    "index": "n",
}
# The kinds of spec that may name positions by text (in check_spec, where no tokens are given).
_TOKEN_WHATS: frozenset[str] = frozenset({"position", "index"})

_NAMED_SLICES: dict[str, Callable[[int], slice]] = {
    "all": lambda n: slice(None),
    "first": lambda n: slice(None, 1),
    "last": lambda n: slice(n - 1, None),
    "first_half": lambda n: slice(None, n // 2),
    "second_half": lambda n: slice(n // 2, None),
    "first_third": lambda n: slice(None, n // 3),
    "middle_third": lambda n: slice(n // 3, 2 * n // 3),
    "last_third": lambda n: slice(2 * n // 3, None),
}

# At most this many prompt tokens are listed in a message (half from each end).
_SHOWN_TOKENS = 40


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def resolve(
    spec: SpecLike,
    n: int,
    *,
    tokens: Sequence[str] | None = None,
    what: str = "index",
) -> list[int]:
    """Resolve ``spec`` against ``n`` into a list of indices.

    Examples, with ``n=12``: ``None`` / ``"all"`` -> ``[0, ..., 11]``; ``-1`` / ``"last"`` /
    ``"n-1"`` -> ``[11]``; ``":n//2"`` / ``"first_half"`` / ``slice(None, 6)`` -> ``[0, ..., 5]``;
    ``"0, 5, -1"`` / ``[0, 5, -1]`` -> ``[0, 5, 11]``; ``"::-4"`` -> ``[11, 7, 3]``.

    Args:
        spec: The spec, any form of :data:`SpecLike` (see the module docstring).
        n: The number of layers / heads / positions; a positive int.
        tokens: The prompt's tokens as strings, one per position (so ``len(tokens) == n``), for
            :class:`Token` specs and token strings (``" Paris"``).
        what: The kind of index, for messages: ``"layer"``, ``"head"``, ``"position"`` or ``"index"``.

    Returns:
        The indices, each in ``range(n)``, in the order the spec gives them, without duplicates.

    Raises:
        ValueError: If ``what``, ``n`` or ``tokens`` is invalid, or the spec is malformed (the message
            lists the valid forms), out of range (the message gives ``n`` and the valid range), divides
            by zero, exceeds a bound, selects an index twice, or names text that the tokens do not
            spell (the message lists the tokens and the closest ones) or spell several times without
            an ``occurrence``.
    """
    n = _check_n(n, what)
    context = _Context(what=_check_what(what), n=n, tokens=_check_tokens(tokens, n, what))
    try:
        return _resolve_any(spec, context)
    except _SpecError as err:
        raise ValueError(f"{what} spec {_show(spec)}: {err}") from None


def resolve_positions(
    spec: SpecLike,
    tokens_per_prompt: Sequence[Sequence[str]],
    *,
    padding_side: str = "right",
    padded_length: int | None = None,
) -> list[list[int]]:
    """Resolve a position spec on every prompt of a padded batch.

    Each prompt is resolved against its own real tokens (``n = len(tokens)``, ``tokens=tokens``), so
    ``"last"`` is each prompt's own last real token, and the positions are then shifted into the padded
    batch: by ``padded_length - len(tokens)`` when the padding is on the left, not at all when it is on
    the right.

    Args:
        spec: A position spec (any :data:`SpecLike`).
        tokens_per_prompt: For each prompt, its real tokens as strings (no padding).
        padding_side: ``"right"`` (default) or ``"left"``: where the batch puts the padding.
        padded_length: The length of the padded batch; defaults to the longest prompt and must be at
            least that.

    Returns:
        For each prompt, its positions in the padded batch.

    Raises:
        ValueError: If ``padding_side`` or ``padded_length`` is invalid, a prompt is not a list of str or
            is empty, or the spec fails on a prompt (the message names the prompt index, then says why as
            :func:`resolve` does).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {_show(padding_side)}.")
    if isinstance(tokens_per_prompt, (str, bytes)) or not isinstance(tokens_per_prompt, Sequence):
        raise ValueError(  # noqa: TRY004 -- every failure here is a ValueError
            f"tokens_per_prompt must be a list with each prompt's tokens (a list of str), got "
            f"{_show(tokens_per_prompt)}."
        )
    prompts: list[Sequence[str]] = []
    for i, prompt_tokens in enumerate(tokens_per_prompt):
        if isinstance(prompt_tokens, str) or not isinstance(prompt_tokens, Sequence):
            raise ValueError(  # noqa: TRY004 -- every failure here is a ValueError
                f"prompt {i}: its tokens must be a list of str (e.g. model.to_str_tokens(prompt)), got "
                f"{_show(prompt_tokens)}."
            )
        if len(prompt_tokens) == 0:
            raise ValueError(f"prompt {i} has no tokens: a prompt needs at least one position.")
        prompts.append(prompt_tokens)
    longest = max((len(t) for t in prompts), default=0)
    if padded_length is None:
        padded_length = longest
    else:
        length = _as_int(padded_length)
        if length is None or length < longest:
            which = max(range(len(prompts)), key=lambda i: len(prompts[i]), default=None)
            raise ValueError(
                f"padded_length must be an int at least as long as the longest prompt (prompt {which}, "
                f"{longest} tokens), got {_show(padded_length)}."
            )
        padded_length = length

    result: list[list[int]] = []
    for i, prompt_tokens in enumerate(prompts):
        try:
            positions = resolve(spec, len(prompt_tokens), tokens=prompt_tokens, what="position")
        except ValueError as err:
            raise ValueError(f"prompt {i}: {err}") from None
        offset = padded_length - len(prompt_tokens) if padding_side == "left" else 0
        result.append([p + offset for p in positions])
    return result


def check_spec(spec: SpecLike, what: str = "index") -> None:
    """Check the syntax of ``spec`` without ``n``, as :func:`resolve` would.

    For validating a spec before a model is known: malformed specs raise the same ``ValueError`` as in
    :func:`resolve` (bad types, bad strings, zero slice steps, constant expressions that divide by
    zero or exceed the bounds). What depends on ``n`` -- range
    checks, duplicates, division by an expression in ``n`` -- is left to :func:`resolve`. Token strings
    and :class:`Token` objects are accepted for ``what`` ``"position"`` and ``"index"`` (their tokens
    are not known yet) and rejected for ``"layer"`` and ``"head"``.

    Args:
        spec: The spec, any form of :data:`SpecLike`.
        what: ``"layer"``, ``"head"``, ``"position"`` or ``"index"``.

    Raises:
        ValueError: If the spec is malformed whatever ``n`` is.
    """
    context = _Context(what=_check_what(what), n=None, tokens=None)
    try:
        _resolve_any(spec, context)
    except _SpecError as err:
        raise ValueError(f"{what} spec {_show(spec)}: {err}") from None


# --------------------------------------------------------------------------------------------
# Arguments and dispatch
# --------------------------------------------------------------------------------------------


class _SpecError(Exception):
    """A problem with a spec; the public functions turn it into a ``ValueError`` naming the spec."""


class _SyntaxProblem(_SpecError):
    """A spec string that is not spec grammar (with tokens given, it may still be a token string)."""


@dataclass
class _Context:
    """What a spec is resolved against.

    Attributes:
        what: ``"layer"``, ``"head"``, ``"position"`` or ``"index"``.
        n: The number of indices, or ``None`` when only checking syntax (:func:`check_spec`).
        tokens: The prompt's tokens, or ``None``.
        token_index: The tokens' :class:`_TokenIndex`, built on first use.
    """

    what: str
    n: int | None
    tokens: tuple[str, ...] | None
    token_index: _TokenIndex | None = field(default=None, repr=False)

    @property
    def n_text(self) -> str:
        """``"n_layers=30"`` and the like, for messages."""
        return f"{_N_NAMES[self.what]}={self.n}"


def _check_what(what: str) -> str:
    """Return ``what`` if it is a known kind of index.

    Args:
        what: The ``what`` argument.
    """
    if what not in _N_NAMES:
        raise ValueError(f"what must be one of {', '.join(map(repr, _N_NAMES))}; got {_show(what)}.")
    return what


def _check_n(n: int, what: str) -> int:
    """Return ``n`` as an int if it is a positive int.

    Args:
        n: The ``n`` argument.
        what: The kind of index, for the message.
    """
    value = _as_int(n)
    if value is None or value < 1:
        raise ValueError(
            f"n ({_N_NAMES[what]}, the number of {what}s) must be a positive int, got {_show(n)}."
        )
    return value


def _check_tokens(
    tokens: Sequence[str] | None, n: int, what: str
) -> tuple[str, ...] | None:
    """Return ``tokens`` as a tuple if it is ``None`` or ``n`` strings.

    Args:
        tokens: The ``tokens`` argument.
        n: The number of positions (already checked).
        what: The kind of index, for the message.
    """
    if tokens is None:
        return None
    if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Sequence):
        raise ValueError(  # noqa: TRY004 -- every failure here is a ValueError
            f"tokens must be the prompt's tokens as a list of str (e.g. model.to_str_tokens(prompt)), "
            f"got {_show(tokens)}."
        )
    result = tuple(tokens)
    for i, token in enumerate(result):
        if not isinstance(token, str):
            raise ValueError(f"tokens must all be str, but tokens[{i}] is {_show(token)}.")  # noqa: TRY004 -- every failure here is a ValueError
    if len(result) != n:
        raise ValueError(
            f"tokens has {len(result)} entries but {_N_NAMES[what]}={n}: pass the prompt's tokens, one "
            f"per position."
        )
    return result


def _as_int(value: object) -> int | None:
    """``value`` as an int if it is one (``operator.index``; bools are not), else ``None``.

    Args:
        value: Anything.
    """
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


def _resolve_any(spec: SpecLike, context: _Context) -> list[int]:
    """Resolve a spec of any form (``[]`` for everything when only checking, ``context.n is None``).

    Args:
        spec: The spec.
        context: What it is resolved against.
    """
    if spec is None:
        return _all(context)
    if isinstance(spec, bool):
        raise _SpecError(
            f"a bool is not a spec (True / False would silently mean index 1 / 0); pass an int. "
            f"{_valid_forms(context)}"
        )
    if isinstance(spec, str):
        return _resolve_string(spec, context)
    if isinstance(spec, Token):
        return _resolve_token(spec.text, spec.occurrence, context)
    if isinstance(spec, slice):
        return _resolve_slice_object(spec, context)
    if isinstance(spec, range):
        return _resolve_range(spec, context)
    if isinstance(spec, float):
        raise _SpecError(f"a float is not a spec; pass an int. {_valid_forms(context)}")
    index = _as_int(spec)
    if index is not None:
        return _resolve_index(index, None, context)
    if isinstance(spec, (list, tuple)):
        return _resolve_list(spec, context)
    raise _SpecError(f"unsupported type {type(spec).__name__}. {_valid_forms(context)}")


def _all(context: _Context) -> list[int]:
    """``list(range(n))`` (``[]`` when only checking).

    Args:
        context: What the spec is resolved against.
    """
    return [] if context.n is None else list(range(context.n))


def _resolve_index(index: int, source: str | None, context: _Context) -> list[int]:
    """One index, range-checked, negatives counting from the end.

    Args:
        index: The index.
        source: The spec text it comes from, for the message (``None`` for an int spec).
        context: What it is resolved against.
    """
    n = context.n
    if n is None:
        return []
    if not -n <= index < n:
        shown = _int_text(index)
        origin = "" if source is None or source == repr(shown) else f" (from {source})"
        raise _SpecError(
            f"{context.what} {shown}{origin} is out of range for {context.n_text} "
            f"(valid: -{n}..{n - 1}; negative indices count from the end)"
        )
    return [index % n]


def _resolve_slice_object(spec: slice, context: _Context) -> list[int]:
    """A Python ``slice``: ``list(range(n))[spec]``.

    Args:
        spec: The slice.
        context: What it is resolved against.
    """
    parts = []
    for name in ("start", "stop", "step"):
        value = getattr(spec, name)
        if value is not None:
            value = _as_int(value)
            if value is None:
                raise _SpecError(
                    f"slice {name} must be an int or None, got {_show(getattr(spec, name))}"
                )
        parts.append(value)
    if parts[2] == 0:
        raise _SpecError("slice step cannot be zero")
    if context.n is None:
        return []
    return list(range(context.n)[slice(*parts)])


def _resolve_range(spec: range, context: _Context) -> list[int]:
    """A ``range``: each value an index (range-checked, negatives counting from the end).

    Args:
        spec: The range.
        context: What it is resolved against.
    """
    n = context.n
    if n is None or len(spec) == 0:
        return []
    for bad in (spec[0], spec[-1]):  # the extremes of a range are its ends
        if not -n <= bad < n:
            _resolve_index(bad, _show(spec), context)
    result = [value % n for value in spec]
    if len(set(result)) != len(result):
        seen: dict[int, int] = {}
        for value, index in zip(spec, result):
            if index in seen:
                raise _SpecError(
                    f"{_show(spec)} selects {context.what} {index} twice (as {seen[index]} and {value}); "
                    f"select each {context.what} once"
                )
            seen[index] = value
    return result


def _resolve_list(spec: list | tuple, context: _Context) -> list[int]:
    """A list or tuple: its items resolved in order and concatenated, without duplicates.

    Args:
        spec: The list.
        context: What it is resolved against.
    """
    pieces: list[tuple[str, list[int]]] = []
    for k, item in enumerate(spec):
        label = f"item {k} ({_show(item)})"
        if item is None or isinstance(item, (list, tuple)):
            raise _SpecError(
                f"{label}: a list item must be an int, a spec string, a slice, a range or a Token "
                f"(lists do not nest, and None means 'all' only as the whole spec)"
            )
        try:
            pieces.append((label, _resolve_any(item, context)))
        except _SpecError as err:
            raise _SpecError(f"{label}: {err}") from None
    return _concat(pieces, context)


def _concat(pieces: list[tuple[str, list[int]]], context: _Context) -> list[int]:
    """Concatenate the indices of several items, refusing an index selected twice.

    Args:
        pieces: ``(label, indices)`` per item, the label naming the item for messages.
        context: What the spec is resolved against.
    """
    seen: dict[int, str] = {}
    result: list[int] = []
    for label, indices in pieces:
        for index in indices:
            if index in seen:
                raise _SpecError(
                    f"{context.what} {index} is selected twice, by {seen[index]} and by {label}: a "
                    f"duplicate would be counted twice (e.g. when patching); select each "
                    f"{context.what} once"
                )
            seen[index] = label
            result.append(index)
    return result


def _valid_forms(context: _Context) -> str:
    """The sentence listing the valid spec forms, for messages.

    Args:
        context: What the spec is resolved against.
    """
    text = (
        "Valid specs: None or 'all'; an int (negative counts from the end); a named range ("
        + ", ".join(NAMED_RANGES)
        + "); an integer expression over n ('3', 'n-1', '(n+1)//2', with + - * // % and "
        "parentheses); a slice 'start:stop:step' of such expressions (':n//2', 'n//3:2*n//3', "
        "'::-1'); a comma-separated list of these ('0, 5, -1'); a Python slice, range, or list of "
        "these."
    )
    if context.what in _TOKEN_WHATS:
        text += (
            " Token strings (' Paris') and Token(text, occurrence) need the prompt's tokens (pass "
            "tokens=... to resolve, or use resolve_positions)."
        )
    return text


# --------------------------------------------------------------------------------------------
# Spec strings: tokenizer, parser, evaluator
# --------------------------------------------------------------------------------------------


class _Lexeme(NamedTuple):
    """One token of a spec string.

    Attributes:
        kind: ``"int"``, ``"name"``, ``"op"`` (``+ - * // %``), ``"("``, ``")"``, ``":"``, ``","`` or
            ``"end"``.
        text: Its text.
        start: Its offset in the (stripped) spec string.
        end: The offset just after it.
    """

    kind: str
    text: str
    start: int
    end: int


class _Node(NamedTuple):
    """A node of an expression tree.

    Attributes:
        kind: ``"int"``, ``"n"``, ``"unary"``, ``"binary"`` or ``"paren"``.
        op: The operator of a unary / binary node (``"-"``, ``"//"``, ...), else ``""``.
        children: The operands.
        value: The value of an ``"int"`` node.
        start: Offset of the node's text in the spec string.
        end: Offset just after it.
    """

    kind: str
    op: str
    children: tuple[_Node, ...]
    value: int
    start: int
    end: int


class _Item(NamedTuple):
    """One comma-separated item of a spec string.

    Attributes:
        kind: ``"named"``, ``"index"`` or ``"slice"``.
        name: The named range, for ``"named"``.
        parts: The expression of an ``"index"`` (one node) or the start / stop / step of a
            ``"slice"`` (three nodes or ``None``).
        start: Offset of the item's text.
        end: Offset just after it.
    """

    kind: str
    name: str
    parts: tuple[_Node | None, ...]
    start: int
    end: int


def _resolve_string(spec: str, context: _Context) -> list[int]:
    """A spec string: spec grammar, else (with tokens) a token string.

    Args:
        spec: The string, as given.
        context: What it is resolved against.
    """
    try:
        items = _parse(spec)
    except _SyntaxProblem as err:
        token_ok = context.tokens is not None or (
            context.n is None and context.what in _TOKEN_WHATS
        )
        if spec and token_ok:
            if context.n is None:
                return []
            return _resolve_token(spec, None, context, str(err))
        raise _SyntaxProblem(f"not a valid spec: {err}. {_valid_forms(context)}") from None

    text = spec.strip()
    pieces: list[tuple[str, list[int]]] = []
    for item in items:
        source = text[item.start : item.end]
        try:
            pieces.append((repr(source), _resolve_item(item, text, context)))
        except _SpecError as err:
            hint = ""
            if context.tokens is not None and _index_tokens(context).spans(spec):
                hint = f" (to select the prompt tokens that spell {spec!r}, pass Token({spec!r}))"
            raise _SpecError(f"{err}{hint}") from None
    return _concat(pieces, context)


def _resolve_item(item: _Item, text: str, context: _Context) -> list[int]:
    """One item of a spec string.

    Args:
        item: The parsed item.
        text: The (stripped) spec string, for messages.
        context: What it is resolved against.
    """
    n = context.n
    source = text[item.start : item.end]
    if item.kind == "named":
        return [] if n is None else list(range(n)[_NAMED_SLICES[item.name](n)])
    if item.kind == "index":
        node = item.parts[0]
        assert node is not None
        value = _evaluate(node, text, context)
        return [] if value is None else _resolve_index(value, repr(source), context)
    start, stop, step = (
        None if node is None else _evaluate(node, text, context) for node in item.parts
    )
    if step == 0:
        raise _SpecError(f"slice step is zero in {source!r}; a step must be non-zero")
    if n is None:
        return []
    return list(range(n)[slice(start, stop, step)])


def _evaluate(node: _Node, text: str, context: _Context) -> int | None:
    """The value of an expression (``None`` if it needs ``n`` and ``n`` is not known).

    Every intermediate value is checked against the bound, and division / modulo by zero is refused.

    Args:
        node: The expression.
        text: The spec string, for messages.
        context: What it is resolved against (``n``).
    """
    kind = node.kind
    if kind == "int":
        value: int | None = node.value
    elif kind == "n":
        value = context.n
    elif kind == "paren":
        return _evaluate(node.children[0], text, context)
    elif kind == "unary":
        operand = _evaluate(node.children[0], text, context)
        value = None if operand is None else (-operand if node.op == "-" else operand)
    else:
        left = _evaluate(node.children[0], text, context)
        right = _evaluate(node.children[1], text, context)
        if right == 0 and node.op in ("//", "%"):
            at = "" if context.n is None else f" ({context.n_text})"
            raise _SpecError(f"division by zero in {text[node.start : node.end]!r}{at}")
        if left is None or right is None:
            value = None
        elif node.op == "+":
            value = left + right
        elif node.op == "-":
            value = left - right
        elif node.op == "*":
            value = left * right
        elif node.op == "//":
            value = left // right
        else:
            value = left % right
    if value is not None and abs(value) > _MAX_VALUE:
        at = "" if context.n is None or kind == "int" else f" with {context.n_text}"
        raise _SpecError(
            f"{text[node.start : node.end]!r} evaluates to {value}{at}, beyond the bound of 10**12 in "
            f"magnitude for any intermediate value"
        )
    return value


@functools.lru_cache(maxsize=1024)
def _parse(spec: str) -> tuple[_Item, ...]:
    """Parse a spec string into its items (cached; the string is stripped first).

    Args:
        spec: The spec string, as given.

    Raises:
        _SyntaxProblem: If it is too long, empty, or not spec grammar.
    """
    if len(spec) > _MAX_LENGTH:
        raise _SyntaxProblem(
            f"it is {len(spec)} characters long; a spec string has at most {_MAX_LENGTH}"
        )
    text = spec.strip()
    if not text:
        raise _SyntaxProblem("it is empty" if not spec else "it is only whitespace")
    return _Parser(text).items()


def _lex(text: str) -> list[_Lexeme]:
    """Split a spec string into lexemes, ending with an ``"end"`` lexeme.

    Args:
        text: The stripped spec string.

    Raises:
        _SyntaxProblem: On any character or sequence outside the grammar.
    """
    lexemes: list[_Lexeme] = []
    i, length = 0, len(text)
    while i < length:
        c = text[i]
        if c.isspace():
            i += 1
        elif "0" <= c <= "9":
            j = i
            while j < length and "0" <= text[j] <= "9":
                j += 1
            if j < length and (text[j].isalnum() or text[j] in "._"):
                k = j
                while k < length and (text[k].isalnum() or text[k] in "._"):
                    k += 1
                raise _SyntaxProblem(
                    f"{_clip(text[i:k])} is not an integer: only plain decimal integers are allowed "
                    f"(no floats, exponents or underscores; write 2*n, not 2n)"
                )
            if j - i > _MAX_DIGITS:
                raise _SyntaxProblem(
                    f"the integer {_clip(text[i:j])} has {j - i} digits; at most {_MAX_DIGITS} are "
                    f"allowed"
                )
            lexemes.append(_Lexeme("int", text[i:j], i, j))
            i = j
        elif c.isalpha() or c == "_":
            j = i + 1
            while j < length and (text[j].isalnum() or text[j] == "_"):
                j += 1
            lexemes.append(_Lexeme("name", text[i:j], i, j))
            i = j
        elif c == "/":
            if not text.startswith("//", i):
                raise _SyntaxProblem(
                    "'/' is not allowed: specs are integers, use '//' for floor division"
                )
            lexemes.append(_Lexeme("op", "//", i, i + 2))
            i += 2
        elif c == "*":
            if text.startswith("**", i):
                raise _SyntaxProblem("'**' (power) is not allowed; the operators are + - * // %")
            lexemes.append(_Lexeme("op", "*", i, i + 1))
            i += 1
        elif c in "+-%":
            lexemes.append(_Lexeme("op", c, i, i + 1))
            i += 1
        elif c in "():,":
            lexemes.append(_Lexeme(c, c, i, i + 1))
            i += 1
        elif c == ".":
            raise _SyntaxProblem("'.' is not allowed (no floats, no attributes)")
        elif c in "[]{}":
            raise _SyntaxProblem(
                f"{c!r} is not allowed: write a list as comma-separated items ('0, 5, -1') or pass a "
                f"Python list"
            )
        elif c in "'\"":
            raise _SyntaxProblem("quotes are not allowed inside a spec string")
        else:
            raise _SyntaxProblem(f"unexpected character {c!r} at offset {i}")
    lexemes.append(_Lexeme("end", "", length, length))
    return lexemes


class _Parser:
    """Recursive-descent parser of a spec string (see the grammar in the module docstring).

    Attributes:
        text: The stripped spec string.
        lexemes: Its lexemes.
        pos: Index of the next lexeme.
    """

    def __init__(self, text: str) -> None:
        """Tokenize ``text``.

        Args:
            text: The stripped spec string.
        """
        self.text = text
        self.lexemes = _lex(text)
        self.pos = 0

    def peek(self, ahead: int = 0) -> _Lexeme:
        """The lexeme ``ahead`` places after the next one (the ``"end"`` lexeme past the end).

        Args:
            ahead: How far to look.
        """
        return self.lexemes[min(self.pos + ahead, len(self.lexemes) - 1)]

    def take(self) -> _Lexeme:
        """Consume and return the next lexeme."""
        lexeme = self.lexemes[self.pos]
        self.pos += 1
        return lexeme

    def unexpected(self, lexeme: _Lexeme, expected: str) -> _SyntaxProblem:
        """The error for an unexpected lexeme.

        Args:
            lexeme: The lexeme found.
            expected: What was expected instead.
        """
        found = "the end of the spec" if lexeme.kind == "end" else f"{lexeme.text!r}"
        return _SyntaxProblem(f"expected {expected}, found {found} at offset {lexeme.start}")

    def items(self) -> tuple[_Item, ...]:
        """``items := item (',' item)*``, up to the end."""
        items = [self.item()]
        while True:
            lexeme = self.take()
            if lexeme.kind == "end":
                return tuple(items)
            if lexeme.kind != ",":
                raise self.unexpected(lexeme, "an operator, ':' or ','")
            items.append(self.item())

    def item(self) -> _Item:
        """``item := NAMED_RANGE | [expr] (':' [expr] (':' [expr])?)?``."""
        first = self.peek()
        if first.kind in (",", "end"):
            raise self.unexpected(first, "an item (an empty item is not allowed)")
        if first.kind == "name" and first.text != "n" and self.peek(1).kind in (",", "end"):
            self.take()
            if first.text in NAMED_RANGES:
                return _Item("named", first.text, (), first.start, first.end)
            raise _SyntaxProblem(self.unknown_name(first))
        parts: list[_Node | None] = [None if first.kind == ":" else self.expr(0)]
        while self.peek().kind == ":":
            if len(parts) == 3:
                raise _SyntaxProblem("a slice has at most two ':' (start:stop:step)")
            self.take()
            parts.append(None if self.peek().kind in (":", ",", "end") else self.expr(0))
        end = self.lexemes[self.pos - 1].end
        if len(parts) == 1:
            return _Item("index", "", tuple(parts), first.start, end)
        parts += [None] * (3 - len(parts))
        return _Item("slice", "", tuple(parts), first.start, end)

    def expr(self, depth: int) -> _Node:
        """``expr := term (('+' | '-') term)*``.

        Args:
            depth: The nesting depth so far.
        """
        node = self.term(depth)
        while self.peek().kind == "op" and self.peek().text in ("+", "-"):
            op = self.take().text
            right = self.term(depth)
            node = _Node("binary", op, (node, right), 0, node.start, right.end)
        return node

    def term(self, depth: int) -> _Node:
        """``term := unary (('*' | '//' | '%') unary)*``.

        Args:
            depth: The nesting depth so far.
        """
        node = self.unary(depth)
        while self.peek().kind == "op" and self.peek().text in ("*", "//", "%"):
            op = self.take().text
            right = self.unary(depth)
            node = _Node("binary", op, (node, right), 0, node.start, right.end)
        return node

    def unary(self, depth: int) -> _Node:
        """``unary := ('-' | '+') unary | atom``.

        Args:
            depth: The nesting depth so far.
        """
        lexeme = self.peek()
        if lexeme.kind == "op" and lexeme.text in ("+", "-"):
            self.check_depth(depth + 1)
            self.take()
            operand = self.unary(depth + 1)
            return _Node("unary", lexeme.text, (operand,), 0, lexeme.start, operand.end)
        return self.atom(depth)

    def atom(self, depth: int) -> _Node:
        """``atom := INT | 'n' | '(' expr ')'``.

        Args:
            depth: The nesting depth so far.
        """
        lexeme = self.take()
        if lexeme.kind == "int":
            return _Node("int", "", (), int(lexeme.text), lexeme.start, lexeme.end)
        if lexeme.kind == "name":
            if lexeme.text == "n":
                return _Node("n", "", (), 0, lexeme.start, lexeme.end)
            if self.peek().kind == "(":
                raise _SyntaxProblem(f"calls are not allowed ({lexeme.text!r}(...))")
            raise _SyntaxProblem(self.unknown_name(lexeme))
        if lexeme.kind == "(":
            self.check_depth(depth + 1)
            inner = self.expr(depth + 1)
            close = self.take()
            if close.kind != ")":
                raise self.unexpected(close, f"')' to close the '(' at offset {lexeme.start}")
            return _Node("paren", "", (inner,), 0, lexeme.start, close.end)
        raise self.unexpected(lexeme, "an integer, n or '('")

    def check_depth(self, depth: int) -> None:
        """Refuse nesting deeper than the bound.

        Args:
            depth: The nesting depth about to be entered.
        """
        if depth > _MAX_DEPTH:
            raise _SyntaxProblem(
                f"it nests parentheses and signs more than {_MAX_DEPTH} levels deep"
            )

    def unknown_name(self, lexeme: _Lexeme) -> str:
        """The message for a name that is neither ``n`` nor (alone) a named range.

        Args:
            lexeme: The name.
        """
        close = difflib.get_close_matches(lexeme.text, NAMED_RANGES + ("n",), n=3, cutoff=0.6)
        hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
        return (
            f"unknown name {lexeme.text!r}{hint}: an expression may only use the name n ('n-1', "
            f"'n//2'), and a named range ({', '.join(NAMED_RANGES)}) must stand alone as an item"
        )


# --------------------------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------------------------


class _TokenIndex:
    """The prompt's tokens joined into one string, with the token boundaries, to find spans fast.

    Attributes:
        tokens: The tokens.
        joined: Their concatenation.
        starts: Offset in ``joined`` -> index of the non-empty token that starts there.
        ends: Offset in ``joined`` -> index of the non-empty token that ends there.
    """

    def __init__(self, tokens: tuple[str, ...]) -> None:
        """Index ``tokens``.

        Args:
            tokens: The prompt's tokens.
        """
        self.tokens = tokens
        self.joined = "".join(tokens)
        self.starts: dict[int, int] = {}
        self.ends: dict[int, int] = {}
        offset = 0
        for i, token in enumerate(tokens):
            if token:
                self.starts[offset] = i
                offset += len(token)
                self.ends[offset] = i

    def spans(self, text: str) -> list[tuple[int, int]]:
        """Every ``(i, j)`` such that ``"".join(tokens[i:j]) == text``, by start.

        Spans start and end on non-empty tokens (empty tokens inside a span are part of it).

        Args:
            text: The text, non-empty.
        """
        result = []
        if not text:
            return result
        at = self.joined.find(text)
        while at >= 0:
            end = at + len(text)
            if at in self.starts and end in self.ends:
                result.append((self.starts[at], self.ends[end] + 1))
            at = self.joined.find(text, at + 1)
        return result

    def listing(self) -> str:
        """The tokens, for messages: all of them, or the first and last few of a long prompt."""
        shown = [_clip(token, 24) for token in self.tokens]
        if len(shown) > _SHOWN_TOKENS:
            half = _SHOWN_TOKENS // 2
            skipped = len(shown) - 2 * half
            shown = shown[:half] + [f"... {skipped} more ..."] + shown[-half:]
        return "[" + ", ".join(shown) + "]"

    def closest(self, text: str) -> list[str]:
        """The tokens and runs of 2-3 tokens that look most like ``text`` (at most 5).

        Args:
            text: The text that was not found.
        """
        if len(text) > _MAX_LENGTH:
            return []
        tokens = self.tokens[:1000]
        candidates = {t for t in tokens if t}
        for width in (2, 3):
            candidates |= {"".join(tokens[i : i + width]) for i in range(len(tokens) - width + 1)}
        return difflib.get_close_matches(text, sorted(candidates), n=5, cutoff=0.6)


def _index_tokens(context: _Context) -> _TokenIndex:
    """The :class:`_TokenIndex` of the context's tokens (built once per context).

    Args:
        context: A context with tokens.
    """
    if context.token_index is None:
        assert context.tokens is not None
        context.token_index = _TokenIndex(context.tokens)
    return context.token_index


def _resolve_token(
    text: str, occurrence: int | None, context: _Context, syntax: str | None = None
) -> list[int]:
    """The positions of the span of prompt tokens that spells ``text``.

    Args:
        text: The text (a :class:`Token`'s, or a string that is not spec grammar).
        occurrence: Which span (see :class:`Token`), or ``None`` for the only one.
        context: What it is resolved against.
        syntax: Why the string is not spec grammar, if it is a string (for the message).
    """
    shown = repr(Token(text, occurrence)) if syntax is None else repr(text)
    if context.n is None:  # check_spec
        if context.what not in _TOKEN_WHATS:
            raise _SpecError(
                f"{shown} selects positions by text; a {context.what} spec cannot be a Token. "
                f"{_valid_forms(context)}"
            )
        return []
    if context.tokens is None:
        raise _SpecError(
            f"{shown} selects positions by text and needs the prompt's tokens: pass tokens=... to "
            f"resolve, or use resolve_positions"
        )
    index = _index_tokens(context)
    spans = index.spans(text)
    if not spans:
        why = "" if syntax is None else f" (it is not a valid spec either: {syntax})"
        closest = index.closest(text)
        hint = f" Closest: {', '.join(map(repr, closest))}." if closest else ""
        raise _SpecError(
            f"no run of consecutive prompt tokens spells {_clip(text)}{why}. The prompt's "
            f"{len(index.tokens)} tokens: {index.listing()}.{hint}"
        )
    starts = [i for i, _ in spans]
    shown_starts = starts if len(starts) <= 20 else starts[:20] + ["..."]
    if occurrence is None:
        if len(spans) > 1:
            raise _SpecError(
                f"{_clip(text)} occurs {len(spans)} times in the prompt (starting at positions "
                f"{', '.join(map(str, shown_starts))}); pass Token({text!r}, occurrence=k) with k in "
                f"0..{len(spans) - 1} (or -1 for the last) to pick one"
            )
        occurrence = 0
    if not -len(spans) <= occurrence < len(spans):
        raise _SpecError(
            f"{shown}: the text occurs {len(spans)} time{'s' if len(spans) > 1 else ''} in the prompt "
            f"(starting at positions {', '.join(map(str, shown_starts))}), so the valid occurrences "
            f"are -{len(spans)}..{len(spans) - 1}"
        )
    i, j = spans[occurrence]
    return list(range(i, j))


# --------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------


def _clip(text: str, limit: int = 60) -> str:
    """``repr(text)``, shortened in the middle when long.

    Args:
        text: A string.
        limit: The longest repr shown whole.
    """
    shown = repr(text)
    if len(shown) <= limit:
        return shown
    return f"{shown[: limit - 20]}...{shown[-12:]} ({len(text)} chars)"


def _int_text(value: int) -> str:
    """``str(value)``, or a short stand-in for an int too large to print.

    Args:
        value: An int.
    """
    if abs(value) < 10**15:
        return str(value)
    return f"{'-' if value < 0 else ''}<int of {value.bit_length()} bits>"


def _show(value: object) -> str:
    """A short repr of any value, for messages (never raises).

    Args:
        value: Anything the caller passed.
    """
    if isinstance(value, str):
        return _clip(value, 80)
    try:
        shown = repr(value)
    except Exception:  # noqa: BLE001 -- a huge int (str conversion limit) or a broken __repr__
        return f"<{type(value).__name__}>"
    if len(shown) > 80:
        shown = f"{shown[:60]}...{shown[-12:]}"
    return shown
