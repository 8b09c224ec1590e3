"""The package's public names: importable from ``fencelock`` though loaded lazily."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import fencelock

PUBLIC = {name: module for module, names in fencelock._SOURCES.items() for name in names}
"""Each public name and the private module that defines it, from the package's one list."""


def test_all_is_the_one_list_and_the_version() -> None:
    names = [name for names in fencelock._SOURCES.values() for name in names]
    assert len(names) == len(set(names)), "a name listed twice"
    assert sorted(fencelock.__all__) == sorted([*names, "__version__"])


def test_the_version_has_one_source() -> None:
    """The distribution's version is read from ``fencelock.__version__`` at build time."""
    from importlib.metadata import version

    assert version("fencelock") == fencelock.__version__


def test_type_checkers_see_the_same_names() -> None:
    """The ``TYPE_CHECKING`` re-exports (what mypy sees) name exactly what ``_SOURCES``
    names, each from the same module and re-exported as itself."""
    tree = ast.parse(Path(fencelock.__file__).read_text(encoding="utf-8"))
    blocks = [node for node in tree.body if isinstance(node, ast.If)
              and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"]
    assert len(blocks) == 1
    seen: dict[str, list[str]] = {}
    for node in blocks[0].body:
        assert isinstance(node, ast.ImportFrom) and node.module is not None
        for alias in node.names:
            assert alias.asname == alias.name, f"{alias.name} is not re-exported as itself"
            seen.setdefault(node.module, []).append(alias.name)
    assert {m: sorted(n) for m, n in seen.items()} == {
        m: sorted(n) for m, n in fencelock._SOURCES.items()
    }


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_every_public_name_is_the_defining_modules_object(name: str) -> None:
    module = importlib.import_module(PUBLIC[name])
    assert getattr(fencelock, name) is getattr(module, name)
    namespace: dict[str, object] = {}
    exec(f"from fencelock import {name}", namespace)
    assert namespace[name] is getattr(module, name)
    defined_in = getattr(namespace[name], "__module__", PUBLIC[name])
    assert defined_in == PUBLIC[name]


def test_in_a_fresh_interpreter() -> None:
    """Importing the package loads no core module; names load on use; * and dir() work."""
    code = (
        "import sys, fencelock\n"
        "assert [m for m in sys.modules if m.startswith('fencelock.')] == [], sys.modules\n"
        "from fencelock import SessionLock\n"
        "import fencelock._lock\n"
        "assert SessionLock is fencelock._lock.SessionLock\n"
        "assert set(fencelock.__all__) <= set(dir(fencelock))\n"
        "ns = {}\n"
        "exec('from fencelock import *', ns)\n"
        "assert set(fencelock.__all__) <= set(ns), set(fencelock.__all__) - set(ns)\n"
        "try:\n"
        "    fencelock.no_such_name\n"
        "except AttributeError:\n"
        "    pass\n"
        "else:\n"
        "    raise AssertionError('no AttributeError')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("script", ["fencelock", "fencelock-repro", "fencelock-bench",
                                    "fencelock-bench-hold"])
def test_a_bin_script_without_its_dependencies_says_what_to_install(script: str) -> None:
    """bin/ runs a checkout without installing it; under an interpreter that lacks its
    dependencies (here: no site-packages at all, ``-S``) it says so in one line."""
    path = Path(__file__).resolve().parent.parent / "bin" / script
    out = subprocess.run([sys.executable, "-S", str(path), "--help"], capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith(f"bin/{script}: click is not installed for "), out.stderr
    assert "pip install -e " in out.stderr and len(out.stderr.splitlines()) == 1
