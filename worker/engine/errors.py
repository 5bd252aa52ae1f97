"""The one error the engine raises for bad input: its message is a sentence a person can act on
(what does not fit, and what was expected), so callers can show it as is."""

from __future__ import annotations


class EngineError(ValueError):
    """Input that the engine cannot use: a spec, weights, data or a setting that does not fit."""
