"""Picks the reactor from $TWISTED_REACTOR (epoll, poll, select, asyncio) for pytest-twisted.

pytest-twisted only offers default/asyncio/qt5; the engine suite must run under all four
(pitfalls differ by reactor), so its "default" installer is replaced here.
"""

from __future__ import annotations

import importlib
import os

import pytest_twisted

_REACTORS = {
    "epoll": "twisted.internet.epollreactor",
    "poll": "twisted.internet.pollreactor",
    "select": "twisted.internet.selectreactor",
    "asyncio": "twisted.internet.asyncioreactor",
}


def _install_selected_reactor() -> None:
    name = os.environ.get("TWISTED_REACTOR", "epoll")
    if name not in _REACTORS:
        raise RuntimeError(f"TWISTED_REACTOR must be one of {sorted(_REACTORS)}, not {name!r}")
    module = importlib.import_module(_REACTORS[name])
    module.install()
    from twisted.internet import reactor

    pytest_twisted._instances.reactor = reactor
    pytest_twisted.init_twisted_greenlet()


pytest_twisted.reactor_installers["default"] = _install_selected_reactor


def pytest_report_header() -> str:
    return f"twisted reactor: {os.environ.get('TWISTED_REACTOR', 'epoll')}"
