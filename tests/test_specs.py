"""Tests for minterp_tl.specs: spec strings agree with Python's own slicing and integer arithmetic
(property tests over generated expression trees, every n in 1..64 and arbitrary text / lists), hostile
input fails fast with a ValueError, named ranges are the documented slices, token specs find the right
positions, padded batches are shifted right, and every message says what is wrong and what is valid.

The property tests generate more than 10,000 specs per run (see ``EXAMPLES``); expected values come
from an evaluator over the generated trees in this file, never from ``eval`` of the rendered string.
"""

from __future__ import annotations

import gc
import random
import re
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from minterp_tl.specs import NAMED_RANGES, Token, check_spec, resolve, resolve_positions

# The bounds of the spec grammar, as documented in minterp_tl.specs.
MAX_LENGTH = 256
MAX_DEPTH = 50
MAX_VALUE = 10**12
MAX_LITERAL = 9_999_999  # 7 digits

# Examples per property test: 2500 + 600 + 400 + 2000 + 2000 + 1500 + 1500 = 10,500 generated specs
# (the every-n slice test resolves each of its specs for all 64 values of n, twice).
EXAMPLES = {
    "expressions": 2500,
    "slices": 600,
    "ranges": 400,
    "text": 2000,
    "grammar_text": 2000,
    "token_text": 1500,
    "lists": 1500,
}

FAST = 0.1  # seconds of CPU time any single call may take

PROMPT = [" The", " capital", " of", " France", " is", " Paris", ".", " Paris", " is", " nice", "."]


def _settings(name: str) -> settings:
    """Hypothesis settings for the property test ``name`` (no deadline: timing is asserted per call)."""
    return settings(
        max_examples=EXAMPLES[name],
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def _outcome(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn``; return its result, or the ``ValueError`` it raised (any other exception fails).

    Also asserts that the call took less than ``FAST`` seconds of this thread's CPU time: CPU time, not
    wall time, so that a busy shared machine cannot make the test flaky, and with the garbage collector
    paused, because a full collection of the heap that torch leaves (conftest imports it) alone takes
    about 0.35 s.
    """
    gc.disable()
    start = time.thread_time()
    try:
        result: Any = fn(*args, **kwargs)
    except ValueError as err:
        result = err
    finally:
        elapsed = time.thread_time() - start
        gc.enable()
    assert elapsed < FAST, f"{fn.__name__}{args!r:.200} took {elapsed:.3f} s"
    return result


def _assert_valid_indices(result: Any, n: int) -> None:
    """``result`` is a ValueError, or a list of distinct ints in ``range(n)``."""
    if isinstance(result, ValueError):
        return
    assert isinstance(result, list)
    assert all(type(i) is int and 0 <= i < n for i in result), result
    assert len(set(result)) == len(result), result


# --------------------------------------------------------------------------------------------
# Expression trees: generation, rendering and the reference evaluator
# --------------------------------------------------------------------------------------------

# A tree is ("int", v) | ("n",) | ("neg", t) | ("pos", t) | ("bin", op, left, right).
BINARY_OPS = ("+", "-", "*", "//", "%")
PRECEDENCE = {"+": 1, "-": 1, "*": 2, "//": 2, "%": 2}
UNARY_PRECEDENCE = 3
ATOM_PRECEDENCE = 4

literals = st.one_of(
    st.integers(0, 70),
    st.integers(0, 3),  # zeros for division by zero
    st.integers(0, MAX_LITERAL),  # large values to hit the 10**12 bound
)
trees = st.recursive(
    st.one_of(literals.map(lambda v: ("int", v)), st.just(("n",))),
    lambda children: st.one_of(
        st.tuples(st.just("neg"), children),
        st.tuples(st.just("pos"), children),
        st.tuples(st.just("bin"), st.sampled_from(BINARY_OPS), children, children),
    ),
    max_leaves=10,
)


class _Invalid(Exception):
    """The reference evaluator met a division by zero or a value beyond the bound."""


def evaluate(tree: tuple, n: int) -> int:
    """The value of ``tree`` with Python integer semantics; raise ``_Invalid`` where resolve must fail."""
    kind = tree[0]
    if kind == "int":
        value = tree[1]
    elif kind == "n":
        value = n
    elif kind == "neg":
        value = -evaluate(tree[1], n)
    elif kind == "pos":
        value = evaluate(tree[1], n)
    else:
        op, left, right = tree[1], evaluate(tree[2], n), evaluate(tree[3], n)
        if op in ("//", "%") and right == 0:
            raise _Invalid("division by zero")
        value = {
            "+": lambda: left + right,
            "-": lambda: left - right,
            "*": lambda: left * right,
            "//": lambda: left // right,
            "%": lambda: left % right,
        }[op]()
    if abs(value) > MAX_VALUE:
        raise _Invalid("bound")
    return value


def _space(rng: random.Random) -> str:
    """Random whitespace (often none)."""
    return rng.choice(["", "", "", " ", "  ", "\t"])


def render(tree: tuple, rng: random.Random) -> tuple[str, int, int]:
    """Render ``tree`` as spec text: ``(text, precedence, nesting depth)``.

    Parentheses are added where precedence or left-associativity needs them, and at random elsewhere;
    whitespace is random. The depth counts parentheses and unary signs, as the parser's bound does.
    """
    kind = tree[0]
    if kind == "int":
        text, precedence, depth = str(tree[1]), ATOM_PRECEDENCE, 0
    elif kind == "n":
        text, precedence, depth = "n", ATOM_PRECEDENCE, 0
    elif kind in ("neg", "pos"):
        inner, inner_precedence, inner_depth = render(tree[1], rng)
        if inner_precedence < UNARY_PRECEDENCE:
            inner, inner_depth = f"({_space(rng)}{inner}{_space(rng)})", inner_depth + 1
        sign = "-" if kind == "neg" else "+"
        text, precedence, depth = f"{sign}{_space(rng)}{inner}", UNARY_PRECEDENCE, inner_depth + 1
    else:
        op = tree[1]
        precedence = PRECEDENCE[op]
        left, left_precedence, left_depth = render(tree[2], rng)
        right, right_precedence, right_depth = render(tree[3], rng)
        if left_precedence < precedence or rng.random() < 0.15:
            left, left_depth = f"({left})", left_depth + 1
        if right_precedence <= precedence or rng.random() < 0.15:
            right, right_depth = f"({_space(rng)}{right})", right_depth + 1
        text = f"{left}{_space(rng)}{op}{_space(rng)}{right}"
        depth = max(left_depth, right_depth)
    if rng.random() < 0.05:
        text, precedence, depth = f"({text})", ATOM_PRECEDENCE, depth + 1
    return text, precedence, depth


def test_render_and_evaluate_agree_with_python_on_examples():
    """The test's own reference: rendered trees read back by Python give the evaluator's value."""
    rng = random.Random(0)
    tree = ("bin", "//", ("neg", ("bin", "+", ("n",), ("int", 1))), ("int", 2))
    text, _, depth = render(tree, rng)
    assert evaluate(tree, 9) == -5 == (-(9 + 1)) // 2
    assert depth >= 2
    assert re.sub(r"\s", "", text).replace("n", "9") in ("-(9+1)//2", "(-(9+1))//2", "(-(9+1)//2)")


# --------------------------------------------------------------------------------------------
# Property tests
# --------------------------------------------------------------------------------------------


@_settings("expressions")
@given(
    n=st.integers(1, 64),
    start=st.none() | trees,
    stop=st.none() | trees,
    step=st.none() | trees,
    form=st.sampled_from(["index", "start:stop", "start:stop:step"]),
    rng=st.randoms(use_true_random=False),
)
def test_generated_expressions_agree_with_python(n, start, stop, step, form, rng):
    """Rendered expression trees: single expressions give the index (or a range error), slices give
    Python's slicing of range(n); division by zero and the bounds give a ValueError."""
    if form == "index" and start is None:
        start = ("n",)
    rendered = {
        name: render(tree, rng) if tree is not None else ("", 0, 0)
        for name, tree in (("start", start), ("stop", stop), ("step", step))
    }
    if form == "index":
        parts = ["start"]
    elif form == "start:stop":
        parts = ["start", "stop"]
    else:
        parts = ["start", "stop", "step"]
    text = _space(rng) + ":".join(rendered[p][0] + _space(rng) for p in parts)
    depth = max(rendered[p][2] for p in parts)

    trees_used = {"start": start, "stop": stop, "step": step}
    expected: Any
    try:
        values = [evaluate(trees_used[p], n) if trees_used[p] is not None else None for p in parts]
    except _Invalid:
        expected = ValueError
    else:
        if form == "index":
            expected = [values[0] % n] if -n <= values[0] < n else ValueError
        else:
            values += [None] * (3 - len(values))
            expected = ValueError if values[2] == 0 else list(range(n))[slice(*values)]
    if len(text) > MAX_LENGTH or depth > MAX_DEPTH:
        expected = ValueError

    result = _outcome(resolve, text, n)
    event(f"{form}: {'ValueError' if expected is ValueError else 'empty' if not expected else 'indices'}")
    if expected is ValueError:
        assert isinstance(result, ValueError), (text, n, result)
    else:
        assert result == expected, (text, n)


def _slice_text(start: int | None, stop: int | None, step: int | None, rng: random.Random) -> str:
    """``start:stop:step`` as a spec string with random whitespace (``start:stop`` at random when
    there is no step)."""
    parts = ["" if v is None else _space(rng) + str(v) + _space(rng) for v in (start, stop, step)]
    if step is None and rng.random() < 0.5:
        parts = parts[:2]
    return ":".join(parts)


slice_bounds = st.none() | st.integers(-80, 80) | st.integers(-MAX_LITERAL, MAX_LITERAL)


@_settings("slices")
@given(
    start=slice_bounds,
    stop=slice_bounds,
    step=st.none() | st.integers(-10, 10) | st.integers(-MAX_LITERAL, MAX_LITERAL),
    rng=st.randoms(use_true_random=False),
)
def test_slices_agree_with_python_for_every_n(start, stop, step, rng):
    """For every n in 1..64, the slice string and the slice object both give list(range(n))[s]."""
    text = _slice_text(start, stop, step, rng)
    for n in range(1, 65):
        if step == 0:
            assert isinstance(_outcome(resolve, text, n), ValueError)
            assert isinstance(_outcome(resolve, slice(start, stop, step), n), ValueError)
            continue
        expected = list(range(n))[slice(start, stop, step)]
        assert _outcome(resolve, text, n) == expected, (text, n)
        assert _outcome(resolve, slice(start, stop, step), n) == expected, (start, stop, step, n)


@_settings("ranges")
@given(
    n=st.integers(1, 64),
    start=st.integers(-80, 80),
    stop=st.integers(-80, 80),
    step=st.sampled_from([-5, -4, -3, -2, -1, 1, 2, 3, 4, 5]),
)
def test_range_objects_are_lists_of_indices(n, start, stop, step):
    """A range is its values as indices: each range-checked, negatives from the end, no duplicates."""
    values = list(range(start, stop, step))
    indices = [v % n for v in values] if all(-n <= v < n for v in values) else None
    result = _outcome(resolve, range(start, stop, step), n)
    if indices is None or len(set(indices)) != len(indices):
        assert isinstance(result, ValueError)
    else:
        assert result == indices


@_settings("text")
@given(text=st.text(max_size=300), n=st.integers(1, 64))
def test_arbitrary_text_gives_indices_or_value_error(text, n):
    """Any text: valid distinct indices or a ValueError, fast; check_spec never raises anything else."""
    _assert_valid_indices(_outcome(resolve, text, n, what="layer"), n)
    result = _outcome(check_spec, text, "layer")
    assert result is None or isinstance(result, ValueError)


@_settings("grammar_text")
@given(
    text=st.text(alphabet="0123456789n+-*/%():, \t_.firstlahdmu", max_size=80),
    n=st.integers(1, 64),
)
def test_grammar_like_text_gives_indices_or_value_error(text, n):
    """Text made of the grammar's own characters (deeper into the parser): indices or ValueError, and
    check_spec accepts every string that resolve accepts."""
    result = _outcome(resolve, text, n)
    event("ValueError" if isinstance(result, ValueError) else "indices")
    _assert_valid_indices(result, n)
    if not isinstance(result, ValueError):
        assert _outcome(check_spec, text) is None


token_lists = st.lists(st.text(max_size=4), min_size=1, max_size=12)


@_settings("token_text")
@given(tokens=token_lists, data=st.data())
def test_text_with_tokens_gives_positions_or_value_error(tokens, data):
    """With tokens, any text gives valid positions or a ValueError; a text that is not spec grammar
    gives exactly the positions of consecutive tokens that spell it."""
    n = len(tokens)
    i = data.draw(st.integers(0, n - 1))
    j = data.draw(st.integers(i + 1, n))
    text = data.draw(st.text(max_size=12) | st.just("".join(tokens[i:j])))
    result = _outcome(resolve, text, n, tokens=tokens, what="position")
    event("ValueError" if isinstance(result, ValueError) else "positions")
    _assert_valid_indices(result, n)
    if isinstance(result, list) and isinstance(_outcome(check_spec, text, "layer"), ValueError):
        # Not spec grammar, so a token string: one run of consecutive positions spelling the text.
        assert result == list(range(result[0], result[-1] + 1))
        assert "".join(tokens[result[0] : result[-1] + 1]) == text


list_items = st.one_of(
    st.integers(-70, 70),
    st.text(alphabet="0123456789n+-*/:, _firstlah", max_size=12),
    st.sampled_from(NAMED_RANGES),
    st.builds(slice, slice_bounds, slice_bounds, st.none() | st.integers(-4, 4)),
    st.builds(range, st.integers(-10, 10), st.integers(-10, 10)),
    st.builds(Token, st.text(min_size=1, max_size=4)),
    st.none(),
    st.booleans(),
    st.floats(allow_nan=True),
    st.lists(st.integers(0, 3), max_size=2),
)


@_settings("lists")
@given(items=st.lists(list_items, max_size=6) | st.tuples(list_items, list_items), n=st.integers(1, 64))
def test_arbitrary_lists_give_indices_or_value_error(items, n):
    """Any list of items (valid or not): distinct valid indices or a ValueError, fast."""
    resolved = _outcome(resolve, items, n)
    event("ValueError" if isinstance(resolved, ValueError) else "indices")
    _assert_valid_indices(resolved, n)
    result = _outcome(check_spec, items)
    assert result is None or isinstance(result, ValueError)


# --------------------------------------------------------------------------------------------
# Hostile input
# --------------------------------------------------------------------------------------------

HOSTILE = [
    "__import__('os')",
    "9**9**9",
    "(" * 10000 + "1" + ")" * 10000,
    "-" * 10000 + "1",
    "(" * 51 + "1" + ")" * 51,  # short enough, but too deep
    "-" * 60 + "1",
    "n.",
    "n.__class__",
    "open('x')",
    "1e9",
    "1.5",
    "n/2",
    "lambda: 1",
    "[1,2]",
    "9" * 5000,
    "99999999999*99999999999*99999999999",
    "9999999*9999999*9999999",  # literals within bounds, product beyond
    "n//0:",
    "n%(n-n)",
    "m:2",
    "1:2:0",
    "1:2:3:4",
    "",
    "   ",
    "1,,2",
    "1,",
    "x",
    "n n",
    "0x10",
    "1_000",
    "\x00",
    True,
    False,
    1.0,
    object(),
    b"1",
    {1, 2},
    [[0, 1]],
    [None],
    slice(0, 2, 0),
    slice("a", None),
]


@pytest.mark.parametrize("spec", HOSTILE, ids=lambda s: repr(s)[:30])
@pytest.mark.parametrize("with_tokens", [False, True], ids=["plain", "tokens"])
def test_hostile_specs_raise_value_error_fast(spec, with_tokens):
    """Every hostile spec is a ValueError within 0.1 s of CPU time (and 1 s of wall time, loose for a
    busy machine), with or without tokens."""
    tokens = PROMPT if with_tokens else None
    wall = time.perf_counter()
    result = _outcome(resolve, spec, len(PROMPT), tokens=tokens, what="position")
    assert time.perf_counter() - wall < 10 * FAST
    assert isinstance(result, ValueError), result


@pytest.mark.parametrize("spec", ["9" * 5000, "(" * 10000 + "1" + ")" * 10000, "n/2", "[1,2]", True])
def test_hostile_specs_fail_check_spec(spec):
    """check_spec refuses malformed specs with the same ValueError."""
    with pytest.raises(ValueError, match="not a valid spec|bool"):
        check_spec(spec, "layer")


def test_bounds_are_exact():
    """The documented bounds: 7-digit literals, 50 levels, 10**12, 256 characters."""
    assert resolve("9999999 - 9999999", 1) == [0]
    with pytest.raises(ValueError, match="at most 7"):
        resolve("10000000 - 10000000", 1)
    assert resolve("(" * 50 + "0" + ")" * 50, 1) == [0]
    with pytest.raises(ValueError, match="50 levels"):
        resolve("(" * 51 + "0" + ")" * 51, 1)
    assert resolve("-" * 50 + "1", 2) == [1]
    with pytest.raises(ValueError, match="50 levels"):
        resolve("-" * 51 + "1", 2)
    assert resolve("1000000*1000000 - 1000000*1000000", 1) == [0]
    with pytest.raises(ValueError, match="10\\*\\*12"):
        resolve("1000000*1000001 - 1000000*1000001", 1)
    assert resolve(" " * 255 + "0", 1) == [0]
    with pytest.raises(ValueError, match="at most 256"):
        resolve(" " * 256 + "0", 1)


# --------------------------------------------------------------------------------------------
# The forms of resolve
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (
            30,
            {
                "first_half": list(range(15)),
                "second_half": list(range(15, 30)),
                "first_third": list(range(10)),
                "middle_third": list(range(10, 20)),
                "last_third": list(range(20, 30)),
                "first": [0],
                "last": [29],
                "all": list(range(30)),
            },
        ),
        (
            7,
            {
                "first_half": [0, 1, 2],
                "second_half": [3, 4, 5, 6],
                "first_third": [0, 1],
                "middle_third": [2, 3],
                "last_third": [4, 5, 6],
                "first": [0],
                "last": [6],
                "all": list(range(7)),
            },
        ),
        (
            2,
            {
                "first_half": [0],
                "second_half": [1],
                "first_third": [],
                "middle_third": [0],
                "last_third": [1],
                "first": [0],
                "last": [1],
                "all": [0, 1],
            },
        ),
        (
            1,
            {
                "first_half": [],
                "second_half": [0],
                "first_third": [],
                "middle_third": [],
                "last_third": [0],
                "first": [0],
                "last": [0],
                "all": [0],
            },
        ),
    ],
)
def test_named_ranges_by_hand(n, expected):
    """Named ranges against hand-written lists (empty ranges for small n are allowed)."""
    assert set(expected) == set(NAMED_RANGES)
    for name, indices in expected.items():
        assert resolve(name, n) == indices, name
        assert resolve(f"  {name}\t", n) == indices, name


@pytest.mark.parametrize("n", range(1, 65))
def test_named_ranges_equal_their_slices(n):
    """Each named range is exactly its documented slice string and Python slice."""
    equivalents = {
        "first_half": (":n//2", slice(None, n // 2)),
        "second_half": ("n//2:", slice(n // 2, None)),
        "first_third": (":n//3", slice(None, n // 3)),
        "middle_third": ("n//3:2*n//3", slice(n // 3, 2 * n // 3)),
        "last_third": ("2*n//3:", slice(2 * n // 3, None)),
        "first": (":1", slice(None, 1)),
        "last": ("-1:", slice(-1, None)),
        "all": (":", slice(None)),
    }
    for name, (text, python_slice) in equivalents.items():
        expected = list(range(n))[python_slice]
        assert resolve(name, n) == resolve(text, n) == resolve(python_slice, n) == expected, name
    thirds = resolve("first_third", n) + resolve("middle_third", n) + resolve("last_third", n)
    assert thirds == list(range(n))
    assert resolve("first_half, second_half", n) == list(range(n))


def test_basic_forms():
    """None, ints, expressions, slices and lists, as documented."""
    assert resolve(None, 4) == resolve("all", 4) == [0, 1, 2, 3]
    assert resolve(3, 12) == resolve("3", 12) == [3]
    assert resolve(-1, 12) == resolve("-1", 12) == resolve("n-1", 12) == resolve("last", 12) == [11]
    assert resolve("n//2", 12) == [6]
    assert resolve("(n+1)//2", 11) == [6]
    assert resolve(" ( n + 1 ) // 2 ", 11) == [6]
    assert resolve("-n", 12) == [0]
    assert resolve("7 % 3 - n", 12) == [1]  # 1 - 12 = -11
    assert resolve(":n//2", 12) == [0, 1, 2, 3, 4, 5]
    assert resolve("n//3:2*n//3", 12) == [4, 5, 6, 7]
    assert resolve("-n//4:", 12) == [9, 10, 11]
    assert resolve("::2", 5) == [0, 2, 4]
    assert resolve("::-1", 4) == [3, 2, 1, 0]
    assert resolve("::-4", 12) == [11, 7, 3]
    assert resolve("5:2", 12) == []
    assert resolve("0, 5, -1", 12) == resolve([0, 5, -1], 12) == resolve((0, "5", "-1"), 12) == [0, 5, 11]
    assert resolve("last, 0:2", 12) == [11, 0, 1]
    assert resolve([slice(0, 2), range(4, 6), "n-1"], 12) == [0, 1, 4, 5, 11]
    assert resolve([], 12) == resolve((), 12) == []
    assert resolve(range(-2, 0), 5) == [3, 4]


def test_modulo_and_floor_division_are_pythons():
    """Floor division and modulo of negatives follow Python, not C."""
    n = 10
    for a in range(-7, 8):
        for b in (-3, -2, 2, 3):
            text = f"({a})//({b}) % n"
            assert resolve(text, n) == [(a // b) % n], text
            assert resolve(f"({a}) % ({b}) + 5", n) == [a % b + 5]


def test_ints_and_numpy_like_ints():
    """Anything with __index__ is an int (but not a bool)."""

    class Index:
        def __index__(self) -> int:
            return 2

    assert resolve(Index(), 4) == [2]
    assert resolve([Index(), 3], 4) == [2, 3]
    with pytest.raises(ValueError, match="bool"):
        resolve(True, 4)
    with pytest.raises(ValueError, match="bool"):
        resolve([0, False], 4)


# --------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------


def test_out_of_range_message():
    """An out-of-range index names the spec, n and the valid range."""
    with pytest.raises(ValueError) as info:
        resolve(30, 30, what="layer")
    message = str(info.value)
    assert message.startswith("layer spec 30:")
    assert "n_layers=30" in message and "valid: -30..29" in message
    with pytest.raises(ValueError, match=r"head spec '-9'.*n_heads=8.*valid: -8..7"):
        resolve("-9", 8, what="head")
    with pytest.raises(ValueError, match=r"position spec 'n'.*from 'n'.*n_positions=5.*valid: -5..4"):
        resolve("n", 5, what="position")
    with pytest.raises(ValueError, match=r"item 1 \(99\).*n=10.*valid: -10..9"):
        resolve([0, 99], 10)


def test_unknown_name_message():
    """An unknown name names the spec, lists the named ranges and suggests the closest."""
    with pytest.raises(ValueError) as info:
        resolve("frist_half", 30, what="layer")
    message = str(info.value)
    assert message.startswith("layer spec 'frist_half': not a valid spec")
    assert "unknown name 'frist_half'" in message and "did you mean 'first_half'" in message
    for name in NAMED_RANGES:
        assert name in message
    with pytest.raises(ValueError, match=r"layer spec 'm:2'.*unknown name 'm'.*first_half"):
        resolve("m:2", 30, what="layer")


def test_not_a_spec_message_lists_valid_forms():
    """A string that is not a spec (and no tokens) says so and lists the valid forms."""
    with pytest.raises(ValueError) as info:
        resolve(" Paris", 7, what="position")
    message = str(info.value)
    assert "position spec ' Paris': not a valid spec" in message
    for form in ("first_half", "'n-1'", "':n//2'", "'0, 5, -1'", "need the prompt's tokens"):
        assert form in message


def test_division_by_zero_message():
    """Division by zero names the spec, the sub-expression and n."""
    with pytest.raises(ValueError) as info:
        resolve("n//0:", 30, what="layer")
    assert str(info.value) == "layer spec 'n//0:': division by zero in 'n//0' (n_layers=30)"
    with pytest.raises(ValueError, match=r"index spec 'n%\(n-n\)': division by zero in 'n%\(n-n\)'"):
        resolve("n%(n-n)", 4)


def test_other_messages():
    """Duplicates, zero steps, bounds, operators and argument errors say what is wrong."""
    with pytest.raises(ValueError, match=r"head 5 is selected twice, by item 1 \(5\) and by item 2 \(-5\)"):
        resolve([0, 5, -5], 10, what="head")
    with pytest.raises(ValueError, match=r"index 1 is selected twice, by '0:2' and by '1'"):
        resolve("0:2, 1", 10)
    with pytest.raises(ValueError, match="selects index 9 twice"):
        resolve(range(-1, 10), 10)
    with pytest.raises(ValueError, match="step is zero"):
        resolve("1:2:0", 10)
    with pytest.raises(ValueError, match="step cannot be zero"):
        resolve(slice(1, 2, 0), 10)
    with pytest.raises(ValueError, match=r"use '//'"):
        resolve("n/2", 10)
    with pytest.raises(ValueError, match=r"'\*\*' \(power\)"):
        resolve("2**3", 10)
    with pytest.raises(ValueError, match="not an integer"):
        resolve("1.5", 10)
    with pytest.raises(ValueError, match="comma-separated"):
        resolve("[1, 2]", 10)
    with pytest.raises(ValueError, match="beyond the bound of 10\\*\\*12"):
        resolve("9999999*9999999", 10)
    with pytest.raises(ValueError, match="positive int"):
        resolve(0, 0)
    with pytest.raises(ValueError, match="positive int"):
        resolve(0, True)
    with pytest.raises(ValueError, match="what must be one of"):
        resolve(0, 3, what="neuron")
    with pytest.raises(ValueError, match="tokens has 2 entries but n_positions=3"):
        resolve(0, 3, tokens=["a", "b"], what="position")
    with pytest.raises(ValueError, match="unsupported type object"):
        resolve(object(), 3)


# --------------------------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------------------------


def test_token_single_and_phrase():
    """A single token, and a phrase of several tokens (all its positions)."""
    assert resolve(Token(" France"), len(PROMPT), tokens=PROMPT) == [3]
    assert resolve(Token(" capital of France"), len(PROMPT), tokens=PROMPT) == [1, 2, 3]
    assert resolve(Token(" The capital"), len(PROMPT), tokens=PROMPT) == [0, 1]
    assert resolve([Token(" France"), "last"], len(PROMPT), tokens=PROMPT) == [3, 10]


def test_token_strings_fall_back_to_token_matching():
    """A string that is not spec grammar is a token string, unstripped, when tokens are given."""
    n = len(PROMPT)
    assert resolve(" France", n, tokens=PROMPT) == resolve(Token(" France"), n, tokens=PROMPT) == [3]
    assert resolve(" capital of", n, tokens=PROMPT) == [1, 2]
    assert resolve([" capital", 0], n, tokens=PROMPT) == [1, 0]
    # Spec grammar wins: "last" is the last position, not a token.
    assert resolve("last", 3, tokens=["last", "x", "y"]) == [2]
    assert resolve(Token("last"), 3, tokens=["last", "x", "y"]) == [0]
    # Whitespace tokens are token strings too.
    assert resolve("  ", 3, tokens=["a", "  ", "b"]) == [1]


def test_repeated_token_needs_occurrence():
    """A text that occurs several times needs an occurrence; -1 is the last."""
    n = len(PROMPT)
    with pytest.raises(ValueError) as info:
        resolve(" Paris", n, tokens=PROMPT, what="position")
    message = str(info.value)
    assert "' Paris' occurs 2 times" in message
    assert "positions 5, 7" in message
    assert "Token(' Paris', occurrence=k)" in message
    assert resolve(Token(" Paris", occurrence=0), n, tokens=PROMPT) == [5]
    assert resolve(Token(" Paris", occurrence=1), n, tokens=PROMPT) == [7]
    assert resolve(Token(" Paris", occurrence=-1), n, tokens=PROMPT) == [7]
    assert resolve(Token(" Paris", occurrence=-2), n, tokens=PROMPT) == [5]
    assert resolve(Token(" France", occurrence=-1), n, tokens=PROMPT) == [3]
    with pytest.raises(ValueError, match=r"occurs 2 times.*valid occurrences are -2..1"):
        resolve(Token(" Paris", occurrence=2), n, tokens=PROMPT)
    with pytest.raises(ValueError, match="occurs 2 times"):
        resolve(".", n, tokens=PROMPT)


def test_missing_token_suggests_closest():
    """A text that no tokens spell lists the prompt's tokens and the closest ones."""
    n = len(PROMPT)
    with pytest.raises(ValueError) as info:
        resolve(Token("Paris"), n, tokens=PROMPT, what="position")
    message = str(info.value)
    assert "no run of consecutive prompt tokens spells 'Paris'" in message
    assert "[' The', ' capital', ' of', ' France'" in message
    assert "Closest: ' Paris'" in message
    with pytest.raises(ValueError, match=r"not a valid spec either.*Closest: ' France'"):
        resolve(" Frence", n, tokens=PROMPT)
    long_prompt = [f" t{i}" for i in range(500)]
    with pytest.raises(ValueError) as info:
        resolve(Token(" nowhere"), 500, tokens=long_prompt)
    assert "... 460 more ..." in str(info.value) and len(str(info.value)) < 1500


def test_token_errors():
    """Tokens without the prompt's tokens, empty texts and bad occurrences."""
    with pytest.raises(ValueError, match="needs the prompt's tokens"):
        resolve(Token(" Paris"), 7, what="position")
    with pytest.raises(ValueError, match="non-empty str"):
        Token("")
    with pytest.raises(ValueError, match="occurrence must be an int"):
        Token(" Paris", occurrence=True)
    with pytest.raises(ValueError, match="must all be str"):
        resolve(0, 2, tokens=["a", 1], what="position")
    assert repr(Token(" is", occurrence=1)) == "Token(' is', occurrence=1)"


def test_spans_with_empty_tokens_and_overlaps():
    """Spans start and end on non-empty tokens; overlapping spans are separate occurrences."""
    assert resolve(Token("ab"), 4, tokens=["", "a", "", "b"]) == [1, 2, 3]
    with pytest.raises(ValueError, match="occurs 2 times"):
        resolve(Token("aa"), 3, tokens=["a", "a", "a"])
    assert resolve(Token("aa", occurrence=-1), 3, tokens=["a", "a", "a"]) == [1, 2]
    with pytest.raises(ValueError, match="no run"):
        resolve(Token("b"), 2, tokens=["ab", "c"])  # inside a token is not a span


# --------------------------------------------------------------------------------------------
# resolve_positions
# --------------------------------------------------------------------------------------------

BATCH = [
    [" The", " capital", " of", " France", " is"],
    [" Paris", " is", " nice"],
    [" In", " France", ",", " Paris", " is", " the", " capital"],
]


def test_resolve_positions_right_padding():
    """Right padding: each prompt's own positions, unshifted."""
    assert resolve_positions("last", BATCH) == [[4], [2], [6]]
    assert resolve_positions(" is", BATCH) == [[4], [1], [4]]
    assert resolve_positions(["first", " is"], BATCH, padding_side="right") == [[0, 4], [0, 1], [0, 4]]
    assert resolve_positions(None, BATCH[:2]) == [[0, 1, 2, 3, 4], [0, 1, 2]]


def test_resolve_positions_left_padding():
    """Left padding: shifted by padded_length - len(prompt)."""
    assert resolve_positions("last", BATCH, padding_side="left") == [[6], [6], [6]]
    assert resolve_positions("first", BATCH, padding_side="left") == [[2], [4], [0]]
    assert resolve_positions(" is", BATCH, padding_side="left", padded_length=9) == [[8], [7], [6]]
    assert resolve_positions("-2:", BATCH, padding_side="left", padded_length=8) == [
        [6, 7],
        [6, 7],
        [6, 7],
    ]


def test_resolve_positions_errors_name_the_prompt():
    """Failures say which prompt."""
    with pytest.raises(ValueError, match=r"^prompt 1: position spec ' France': no run"):
        resolve_positions(" France", BATCH)
    with pytest.raises(ValueError, match=r"^prompt 1: position spec 4: position 4 is out of range"):
        resolve_positions(4, BATCH)
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right'"):
        resolve_positions("last", BATCH, padding_side="top")
    with pytest.raises(ValueError, match=r"padded_length.*prompt 2, 7 tokens"):
        resolve_positions("last", BATCH, padded_length=6)
    with pytest.raises(ValueError, match="prompt 1 has no tokens"):
        resolve_positions("last", [[" a"], []])
    with pytest.raises(ValueError, match="prompt 0: its tokens must be a list of str"):
        resolve_positions("last", ["hello"])
    assert resolve_positions("last", []) == []


# --------------------------------------------------------------------------------------------
# check_spec
# --------------------------------------------------------------------------------------------


def test_check_spec():
    """Syntax without n: good specs pass, malformed ones raise resolve's ValueError."""
    for spec in (None, "all", 3, -100, "n-1", ":n//2", "0, 5, -1", [0, "1:3"], slice(None), range(9)):
        check_spec(spec, "layer")
    check_spec(" Paris", "position")  # token strings are accepted for positions
    check_spec(Token(" Paris"), "position")
    check_spec([Token(" is", occurrence=-1), "last"], "position")
    for spec in ("n/2", "1//0", "0:1:0", "m", True, 1.5, [[0]], slice(0, 1, 0), ""):
        with pytest.raises(ValueError, match=r"^layer spec "):
            check_spec(spec, "layer")
    with pytest.raises(ValueError, match="cannot be a Token"):
        check_spec(Token(" Paris"), "head")
    with pytest.raises(ValueError, match="not a valid spec"):
        check_spec(" Paris", "layer")
    with pytest.raises(ValueError, match="what must be one of"):
        check_spec(0, "neuron")
    # The same message as resolve for a malformed spec.
    with pytest.raises(ValueError) as from_check:
        check_spec("n/2", "head")
    with pytest.raises(ValueError) as from_resolve:
        resolve("n/2", 8, what="head")
    assert str(from_check.value) == str(from_resolve.value)


def test_huge_ints_are_range_errors():
    """Ints too large to print (Python's str limit) are still plain range errors, fast."""
    huge = 10**5000
    for spec in (huge, -huge, [0, huge], range(huge, huge + 1)):
        result = _outcome(resolve, spec, 5, what="layer")
        assert isinstance(result, ValueError) and "out of range for n_layers=5" in str(result)
    assert resolve(slice(-huge, huge), 3) == [0, 1, 2]
    assert resolve(slice(None, None, -huge), 3) == [2]
