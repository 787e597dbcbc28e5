"""TLS for the gRPC port and the metrics endpoint, with certificates reloaded in place.

Both read PEM files named on the command line. gRPC's dynamic server
credentials ask `ReloadableGrpcCredentials` for a new certificate
configuration at each handshake, so after `reload()` new connections get the
new certificate while open ones (a WatchJob stream, a client following its
job) carry on; the metrics endpoint takes a fresh `ssl.SSLContext` the same
way. A reload that fails (a half-written file, a key that does not match)
raises, and the certificates in use stay.
"""

from __future__ import annotations

import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True, kw_only=True)
class TlsFiles:
    """A server's certificate chain and key, and the CA its clients' certificates need.

    client_ca None: clients need no certificate; else they must present one it signed.
    """

    cert: Path
    key: Path
    client_ca: Path | None = None

    def ssl_context(self) -> ssl.SSLContext:
        """A server-side context for these files (checks that the key fits the certificate).

        Raises:
            ValueError: a file is missing or unreadable, or the key does not fit.
        """
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.cert, self.key)
            if self.client_ca is not None:
                context.load_verify_locations(cafile=self.client_ca)
                context.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as error:
            named = f"{self.cert}, {self.key}" + (f", {self.client_ca}" if self.client_ca else "")
            reason = getattr(error, "strerror", None) or getattr(error, "reason", None) or error
            raise ValueError(f"cannot use the TLS files {named}: {reason}") from None
        return context

    def grpc_configuration(self) -> grpc.ServerCertificateConfiguration:
        self.ssl_context()  # the same checks, with a message that names the files
        key, cert = self.key.read_bytes(), self.cert.read_bytes()
        root = self.client_ca.read_bytes() if self.client_ca is not None else None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=root)


class ReloadableGrpcCredentials:
    """Server credentials whose certificate `reload()` replaces for new connections."""

    def __init__(self, files: TlsFiles):
        self.files = files
        self._lock = threading.Lock()
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self.credentials = grpc.dynamic_ssl_server_credentials(
            files.grpc_configuration(),
            self._fetch,  # type: ignore[arg-type]  # None means "no change"; the stub omits it
            require_client_authentication=files.client_ca is not None,
        )

    def reload(self) -> None:
        """Read the files again; the next handshake uses them. Raises ValueError."""
        configuration = self.files.grpc_configuration()
        with self._lock:
            self._pending = configuration

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # gRPC calls this before each handshake; None keeps the configuration it has.
        with self._lock:
            configuration, self._pending = self._pending, None
        return configuration


class ReloadableSslContext:
    """An `ssl.SSLContext` that `reload()` replaces (for the metrics endpoint)."""

    def __init__(self, files: TlsFiles):
        self.files = files
        self.context = files.ssl_context()

    def reload(self) -> None:
        self.context = self.files.ssl_context()

    def __call__(self) -> ssl.SSLContext:
        return self.context
