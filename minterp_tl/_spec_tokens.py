"""Token specs resolved against a prompt's tokens, and the message helpers of :mod:`minterp_tl.specs`.

A token spec (a ``Token`` or a token string such as ``" Paris"``) selects the positions of the consecutive
prompt tokens whose concatenation is its text. :class:`TokenIndex` finds those spans, and
:func:`resolve_token` picks one, or raises a :class:`SpecError` that lists the tokens and the closest
ones. :func:`check_tokens` and :func:`check_prompts` check the tokens given; :func:`clip`, :func:`show`,
:func:`int_text` and :func:`token_repr` keep values short in messages.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Sequence

__all__ = [
    "SpecError",
    "TokenIndex",
    "check_prompts",
    "check_tokens",
    "clip",
    "int_text",
    "resolve_token",
    "show",
    "token_repr",
]

_SHOWN_TOKENS = 40  # at most this many prompt tokens are listed in a message (half from each end)
_MAX_CLOSEST = 256  # a longer text gets no "closest" suggestions (a spec string has at most 256 characters)


class SpecError(Exception):
    """A problem with a spec; the public functions turn it into a ``ValueError`` naming the spec."""


class TokenIndex:
    """The prompt's ``tokens``, and (built on first use) the offsets in their concatenation where non-empty
    tokens start (``starts``: offset -> token index) and end (``ends``), to find spans fast."""

    def __init__(self, tokens: tuple[str, ...]) -> None:
        """Keep ``tokens``, the prompt's tokens; they are indexed on first use."""
        self.tokens = tokens

    @functools.cached_property
    def _offsets(self) -> tuple[str, dict[int, int], dict[int, int]]:
        """The tokens joined into one string, and the ``starts`` and ``ends`` offsets."""
        starts: dict[int, int] = {}
        ends: dict[int, int] = {}
        offset = 0
        for i, token in enumerate(self.tokens):
            if token:
                starts[offset] = i
                offset += len(token)
                ends[offset] = i
        return "".join(self.tokens), starts, ends

    def spans(self, text: str) -> list[tuple[int, int]]:
        """Every ``(i, j)`` such that ``"".join(tokens[i:j]) == text``, by start; spans start and end on
        non-empty tokens (empty tokens inside a span are part of it)."""
        joined, starts, ends = self._offsets
        result: list[tuple[int, int]] = []
        at = joined.find(text) if text else -1
        while at >= 0:
            if at in starts and at + len(text) in ends:
                result.append((starts[at], ends[at + len(text)] + 1))
            at = joined.find(text, at + 1)
        return result

    def listing(self) -> str:
        """The tokens, for messages: all of them, or the first and last few of a long prompt."""
        shown = [clip(token, 24) for token in self.tokens]
        if len(shown) > _SHOWN_TOKENS:
            half = _SHOWN_TOKENS // 2
            shown = shown[:half] + [f"... {len(shown) - 2 * half} more ..."] + shown[-half:]
        return "[" + ", ".join(shown) + "]"

    def closest(self, text: str) -> list[str]:
        """The tokens and runs of 2-3 tokens that look most like ``text``, the text not found (at most 5)."""
        if len(text) > _MAX_CLOSEST:
            return []
        tokens = self.tokens[:1000]
        candidates = {t for t in tokens if t}
        for width in (2, 3):
            candidates |= {"".join(tokens[i : i + width]) for i in range(len(tokens) - width + 1)}
        return difflib.get_close_matches(text, sorted(candidates), n=5, cutoff=0.6)


def check_tokens(tokens: Sequence[str] | None, n: int, n_name: str) -> TokenIndex | None:
    """``tokens`` as a :class:`TokenIndex` if it is ``n`` strings (``n_name`` names ``n``), ``None`` if it is
    ``None``, else a ValueError."""
    if tokens is None:
        return None
    if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Sequence):
        raise ValueError(  # noqa: TRY004 -- every failure here is a ValueError
            f"tokens must be the prompt's tokens as a list of str (e.g. model.to_str_tokens(prompt)), "
            f"got {show(tokens)}."
        )
    for i, token in enumerate(tokens):
        if not isinstance(token, str):
            raise ValueError(f"tokens must all be str, but tokens[{i}] is {show(token)}.")  # noqa: TRY004
    if len(tokens) != n:
        raise ValueError(
            f"tokens has {len(tokens)} entries but {n_name}={n}: pass the prompt's tokens, one per position."
        )
    return TokenIndex(tuple(tokens))


def check_prompts(tokens_per_prompt: Sequence[Sequence[str]]) -> None:
    """A ValueError unless ``tokens_per_prompt`` is a list of prompts, each a non-empty list of tokens."""
    if isinstance(tokens_per_prompt, (str, bytes)) or not isinstance(tokens_per_prompt, Sequence):
        raise ValueError(  # noqa: TRY004 -- every failure here is a ValueError
            f"tokens_per_prompt must be a list with each prompt's tokens (a list of str), got "
            f"{show(tokens_per_prompt)}."
        )
    for i, prompt in enumerate(tokens_per_prompt):
        if isinstance(prompt, str) or not isinstance(prompt, Sequence):
            raise ValueError(  # noqa: TRY004 -- every failure here is a ValueError
                f"prompt {i}: its tokens must be a list of str (e.g. model.to_str_tokens(prompt)), got "
                f"{show(prompt)}."
            )
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} has no tokens: a prompt needs at least one position.")


def resolve_token(
    text: str, occurrence: int | None, index: TokenIndex | None, syntax: str | None = None
) -> list[int]:
    """The positions of the span of prompt tokens that spells ``text``.

    Args:
        text: The text (a ``Token``'s, or a string that is not spec grammar).
        occurrence: Which span (see ``Token``), or ``None`` for the only one.
        index: The prompt's :class:`TokenIndex`, or ``None`` when the tokens were not given.
        syntax: Why the string is not spec grammar, if it is a string (for the message).

    Raises:
        SpecError: If there are no tokens, no span spells ``text``, or ``occurrence`` picks no single span.
    """
    shown = token_repr(text, occurrence) if syntax is None else repr(text)
    if index is None:
        raise SpecError(
            f"{shown} selects positions by text and needs the prompt's tokens: pass tokens=... to resolve, "
            f"or use resolve_positions"
        )
    spans = index.spans(text)
    if not spans:
        why = "" if syntax is None else f" (it is not a valid spec either: {syntax})"
        closest = index.closest(text)
        hint = f" Closest: {', '.join(map(repr, closest))}." if closest else ""
        raise SpecError(
            f"no run of consecutive prompt tokens spells {clip(text)}{why}. The prompt's "
            f"{len(index.tokens)} tokens: {index.listing()}.{hint}"
        )
    starts = ", ".join(str(i) for i, _ in spans[:20]) + (", ..." if len(spans) > 20 else "")
    if occurrence is None and len(spans) > 1:
        raise SpecError(
            f"{clip(text)} occurs {len(spans)} times in the prompt (starting at positions {starts}); pass "
            f"Token({text!r}, occurrence=k) with k in 0..{len(spans) - 1} (or -1 for the last) to pick one"
        )
    if not -len(spans) <= (occurrence or 0) < len(spans):
        raise SpecError(
            f"{shown}: the text occurs {len(spans)} time{'s' if len(spans) > 1 else ''} in the prompt "
            f"(starting at positions {starts}), so the valid occurrences are -{len(spans)}..{len(spans) - 1}"
        )
    i, j = spans[occurrence or 0]
    return list(range(i, j))


def clip(text: str, limit: int = 60) -> str:
    """``repr(text)``, shortened in the middle when longer than ``limit``."""
    shown = repr(text)
    return shown if len(shown) <= limit else f"{shown[: limit - 20]}...{shown[-12:]} ({len(text)} chars)"


def int_text(value: int) -> str:
    """``str(value)``, or a short stand-in for an int too large to print."""
    if abs(value) < 10**15:
        return str(value)
    return f"{'-' if value < 0 else ''}<int of {value.bit_length()} bits>"


def token_repr(text: str, occurrence: int | None) -> str:
    """The repr of ``Token(text, occurrence)``: ``Token(' Paris')`` or ``Token(' is', occurrence=1)``."""
    if occurrence is None:
        return f"Token({text!r})"
    return f"Token({text!r}, occurrence={int_text(occurrence)})"


def show(value: object) -> str:
    """A short repr of any value, for messages (never raises)."""
    if isinstance(value, str):
        return clip(value, 80)
    try:
        shown = repr(value)
    except Exception:  # noqa: BLE001 -- a huge int (str conversion limit) or a broken __repr__
        return f"<{type(value).__name__}>"
    return shown if len(shown) <= 80 else f"{shown[:60]}...{shown[-12:]}"
