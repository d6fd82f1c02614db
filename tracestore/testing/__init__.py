"""Synthetic traces for tests: factory-boy factories, make_traces, and the pytest plugin in .fixtures.

The factories need the `testing` extra (`pip install "tracestore[testing]"`); they are imported on
first use, so `tracestore.testing.fixtures` and the other submodules work without factory-boy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tracestore.testing.factories import (
        TraceContextFactory,
        TraceFactory,
        TraceSessionFactory,
        bind_session,
        make_payload,
        make_traces,
    )

__all__ = [
    "TraceContextFactory",
    "TraceFactory",
    "TraceSessionFactory",
    "bind_session",
    "make_payload",
    "make_traces",
]

_FACTORY_DEPENDENCIES = {"factory", "faker"}


def __getattr__(name: str) -> Any:
    # Unknown names must raise AttributeError: `from tracestore.testing import bulk` relies on it
    # to fall back to importing the submodule.
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        factories = importlib.import_module("tracestore.testing.factories")
    except ImportError as exc:
        if (exc.name or "").partition(".")[0] not in _FACTORY_DEPENDENCIES:
            raise
        raise ImportError(
            f"tracestore.testing.{name} needs factory-boy, which is not installed: "
            'install the testing extra with `pip install "tracestore[testing]"`'
        ) from exc
    return getattr(factories, name)
