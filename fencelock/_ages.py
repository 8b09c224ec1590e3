"""Durations in words, for messages and tables (no imports: the error messages and
the command line's output both use it)."""

from __future__ import annotations

_CENTURY = 100 * 365.25 * 86400


def human_age(seconds: float | None) -> str:
    """A duration a person reads at a glance: ``42s``, ``3m07s``, ``2h05m``, ``3d04h``;
    one over a second below zero with a minus sign (``-29m56s``: a time written by a
    clock ahead of this one, or before this host's clock was set back); one of more than
    a hundred years either way (a time in a record edited by hand) as ``>100y``."""
    if seconds is None:
        return "-"
    if seconds <= -1:
        return "-" + human_age(-seconds)
    if seconds > _CENTURY:
        return ">100y"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"
