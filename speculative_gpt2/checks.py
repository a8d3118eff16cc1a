"""Checks of values given by a user: one-line ValueErrors that name the value and say what would do.

The one family every module uses (the model's config, the samplers, the drafters, the command line), so that "an
integer" means the same everywhere: Python's and numpy's integers are integers; bools, floats and strings are not.
"""

from __future__ import annotations

import math
from numbers import Integral, Real


def _range(minimum, maximum) -> str:
    if minimum is not None and maximum is not None:
        return f" from {minimum} to {maximum}"
    if minimum is not None:
        return f" >= {minimum}"
    return "" if maximum is None else f" <= {maximum}"


def check_integer(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """`value` as an int, if it is an integer in [minimum, maximum] (either bound may be None)."""
    if isinstance(value, bool) or not isinstance(value, Integral) or (
            minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be an integer{_range(minimum, maximum)}, got {value!r}")
    return int(value)


def check_real(name: str, value, minimum: float | None = None, maximum: float | None = None, *,
               open_below: bool = False) -> float:
    """`value` as a float, if it is a finite number in [minimum, maximum] ((minimum, maximum] with open_below)."""
    ok = not isinstance(value, bool) and isinstance(value, Real) and math.isfinite(value)
    if ok and minimum is not None:
        ok = value > minimum if open_below else value >= minimum
    if ok and maximum is not None:
        ok = value <= maximum
    if not ok:
        low = "" if minimum is None else ("(" if open_below else "[") + f"{minimum}, "
        span = f" in {low}{maximum}]" if minimum is not None and maximum is not None else _range(minimum, maximum)
        span = span.replace(">=", ">") if open_below and maximum is None else span
        raise ValueError(f"{name} must be a finite number{span}, got {value!r}")
    return float(value)


def check_choice(name: str, value, choices) -> object:
    """`value`, if it is one of `choices`."""
    if not any(value == choice and type(value) is type(choice) for choice in choices):
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value
