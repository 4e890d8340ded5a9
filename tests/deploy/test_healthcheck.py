"""The container's HEALTHCHECK script (deploy/container/healthcheck.py): which address it
checks for each ``--listen`` form, and its verdict against real loopback servers."""

from __future__ import annotations

import http.client
import os
import socket
import socketserver
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from deploy.container import healthcheck


@pytest.mark.parametrize(
    ("listen", "host", "port"),
    [
        ("tcp:8080", "127.0.0.1", 8080),
        ("tcp:8080:interface=0.0.0.0", "127.0.0.1", 8080),
        ("tcp:port=9000:interface=127.0.0.2", "127.0.0.2", 9000),
        ("tcp:8081:interface=10.1.2.3", "10.1.2.3", 8081),
        ("tcp6:8080", "::1", 8080),
        ("tcp6:8080:interface=\\:\\:", "::1", 8080),
        ("tcp6:port=8080:interface=\\:\\:1", "::1", 8080),
    ],
)
def test_tcp_listen_descriptions(listen: str, host: str, port: int) -> None:
    connection = healthcheck.connection_for(listen)
    assert type(connection) is http.client.HTTPConnection
    assert (connection.host, connection.port) == (host, port)


def test_ssl_is_checked_without_verifying_the_certificate() -> None:
    connection = healthcheck.connection_for("ssl:8443:privateKey=key.pem:certKey=cert.pem")
    assert isinstance(connection, http.client.HTTPSConnection)
    assert (connection.host, connection.port) == ("127.0.0.1", 8443)


@pytest.mark.parametrize("listen", ["systemd:domain=INET:index=0", "tcp:", "unix:", "tcp:http"])
def test_unusable_descriptions_are_refused(listen: str) -> None:
    with pytest.raises(ValueError, match=r"no port|no socket|cannot check"):
        healthcheck.connection_for(listen)


class _Handler(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Unhealthy(_Handler):
    status = 503


@contextmanager
def _serve(server: socketserver.BaseServer) -> Iterator[None]:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def healthy() -> Iterator[int]:
    server = HTTPServer(("127.0.0.1", 0), _Handler)
    with _serve(server):
        yield server.server_address[1]


@pytest.fixture
def unhealthy() -> Iterator[int]:
    server = HTTPServer(("127.0.0.1", 0), _Unhealthy)
    with _serve(server):
        yield server.server_address[1]


def test_healthy_from_the_environment(healthy: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CURLFETCH_LISTEN", f"tcp:{healthy}:interface=127.0.0.1")
    assert healthcheck.main([]) == 0


def test_an_explicit_url(healthy: int) -> None:
    assert healthcheck.main([f"http://127.0.0.1:{healthy}/healthz"]) == 0
    assert healthcheck.main([f"http://127.0.0.1:{healthy}/elsewhere"]) == 1
    assert healthcheck.main(["ftp://127.0.0.1/"]) == 1


def test_an_error_status_is_unhealthy(
    unhealthy: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CURLFETCH_LISTEN", f"tcp:{unhealthy}:interface=127.0.0.1")
    assert healthcheck.main([]) == 1
    assert "HTTP 503" in capsys.readouterr().err


def test_nothing_listening_is_unhealthy(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        monkeypatch.setenv("CURLFETCH_LISTEN", f"tcp:{port}:interface=127.0.0.1")
        assert healthcheck.main([]) == 1
    assert "GET /healthz" in capsys.readouterr().err


def test_a_unix_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    class UnixHTTPServer(socketserver.UnixStreamServer):
        pass

    class Handler(_Handler):
        def address_string(self) -> str:
            return "unix"

    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "api.sock")
        server = UnixHTTPServer(path, Handler)
        with _serve(server):
            monkeypatch.setenv("CURLFETCH_LISTEN", f"unix:{path}")
            assert healthcheck.main([]) == 0
            monkeypatch.setenv("CURLFETCH_LISTEN", f"unix:address={path}:mode=660")
            assert healthcheck.main([]) == 0
