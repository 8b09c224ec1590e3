"""Imported by the reproduction's fork server (and called by a spawned worker first):
its workers drop a KeyboardInterrupt that Python cannot raise.

The reproduction stops its workers with SIGINT (a Ctrl-C reaches them itself). One that
lands inside a callback Python cannot raise from (an import's module-lock callback, a
finalizer) is dropped by Python all the same, with an "Exception ignored ...
KeyboardInterrupt" traceback after the reproduction's one line. Here it is dropped
without it: the worker is then ended by the stop that follows (its ``stop`` event, then
``terminate`` after 5 s). Any other exception of such a callback is printed as before.
"""

from __future__ import annotations

import sys


def quiet_interrupt(unraisable: sys.UnraisableHookArgs) -> None:
    """A ``sys.unraisablehook`` that drops a KeyboardInterrupt, and passes on the rest."""
    if not isinstance(unraisable.exc_value, KeyboardInterrupt):
        sys.__unraisablehook__(unraisable)


sys.unraisablehook = quiet_interrupt
