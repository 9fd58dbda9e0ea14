"""Layer, head and position specs: one safe parser for every way a caller names a set of indices.

Analyses ask "which layers / heads / positions?" and accept the answer as a *spec*, resolved against ``n``
(``n_layers``, ``n_heads`` or the number of positions) into indices in ``range(n)``, in the order written.
:func:`resolve` accepts (:data:`SpecLike`):

- ``None`` or ``"all"``: every index; an ``int``: one index, negatives counting from the end (``-1`` is the
  last); a ``slice``: ``list(range(n))[s]``; a ``range``: each value an index (negatives allowed);
- a string of comma-separated items, each a named range (:data:`NAMED_RANGES`), an integer expression over
  ``n`` (``"3"``, ``"-1"``, ``"n-1"``, ``"(n+1)//2"``: one index) or a slice ``"start:stop:step"`` of such
  expressions, each part optional, with Python's slicing semantics (``":n//2"``, ``"-n//4:"``, ``"::-1"``);
- a :class:`Token` (or, when the prompt's ``tokens`` are given, any string that is not spec grammar): the
  positions of the consecutive prompt tokens that spell a text (``" Paris"``);
- a list or tuple of the above (not nested): the results in order. Selecting an index twice is an error (a
  silent duplicate would be counted twice, in patching for instance).

:func:`resolve_positions` resolves a position spec on every prompt of a padded batch; :func:`check_spec`
makes the syntax checks of :func:`resolve` without ``n``. Named ranges are the slices ``[:n//2]``,
``[n//2:]``, ``[:n//3]``, ``[n//3:2*n//3]``, ``[2*n//3:]``, ``[:1]``, ``[n-1:]`` and ``[:]`` of
``range(n)``, so a third of a 2-layer model is empty, not an error.

An expression has decimal integers, the name ``n``, unary ``+ -``, binary ``+ - * // %`` (Python's floor
division and modulo) and parentheses. A spec string is split on ``,`` (items) and ``:`` (slice parts), which
the grammar uses for nothing else; each expression is read by ``ast.parse`` and its tree checked against
that whitelist of nodes, then evaluated here: nothing is compiled or run (no ``compile``, ``eval`` or
``exec``). Hard bounds make hostile input fail fast: a spec string has at most 256 characters, an integer
literal at most 7 digits, the nesting (parentheses and unary signs) at most 50 levels, and every
intermediate value is at most ``10**12`` in magnitude.

A string is first read as spec grammar (stripped); only if that fails, and the prompt's ``tokens`` are
given, is it read as a token string, unstripped (leading spaces belong to tokens such as ``" Paris"``). So
``"1"``, ``"n"`` or ``"last"`` is never a token string: select such a token with ``Token("1")``.

Every failure is a ``ValueError`` that names the spec, says what is wrong and what would be valid.
"""

from __future__ import annotations

import ast
import functools
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from minterp_tl._checks import did_you_mean
from minterp_tl._spec_tokens import (
    SpecError,
    TokenIndex,
    check_prompts,
    check_tokens,
    clip,
    int_text,
    resolve_token,
    show,
    token_repr,
)

__all__ = ["NAMED_RANGES", "SpecLike", "Token", "check_spec", "resolve", "resolve_positions"]

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
"""The named ranges a spec string may use as an item: ``all`` = ``[:]``, ``first`` = ``[:1]``, ``last`` =
``[n-1:]``, ``first_half`` = ``[:n//2]``, ``second_half`` = ``[n//2:]``, ``first_third`` = ``[:n//3]``,
``middle_third`` = ``[n//3:2*n//3]``, ``last_third`` = ``[2*n//3:]`` (slices of ``range(n)``)."""


@dataclass(frozen=True, repr=False)
class Token:
    """A position given by text: the span(s) of consecutive prompt tokens whose concatenation is ``text``.

    The span ``i..j`` selects every position ``i, ..., j-1`` (``Token(" capital of")`` -> two positions).
    Matching is exact: whitespace counts (``" Paris"`` is not ``"Paris"``).

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
                f"' Paris'), got {show(self.text)}."
            )
        if self.occurrence is not None:
            if _as_int(self.occurrence) is None:
                raise ValueError(
                    f"Token({self.text!r}) occurrence must be an int (0-based, -1 for the last) or None, "
                    f"got {show(self.occurrence)}."
                )
            object.__setattr__(self, "occurrence", _as_int(self.occurrence))

    def __repr__(self) -> str:
        """``Token(' Paris')`` or ``Token(' is', occurrence=1)``."""
        return token_repr(self.text, self.occurrence)


SpecLike = int | str | slice | range | Token | Sequence[int | str | slice | range | Token] | None
"""What :func:`resolve` accepts: ``None``, an int, a spec string, a ``slice``, a ``range``, a
:class:`Token`, or a list / tuple of ints, strings, slices, ranges and Tokens."""

_MAX_LENGTH, _MAX_DIGITS, _MAX_VALUE, _MAX_DEPTH = 256, 7, 10**12, 50
_N_NAMES: dict[str, str] = {"layer": "n_layers", "head": "n_heads", "position": "n_positions", "index": "n"}
_TOKEN_WHATS = frozenset({"position", "index"})  # the kinds of spec that may name positions by text
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


def resolve(spec: SpecLike, n: int, *, tokens: Sequence[str] | None = None, what: str = "index") -> list[int]:
    """Resolve ``spec`` against ``n`` into a list of indices.

    Examples, with ``n=12``: ``None`` / ``"all"`` -> ``[0, ..., 11]``; ``-1`` / ``"last"`` / ``"n-1"`` ->
    ``[11]``; ``":n//2"`` / ``"first_half"`` / ``slice(None, 6)`` -> ``[0, ..., 5]``; ``"0, 5, -1"`` /
    ``[0, 5, -1]`` -> ``[0, 5, 11]``; ``"::-4"`` -> ``[11, 7, 3]``.

    Args:
        spec: The spec, any form of :data:`SpecLike` (see the module docstring).
        n: The number of layers / heads / positions; a positive int.
        tokens: The prompt's tokens as strings, one per position (so ``len(tokens) == n``), for
            :class:`Token` specs and token strings (``" Paris"``).
        what: The kind of index, for messages: ``"layer"``, ``"head"``, ``"position"`` or ``"index"``.

    Returns:
        The indices, each in ``range(n)``, in the order the spec gives them, without duplicates.

    Raises:
        ValueError: If ``what``, ``n`` or ``tokens`` is invalid, or the spec is malformed (the message lists
            the valid forms), out of range (the message gives ``n`` and the valid range), divides by zero,
            exceeds a bound, selects an index twice, or names text that the tokens do not spell (the message
            lists the tokens and the closest ones) or spell several times without an ``occurrence``.
    """
    _check_what(what)
    value = _as_int(n)
    if value is None or value < 1:
        raise ValueError(
            f"n ({_N_NAMES[what]}, the number of {what}s) must be a positive int, got {show(n)}."
        )
    return _run(spec, _Context(what, value, check_tokens(tokens, value, _N_NAMES[what])))


def resolve_positions(
    spec: SpecLike,
    tokens_per_prompt: Sequence[Sequence[str]],
    *,
    padding_side: str = "right",
    padded_length: int | None = None,
) -> list[list[int]]:
    """Resolve a position spec on every prompt of a padded batch.

    Each prompt is resolved against its own real tokens (``n = len(tokens)``, ``tokens=tokens``), so
    ``"last"`` is each prompt's own last real token; the positions are then shifted into the padded batch,
    by ``padded_length - len(tokens)`` when the padding is on the left, not at all when on the right.

    Args:
        spec: A position spec (any :data:`SpecLike`).
        tokens_per_prompt: For each prompt, its real tokens as strings (no padding).
        padding_side: ``"right"`` (default) or ``"left"``: where the batch puts the padding.
        padded_length: The length of the padded batch; defaults to (and must be at least) the longest prompt.

    Returns:
        For each prompt, its positions in the padded batch.

    Raises:
        ValueError: If ``padding_side`` or ``padded_length`` is invalid, a prompt is not a list of str or is
            empty, or the spec fails on a prompt (the message names the prompt, then says why).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {show(padding_side)}.")
    check_prompts(tokens_per_prompt)
    lengths = [len(prompt) for prompt in tokens_per_prompt]
    longest = max(lengths, default=0)
    length = longest if padded_length is None else _as_int(padded_length)
    if length is None or length < longest:
        raise ValueError(
            f"padded_length must be an int at least as long as the longest prompt (prompt "
            f"{lengths.index(longest) if lengths else None}, {longest} tokens), got {show(padded_length)}."
        )
    result: list[list[int]] = []
    for i, prompt in enumerate(tokens_per_prompt):
        try:
            positions = resolve(spec, len(prompt), tokens=prompt, what="position")
        except ValueError as err:
            raise ValueError(f"prompt {i}: {err}") from None
        offset = length - len(prompt) if padding_side == "left" else 0
        result.append([p + offset for p in positions])
    return result


def check_spec(spec: SpecLike, what: str = "index") -> None:
    """Check the syntax of ``spec`` without ``n``, as :func:`resolve` would.

    Malformed specs raise the same ``ValueError`` as in :func:`resolve` (bad types, bad strings, zero slice
    steps, constant expressions that divide by zero or exceed the bounds). What depends on ``n`` -- range
    checks, duplicates, division by an expression in ``n`` -- is left to :func:`resolve`. Token strings and
    :class:`Token` objects are accepted for ``what`` ``"position"`` and ``"index"`` (their tokens are not
    known yet) and rejected for ``"layer"`` and ``"head"``.

    Args:
        spec: The spec, any form of :data:`SpecLike`.
        what: ``"layer"``, ``"head"``, ``"position"`` or ``"index"``.

    Raises:
        ValueError: If the spec is malformed whatever ``n`` is.
    """
    _run(spec, _Context(_check_what(what), None, None))


# --------------------------------------------------------------------------------------------------------
# Arguments and the forms of a spec
# --------------------------------------------------------------------------------------------------------


class _SyntaxProblem(SpecError):
    """A spec string that is not spec grammar (with tokens given, it may still be a token string)."""


@dataclass
class _Context:
    """What a spec is resolved against: the kind of index ``what``, ``n`` (``None`` when only checking
    syntax) and the prompt's ``tokens``, indexed (or ``None``)."""

    what: str
    n: int | None
    tokens: TokenIndex | None

    @property
    def n_text(self) -> str:
        """``"n_layers=30"`` and the like, for messages."""
        return f"{_N_NAMES[self.what]}={self.n}"


def _run(spec: SpecLike, context: _Context) -> list[int]:
    """Resolve ``spec`` in ``context``, a problem raised as a ``ValueError`` naming the spec."""
    try:
        return _resolve_any(spec, context)
    except SpecError as err:
        raise ValueError(f"{context.what} spec {show(spec)}: {err}") from None


def _check_what(what: str) -> str:
    """``what`` if it is a known kind of index, else a ``ValueError``."""
    if what not in _N_NAMES:
        raise ValueError(f"what must be one of {', '.join(map(repr, _N_NAMES))}; got {show(what)}.")
    return what


def _as_int(value: object) -> int | None:
    """``value`` as an int if it is one (``operator.index``; bools are not), else ``None``."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


def _resolve_any(spec: SpecLike, context: _Context) -> list[int]:
    """Resolve a spec of any form (``[]`` when only checking, ``context.n is None``)."""
    if spec is None:
        return [] if context.n is None else list(range(context.n))
    if isinstance(spec, (bool, float)):
        problem = "bool is not a spec (True / False would silently mean index 1 / 0)"
        problem = problem if isinstance(spec, bool) else "float is not a spec"
        raise SpecError(f"a {problem}; pass an int. {_valid_forms(context)}")
    if isinstance(spec, str):
        return _resolve_string(spec, context)
    if isinstance(spec, Token):
        if context.n is None and context.what not in _TOKEN_WHATS:  # check_spec
            raise SpecError(
                f"{token_repr(spec.text, spec.occurrence)} selects positions by text; a {context.what} spec "
                f"cannot be a Token. {_valid_forms(context)}"
            )
        return [] if context.n is None else resolve_token(spec.text, spec.occurrence, context.tokens)
    if isinstance(spec, slice):
        parts = [None if part is None else _as_int(part) for part in (spec.start, spec.stop, spec.step)]
        for name, part, value in zip(("start", "stop", "step"), (spec.start, spec.stop, spec.step), parts):
            if part is not None and value is None:
                raise SpecError(f"slice {name} must be an int or None, got {show(part)}")
        if parts[2] == 0:
            raise SpecError("slice step cannot be zero")
        return [] if context.n is None else list(range(context.n)[slice(*parts)])
    if isinstance(spec, range):
        return _resolve_range(spec, context)
    if _as_int(spec) is not None:
        return _resolve_index(_as_int(spec), None, context)  # type: ignore[arg-type]
    if isinstance(spec, (list, tuple)):
        pieces: list[tuple[str, list[int]]] = []
        for k, item in enumerate(spec):
            label = f"item {k} ({show(item)})"
            if item is None or isinstance(item, (list, tuple)):
                raise SpecError(
                    f"{label}: a list item must be an int, a spec string, a slice, a range or a Token (lists "
                    f"do not nest, and None means 'all' only as the whole spec)"
                )
            try:
                pieces.append((label, _resolve_any(item, context)))
            except SpecError as err:
                raise SpecError(f"{label}: {err}") from None
        return _concat(pieces, context)
    raise SpecError(f"unsupported type {type(spec).__name__}. {_valid_forms(context)}")


def _resolve_index(index: int, source: str | None, context: _Context) -> list[int]:
    """One index, range-checked, negatives counting from the end; ``source`` is the spec text it comes from
    (``None`` for an int spec)."""
    n = context.n
    if n is None:
        return []
    if not -n <= index < n:
        shown = int_text(index)
        origin = "" if source is None or source == repr(shown) else f" (from {source})"
        raise SpecError(
            f"{context.what} {shown}{origin} is out of range for {context.n_text} (valid: -{n}..{n - 1}; "
            f"negative indices count from the end)"
        )
    return [index % n]


def _resolve_range(spec: range, context: _Context) -> list[int]:
    """A ``range``: each value an index (range-checked, negatives counting from the end), none twice."""
    n = context.n
    if n is None or len(spec) == 0:
        return []
    for end in (spec[0], spec[-1]):  # the extremes of a range are its ends
        _resolve_index(end, show(spec), context)
    seen: dict[int, int] = {}
    for value in spec:
        if value % n in seen:
            raise SpecError(
                f"{show(spec)} selects {context.what} {value % n} twice (as {seen[value % n]} and {value}); "
                f"select each {context.what} once"
            )
        seen[value % n] = value
    return list(seen)


def _concat(pieces: list[tuple[str, list[int]]], context: _Context) -> list[int]:
    """Concatenate the ``(label, indices)`` of several items, refusing an index selected twice."""
    seen: dict[int, str] = {}
    for label, indices in pieces:
        for index in indices:
            if index in seen:
                raise SpecError(
                    f"{context.what} {index} is selected twice, by {seen[index]} and by {label}: a duplicate "
                    f"would be counted twice (e.g. when patching); select each {context.what} once"
                )
            seen[index] = label
    return list(seen)


def _valid_forms(context: _Context) -> str:
    """The sentence listing the valid spec forms, for messages."""
    text = (
        f"Valid specs: None or 'all'; an int (negative counts from the end); a named range "
        f"({', '.join(NAMED_RANGES)}); an integer expression over n ('3', 'n-1', '(n+1)//2', with + - * // % "
        f"and parentheses); a slice 'start:stop:step' of such expressions (':n//2', 'n//3:2*n//3', '::-1'); "
        f"a comma-separated list of these ('0, 5, -1'); a Python slice, range, or list of these."
    )
    if context.what in _TOKEN_WHATS:
        text += (
            " Token strings (' Paris') and Token(text, occurrence) need the prompt's tokens (pass "
            "tokens=... to resolve, or use resolve_positions)."
        )
    return text


# --------------------------------------------------------------------------------------------------------
# Spec strings: split into items and slice parts; expressions read by ast.parse, checked on a whitelist
# --------------------------------------------------------------------------------------------------------

_OPERATORS: dict[type[ast.operator], Callable[[int, int], int]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_REFUSED_OPERATORS: dict[type[ast.operator], str] = {
    ast.Div: "'/' is not allowed: specs are integers, use '//' for floor division",
    ast.Pow: "'**' (power) is not allowed; the operators are + - * // %",
}
_NUMBER = re.compile(r"(?<![\w.])[0-9][\w.]*")  # a literal and what sticks to it ("1.5", "0x10", "2n")
_LEADING_ZEROS = re.compile(r"(?<![\w.])0+(?=[0-9])")  # "007" is 7 (Python's parser refuses it)
_CHARACTER_PROBLEMS: dict[str, str] = {  # what ast.parse would hide (comments) or explain less well
    **dict.fromkeys(
        "[]{}", "is not allowed: write a list as comma-separated items ('0, 5, -1') or pass a Python list"
    ),
    **dict.fromkeys("'\"", "(a quote) is not allowed inside a spec string"),
    ".": "is not allowed (no floats, no attributes)",
    "#": "is not allowed",
}


class _Item(NamedTuple):
    """One comma-separated item of a spec string: its stripped ``source`` (for messages), and either the
    ``named`` range or the ``parts``: one ``(tree, text)`` expression (an index) or three, each ``None``
    when left out (a slice's start, stop and step)."""

    source: str
    named: str
    parts: tuple[tuple[ast.expr, str] | None, ...]


def _resolve_string(spec: str, context: _Context) -> list[int]:
    """A spec string: spec grammar, else (with tokens, or when checking positions) a token string."""
    try:
        items = _parse(spec)
    except _SyntaxProblem as err:
        if spec and (context.tokens is not None or (context.n is None and context.what in _TOKEN_WHATS)):
            return [] if context.n is None else resolve_token(spec, None, context.tokens, str(err))
        raise _SyntaxProblem(f"not a valid spec: {err}. {_valid_forms(context)}") from None
    pieces: list[tuple[str, list[int]]] = []
    for item in items:
        try:
            pieces.append((repr(item.source), _resolve_item(item, context)))
        except SpecError as err:
            hint = ""
            if context.tokens is not None and context.tokens.spans(spec):
                hint = f" (to select the prompt tokens that spell {spec!r}, pass Token({spec!r}))"
            raise SpecError(f"{err}{hint}") from None
    return _concat(pieces, context)


def _resolve_item(item: _Item, context: _Context) -> list[int]:
    """One item of a spec string: a named range, an index or a slice."""
    n = context.n
    if item.named:
        return [] if n is None else list(range(n)[_NAMED_SLICES[item.named](n)])
    values = [None if part is None else _evaluate(*part, context) for part in item.parts]
    if len(values) == 1:
        return [] if values[0] is None else _resolve_index(values[0], repr(item.source), context)
    if values[2] == 0:
        raise SpecError(f"slice step is zero in {item.source!r}; a step must be non-zero")
    return [] if n is None else list(range(n)[slice(*values)])


def _evaluate(node: ast.expr, text: str, context: _Context) -> int | None:
    """The value of a whitelisted expression ``node`` of ``text`` (``None`` if it needs ``n`` and ``n`` is
    not known), every intermediate value checked against the bound and division by zero refused."""
    value: int | None
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        value = node.value
    elif isinstance(node, ast.Name):
        value = context.n
    elif isinstance(node, ast.UnaryOp):
        operand = _evaluate(node.operand, text, context)
        value = None if operand is None else (-operand if isinstance(node.op, ast.USub) else operand)
    else:
        assert isinstance(node, ast.BinOp)
        left, right = _evaluate(node.left, text, context), _evaluate(node.right, text, context)
        if right == 0 and isinstance(node.op, (ast.FloorDiv, ast.Mod)):
            at = "" if context.n is None else f" ({context.n_text})"
            raise SpecError(f"division by zero in {ast.get_source_segment(text, node)!r}{at}")
        value = None if left is None or right is None else _OPERATORS[type(node.op)](left, right)
    if value is not None and abs(value) > _MAX_VALUE:
        at = "" if context.n is None or isinstance(node, ast.Constant) else f" with {context.n_text}"
        raise SpecError(
            f"{ast.get_source_segment(text, node)!r} evaluates to {value}{at}, beyond the bound of 10**12 in "
            f"magnitude for any intermediate value"
        )
    return value


@functools.lru_cache(maxsize=1024)
def _parse(spec: str) -> tuple[_Item, ...]:
    """Parse a spec string (stripped first) into its items, or raise a :class:`_SyntaxProblem`.

    A pre-pass over the whole string refuses, before anything reaches ``ast.parse``, what is too long, the
    literals that are not short decimal integers, and the characters of :data:`_CHARACTER_PROBLEMS`.
    """
    if len(spec) > _MAX_LENGTH:
        raise _SyntaxProblem(f"it is {len(spec)} characters long; a spec string has at most {_MAX_LENGTH}")
    text = spec.strip()
    if not text:
        raise _SyntaxProblem("it is empty" if not spec else "it is only whitespace")
    for number in _NUMBER.findall(text):
        if not (number.isascii() and number.isdigit()):
            raise _SyntaxProblem(
                f"{clip(number)} is not an integer: only plain decimal integers are allowed (no floats, "
                f"exponents or underscores; write 2*n, not 2n)"
            )
        if len(number) > _MAX_DIGITS:
            raise _SyntaxProblem(
                f"the integer {clip(number)} has {len(number)} digits; at most {_MAX_DIGITS} are allowed"
            )
    for c in text:
        if c in _CHARACTER_PROBLEMS:
            raise _SyntaxProblem(f"{c!r} {_CHARACTER_PROBLEMS[c]}")
    items = []
    for source in (piece.strip() for piece in text.split(",")):
        if not source:
            raise _SyntaxProblem("an empty item is not allowed (as in '1,,2' or '1,')")
        if source in NAMED_RANGES:
            items.append(_Item(source, source, ()))
            continue
        parts = source.split(":")
        if len(parts) > 3:
            raise _SyntaxProblem(f"a slice has at most two ':' (start:stop:step), got {clip(source)}")
        if len(parts) > 1:
            parts += [""] * (3 - len(parts))  # a slice: start, stop, step, each None when left out
        items.append(_Item(source, "", tuple(_expression(part) if part.strip() else None for part in parts)))
    return tuple(items)


def _expression(part: str) -> tuple[ast.expr, str]:
    """Read one expression with ``ast.parse``, check its tree, and return it with the text it was read
    from (whitespace made plain spaces, leading zeros dropped)."""
    text = _LEADING_ZEROS.sub("", re.sub(r"\s", " ", part)).strip()
    try:
        tree = ast.parse(text, mode="eval").body
    except (SyntaxError, RecursionError, MemoryError, ValueError) as err:
        why = err.msg if isinstance(err, SyntaxError) else type(err).__name__
        raise _SyntaxProblem(f"{clip(part.strip())} is not an expression ({why})") from None
    _check_node(tree, text, 0)
    return tree, text


def _check_node(node: ast.expr, text: str, signs: int) -> None:
    """Refuse a node of ``text`` outside the whitelist, and nesting (``signs`` unary signs above the node,
    plus the parentheses open before a leaf) deeper than the bound."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        return _check_node(node.operand, text, signs + 1)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        _check_node(node.left, text, signs)
        return _check_node(node.right, text, signs)
    segment = ast.get_source_segment(text, node) or ""
    if isinstance(node, ast.BinOp) and type(node.op) in _REFUSED_OPERATORS:
        raise _SyntaxProblem(_REFUSED_OPERATORS[type(node.op)])
    if isinstance(node, (ast.BinOp, ast.UnaryOp)):
        raise _SyntaxProblem(f"{segment!r} uses an operator that is not allowed: use + - * // %")
    if isinstance(node, ast.Call):
        raise _SyntaxProblem(f"calls are not allowed ({segment!r})")
    # The text decides: Python reads "ｎ" as the name n, and True or None as constants.
    if isinstance(node, (ast.Name, ast.Constant)) and segment != "n" and not segment.isdigit():
        raise _SyntaxProblem(
            f"unknown name {segment!r}{did_you_mean(segment, NAMED_RANGES + ('n',))}: an expression may only "
            f"use the name n ('n-1', 'n//2'), and a named range ({', '.join(NAMED_RANGES)}) must stand alone "
            f"as an item"
        )
    if not isinstance(node, (ast.Name, ast.Constant)):
        raise _SyntaxProblem(f"{segment!r} is not allowed: an expression has integers, n, + - * // % and ()")
    prefix = text.encode()[: node.col_offset]  # ast offsets count UTF-8 bytes
    if signs + prefix.count(b"(") - prefix.count(b")") > _MAX_DEPTH:
        raise _SyntaxProblem(f"it nests parentheses and signs more than {_MAX_DEPTH} levels deep")
    return None
