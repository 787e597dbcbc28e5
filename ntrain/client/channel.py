"""The client's channel: addresses, TLS and bearer-token credentials, no proxy on loopback.

No TensorFlow here, and nothing that prints: `ntrain.client.Client` and the
command line are built on it.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import grpc

from ntrain.client.exceptions import AddressError, CredentialsError

DEFAULT_PORT = 50051
DEFAULT_ADDRESS = f"127.0.0.1:{DEFAULT_PORT}"
ADDRESS_ENV = "NTRAIN_ADDRESS"
TLS_CA_ENV = "NTRAIN_TLS_CA"
TLS_CERT_ENV = "NTRAIN_TLS_CERT"
TLS_KEY_ENV = "NTRAIN_TLS_KEY"
TOKEN_ENV = "NTRAIN_TOKEN"
TOKEN_FILE_ENV = "NTRAIN_TOKEN_FILE"


@dataclass(frozen=True, kw_only=True)
class Credentials:
    """How a client proves who it is: TLS material (PEM bytes) and a bearer token.

    tls_ca: the CA that signed the server's certificate; TLS is on when it (or
    a client certificate) is given, or when `use_tls` asks for TLS trusting
    the system's CAs. tls_cert, tls_key: a client certificate, for a server
    that asks for one. token: sent as `authorization: Bearer`.
    """

    tls_ca: bytes | None = None
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    token: str | None = None
    use_tls: bool = False

    @property
    def tls(self) -> bool:
        return self.use_tls or self.tls_ca is not None or self.tls_cert is not None


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise CredentialsError(f"cannot read the {what} {path}: {error.strerror}") from None


def load_credentials(
    *,
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    token_file: str | None = None,
    environ: Mapping[str, str] = os.environ,
) -> Credentials:
    """Credentials from files, each falling back to its environment variable.

    The token comes from `token_file`, else $NTRAIN_TOKEN (the token itself),
    else $NTRAIN_TOKEN_FILE.

    Raises:
        CredentialsError: a file cannot be read, is empty, or a client
            certificate comes without its key.
    """
    tls_ca = tls_ca or environ.get(TLS_CA_ENV) or None
    tls_cert = tls_cert or environ.get(TLS_CERT_ENV) or None
    tls_key = tls_key or environ.get(TLS_KEY_ENV) or None
    if (tls_cert is None) != (tls_key is None):
        raise CredentialsError("a client certificate needs both --tls-cert and --tls-key")
    token: str | None = None
    if token_file:
        token = _read(token_file, "token file").decode().strip()
    elif environ.get(TOKEN_ENV):
        token = environ[TOKEN_ENV].strip()
    elif environ.get(TOKEN_FILE_ENV):
        token = _read(environ[TOKEN_FILE_ENV], "token file").decode().strip()
    if token is not None and not token:
        raise CredentialsError("the token is empty")
    return Credentials(
        tls_ca=_read(tls_ca, "CA certificate") if tls_ca else None,
        tls_cert=_read(tls_cert, "client certificate") if tls_cert else None,
        tls_key=_read(tls_key, "client key") if tls_key else None,
        token=token,
    )


def normalize_address(address: str) -> str:
    """HOST:PORT for `address`; a bare host gets the default port (50051).

    Raises:
        AddressError: the address has a scheme (http://...) or no host.
    """
    address = address.strip()
    if "://" in address:
        raise AddressError(
            f"give the server's address as HOST:PORT without a scheme, not {address!r} "
            "(TLS is --tls-ca, not https://)"
        )
    if not address:
        raise AddressError("the server's address is empty; give HOST:PORT")
    if address.startswith("[") and address.endswith("]"):
        return f"{address}:{DEFAULT_PORT}"  # [IPv6]
    if address.count(":") > 1 and not address.startswith("["):
        return f"[{address}]:{DEFAULT_PORT}"  # a bare IPv6 address has no port
    host, colon, port = address.rpartition(":")
    if not colon:
        return f"{address}:{DEFAULT_PORT}"  # a host name or an IPv4 address
    if not host:
        raise AddressError(f"the address {address!r} has no host; give HOST:PORT")
    if not port.isdigit():
        raise AddressError(f"the port of {address!r} must be a number")
    return address


def is_loopback_address(address: str) -> bool:
    """Whether `address` (HOST:PORT or HOST) reaches this host and nothing else.

    Only IP literals in 127.0.0.0/8, ::1 and the name `localhost` do: any
    other name may resolve anywhere, `127.0.0.1.nip.io` and
    `127.attacker.example` included.
    """
    host = address.strip()
    if host.startswith("["):
        host = host[1:].partition("]")[0]  # [IPv6]:PORT
    elif host.count(":") == 1:
        host = host.rpartition(":")[0]  # HOST:PORT; more colons are a bare IPv6 address
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name
        return False


def channel_options(address: str) -> list[tuple[str, Any]]:
    """The channel's options: no proxy for a loopback address (see open_channel)."""
    return [("grpc.enable_http_proxy", 0)] if is_loopback_address(address) else []


def open_channel(address: str, credentials: Credentials | None = None) -> grpc.Channel:
    """A channel to `address`: TLS when the credentials say so, with their token.

    Loopback addresses never go through a proxy: gRPC honours $https_proxy
    and $http_proxy, and without a matching $no_proxy it would send even
    127.0.0.1 through the proxy.

    Raises:
        CredentialsError: a token would cross the network in plaintext (no TLS
            to an address other than loopback).
    """
    credentials = credentials or Credentials()
    loopback = is_loopback_address(address)
    options = channel_options(address)
    if credentials.tls:
        channel_credentials = grpc.ssl_channel_credentials(
            root_certificates=credentials.tls_ca,
            private_key=credentials.tls_key,
            certificate_chain=credentials.tls_cert,
        )
        if credentials.token is not None:
            channel_credentials = grpc.composite_channel_credentials(
                channel_credentials, grpc.access_token_call_credentials(credentials.token)
            )
        return grpc.secure_channel(address, channel_credentials, options=options)
    channel = grpc.insecure_channel(address, options=options)
    if credentials.token is None:
        return channel
    if not loopback:
        raise CredentialsError(
            f"refusing to send a token in plaintext to {address}: pass --tls-ca "
            f"(or set ${TLS_CA_ENV}) for a server that serves TLS"
        )
    # gRPC sends call credentials over TLS only; on loopback the token goes as
    # plain metadata, which never leaves the host.
    return grpc.intercept_channel(channel, _BearerToken(credentials.token))


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str | bytes]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: Any


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call of an insecure loopback channel."""

    def __init__(self, token: str):
        self._metadata = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(  # type: ignore[return-value]  # gRPC takes any such tuple
            details.method,
            details.timeout,
            [*(details.metadata or ()), self._metadata],
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)
