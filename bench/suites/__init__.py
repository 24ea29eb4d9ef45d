"""The benchmark suites: every module in this package that defines `SUITES` (a list of Suite).

Importing a suite module imports pydl, so call `all_suites()` only after the emulation switch
is decided (bench.environment.prepare).
"""
from __future__ import annotations

import importlib
import pkgutil

from .base import (
    DIRECTIONS,
    DTYPES,
    SHAPE_SETS,
    Case,
    Suite,
    Unsupported,
    Variant,
    dtype_name,
    parse_dtype,
    variant_selected,
)

__all__ = ["all_suites", "select", "Case", "Suite", "Unsupported", "Variant", "DIRECTIONS",
           "DTYPES", "SHAPE_SETS", "dtype_name", "parse_dtype", "variant_selected"]

_cache: dict[str, Suite] | None = None


def all_suites() -> dict[str, Suite]:
    """Suites by op name, in module order then declaration order."""
    global _cache
    if _cache is None:
        found: dict[str, Suite] = {}
        for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
            if info.name == "base":
                continue
            module = importlib.import_module(f"{__name__}.{info.name}")
            for suite in getattr(module, "SUITES", ()):
                if suite.op in found:
                    raise RuntimeError(f"two suites named {suite.op!r}")
                found[suite.op] = suite
        _cache = found
    return dict(_cache)


def select(names: list[str] | None) -> list[Suite]:
    """The suites named (all when none); a clear error for an unknown name."""
    suites = all_suites()
    if not names:
        return list(suites.values())
    unknown = [n for n in names if n not in suites]
    if unknown:
        raise ValueError(f"unknown op {', '.join(map(repr, unknown))}; "
                         f"available: {', '.join(suites)}")
    return [suites[n] for n in names]
