"""The explorer: the LLM Transparency Tool's app on minterp_tl (its state and answers; the local server)."""

from minterp_tl.explorer.session import Explorer

__all__ = ["Explorer"]
