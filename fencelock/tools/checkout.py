"""How the scripts in ``bin/`` run a checkout without installing it."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any


def run(checkout: str, module: str, name: str, **kwargs: Any) -> Any:
    """Call ``module``'s ``main(**kwargs)`` from ``checkout`` (already first on
    ``sys.path``); the processes it starts import the checkout too. A dependency missing
    from this interpreter (click, say) is one line naming the fix, not a traceback."""
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [checkout, *filter(None, [os.environ.get("PYTHONPATH")])])
    try:
        return importlib.import_module(module).main(**kwargs)
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] == "fencelock":
            raise
        sys.exit(
            f"{name}: {e.name} is not installed for {sys.executable}; install this "
            f"checkout's dependencies (pip install -e {checkout}), or run it with the "
            f"Python of the environment that has them"
        )
