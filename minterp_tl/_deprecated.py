"""Deprecated spellings: one way to keep a renamed name working for one release, with a warning."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from typing import Any


def warn(old: str, new: str) -> None:
    """Warn that ``old`` is deprecated in favour of ``new`` (pointing at the caller's caller)."""
    warnings.warn(
        f"{old} is deprecated; use {new} (the old spelling goes in the next release).",
        DeprecationWarning,
        stacklevel=3,
    )


def module_getattr(module: str, moved: Mapping[str, tuple[str, Callable[[], Any]]]) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562) that serves each old name of ``moved`` --
    ``{old name: (new spelling, getter)}`` -- with a :class:`DeprecationWarning`."""

    def __getattr__(name: str) -> Any:
        if name in moved:
            new, get = moved[name]
            warn(f"{module}.{name}", new)
            return get()
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__


def renamed_field(old: str, new: str) -> Callable[[type], type]:
    """Class decorator (above ``@dataclass``): field ``new`` was called ``old``; ``Cls(old=...)`` and
    ``obj.old`` keep working for one release, with a :class:`DeprecationWarning`."""

    def decorate(cls: type) -> type:
        init = cls.__init__  # type: ignore[misc]

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            if old in kwargs:
                if new in kwargs:
                    raise TypeError(f"{cls.__name__} takes {new}= (or the deprecated {old}=), not both")
                warn(f"{cls.__name__}({old}=...)", f"{new}=...")
                kwargs[new] = kwargs.pop(old)
            init(self, *args, **kwargs)

        def getter(self: Any) -> Any:
            warn(f"{cls.__name__}.{old}", f"{cls.__name__}.{new}")
            return getattr(self, new)

        cls.__init__ = __init__  # type: ignore[misc]
        setattr(cls, old, property(getter))
        return cls

    return decorate


__all__ = ["module_getattr", "renamed_field", "warn"]
