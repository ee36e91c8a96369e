"""app.http.server in-process: the connection cap arithmetic and the throttled accept() error log."""

from __future__ import annotations

import asyncio
import logging
import resource

import pytest

from app.http import server

pytestmark = pytest.mark.unit


def test_connection_cap_stays_below_the_open_file_limit():
    assert server.connection_cap(2048, 1_048_576, 128) == 2048
    assert server.connection_cap(2048, 1024, 128) == 1024 - server.FD_RESERVE - 128
    assert server.connection_cap(2048, 100, 128) == 1  # never zero: the server still takes one connection


def test_raise_open_file_limit_reports_before_and_after():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        before, now, reported_hard = server.raise_open_file_limit()
        assert (before, reported_hard) == (min(256, hard), hard)
        assert now == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert now == hard or hard == resource.RLIM_INFINITY
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_accept_errors_are_logged_once_per_interval(caplog):
    loop = asyncio.new_event_loop()
    try:
        other: list[dict] = []
        loop.set_exception_handler(lambda _, ctx: other.append(ctx))
        server.install_accept_error_throttle(loop)
        err = OSError(24, "Too many open files")
        with caplog.at_level(logging.WARNING, logger="mae.server"):
            for _ in range(5000):
                loop.call_exception_handler({"message": "socket.accept() out of system resource", "exception": err})
        assert len([r for r in caplog.records if "accept() failed" in r.getMessage()]) == 1
        loop.call_exception_handler({"message": "something else"})
        assert [c["message"] for c in other] == ["something else"]  # everything else goes where it went before
    finally:
        loop.close()
