"""The HTTP endpoint that serves the metrics: /metrics only, optional TLS and basic auth."""

from __future__ import annotations

import base64
import binascii
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import make_wsgi_app

log = logging.getLogger(__name__)

METRICS_PATH = "/metrics"
CONNECTION_TIMEOUT_SECONDS = 30.0  # a connection idle this long (or stuck in TLS) is closed


class MetricsHttpServer:
    """The /metrics endpoint; `shutdown()` stops it and frees its port."""

    def __init__(self, httpd, thread: threading.Thread):
        self._httpd = httpd
        self._thread = thread
        self.port: int = httpd.server_port

    def shutdown(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5.0)


# check_password(name, password, peer address) -> allowed
PasswordCheck = Callable[[str, str, str], bool]


def metrics_app(registry: CollectorRegistry, check_password: PasswordCheck | None):
    """The WSGI app: the registry at /metrics, 404 elsewhere, and basic auth when asked."""
    exposition = make_wsgi_app(registry)

    def app(environ, start_response):
        if environ.get("PATH_INFO") != METRICS_PATH:
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"not found: the metrics are at /metrics\n"]
        if check_password is not None and not _authorized(environ, check_password):
            start_response(
                "401 Unauthorized",
                [
                    ("Content-Type", "text/plain; charset=utf-8"),
                    ("WWW-Authenticate", 'Basic realm="ntrain metrics", charset="UTF-8"'),
                ],
            )
            return [b"unauthorized\n"]
        return exposition(environ, start_response)

    return app


def _authorized(environ, check_password: PasswordCheck) -> bool:
    header = environ.get("HTTP_AUTHORIZATION", "")
    if not header:
        return False  # no credentials yet (a browser asks for them after this 401)
    scheme, _, encoded = header.partition(" ")
    try:
        name, colon, password = base64.b64decode(encoded, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        name, colon, password = "", "", ""
    if scheme.lower() != "basic" or not colon:
        name, password = "", ""  # malformed: checked, refused and counted as anyone's
    return check_password(name, password, environ.get("REMOTE_ADDR", ""))


class _Handler(WSGIRequestHandler):
    timeout = CONNECTION_TIMEOUT_SECONDS

    def setup(self) -> None:
        super().setup()
        if isinstance(self.connection, ssl.SSLSocket):
            # The handshake happens here, in the connection's own thread, so a
            # client that never finishes one holds up nobody else.
            self.connection.do_handshake()

    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
        """No access log: a scrape every 15 s is not news."""


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    ssl_context: Callable[[], ssl.SSLContext] | None = None

    def get_request(self):
        connection, address = super().get_request()
        if self.ssl_context is not None:
            connection = self.ssl_context().wrap_socket(
                connection, server_side=True, do_handshake_on_connect=False
            )
        return connection, address

    def handle_error(self, request, client_address) -> None:
        # A failed handshake (no client certificate, a wrong CA) or a client
        # that went away: the client's problem, worth a debug line, not a traceback.
        log.debug("metrics request from %s failed", client_address, exc_info=True)


def start_metrics_server(
    port: int,
    address: str,
    registry: CollectorRegistry,
    *,
    ssl_context: Callable[[], ssl.SSLContext] | None = None,
    check_password: PasswordCheck | None = None,
) -> tuple[MetricsHttpServer, int]:
    """Serve `registry` in the Prometheus text format on http(s)://address:port/metrics.

    Port 0 picks a free port. Every other path answers 404.

    Args:
        ssl_context: returns the server's current TLS context (it may change
            between connections, for certificate reloads); None serves HTTP.
        check_password: basic auth, (name, password, peer address) -> allowed (it
            logs refusals); None serves anyone.

    Returns:
        The server and the port it bound.
    """
    family, _, _, _, sockaddr = socket.getaddrinfo(
        address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]

    class Server(_Server):
        address_family = family  # IPv6 when `address` is one

    httpd = make_server(
        str(sockaddr[0]), port, metrics_app(registry, check_password), Server, _Handler
    )
    httpd.ssl_context = ssl_context  # read at each connection, after the bind
    thread = threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    server = MetricsHttpServer(httpd, thread)
    return server, server.port
