"""TLS for the gRPC port and the metrics endpoint, with certificates reloaded in place.

Both read PEM files named on the command line. gRPC's dynamic server
credentials ask `ReloadableGrpcCredentials` for a new certificate
configuration at each handshake, so after `reload()` new connections get the
new certificate while open ones (a WatchJob stream, a client following its
job) carry on; the metrics endpoint takes a fresh `ssl.SSLContext` the same
way. A reload that fails (a half-written file, a key that does not match, a
certificate expired or not yet valid, or one that drops a name the one in
use has) raises, and the certificates in use stay: every client (or every
client that connects by that name) would fail the handshake with it. The
certificate is read with `cryptography`'s X.509 parser.
"""

from __future__ import annotations

import datetime
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID

# OpenSSL's reasons, in words an operator reads in the log.
_REASONS = {"KEY_VALUES_MISMATCH": "the key does not match the certificate"}


@dataclass(frozen=True, kw_only=True)
class TlsFiles:
    """A server's certificate chain and key, and the CA its clients' certificates need.

    client_ca None: clients need no certificate; else they must present one it signed.
    """

    cert: Path
    key: Path
    client_ca: Path | None = None

    def ssl_context(self, keep_names: frozenset[str] | None = None) -> ssl.SSLContext:
        """A server-side context for these files (checks that the key fits the certificate).

        keep_names: names the certificate must cover (those of the one it replaces).

        Raises:
            ValueError: a file is missing or unreadable, the key does not fit, the
                certificate is not valid now, or it lacks one of `keep_names`.
        """
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        named = f"{self.cert}, {self.key}" + (f", {self.client_ca}" if self.client_ca else "")
        try:
            context.load_cert_chain(self.cert, self.key)
            if self.client_ca is not None:
                context.load_verify_locations(cafile=self.client_ca)
                context.verify_mode = ssl.CERT_REQUIRED
            certificate = read_certificate(self.cert)
        except (OSError, ssl.SSLError, ValueError) as error:
            reason = _REASONS.get(str(getattr(error, "reason", None)))
            reason = reason or getattr(error, "strerror", None) or error.args[-1]
            raise ValueError(f"cannot use the TLS files {named}: {reason}") from None
        now = datetime.datetime.now(datetime.UTC)
        if now < certificate.not_before:
            raise ValueError(
                f"cannot use the TLS files {named}: the certificate is not valid before "
                f"{certificate.not_before:%Y-%m-%d %H:%M} UTC"
            )
        if now >= certificate.not_after:
            raise ValueError(
                f"cannot use the TLS files {named}: the certificate expired on "
                f"{certificate.not_after:%Y-%m-%d %H:%M} UTC"
            )
        if keep_names is not None and (lacking := certificate.lacks(keep_names)):
            raise ValueError(
                f"cannot use the TLS files {named}: the certificate does not name "
                f"{', '.join(lacking)}, as the one in use does, so clients that connect by "
                "that name would refuse it (restart the server to change its names)"
            )
        return context

    def names(self) -> frozenset[str]:
        """The names the certificate is valid for (empty if it does not read)."""
        try:
            return read_certificate(self.cert).names
        except (OSError, ValueError):
            return frozenset()

    def valid_until(self) -> datetime.datetime | None:
        """When the certificate expires (UTC); None if it does not read."""
        try:
            return read_certificate(self.cert).not_after
        except (OSError, ValueError):
            return None

    def grpc_configuration(
        self, keep_names: frozenset[str] | None = None
    ) -> grpc.ServerCertificateConfiguration:
        self.ssl_context(keep_names)  # the same checks, with a message that names the files
        key, cert = self.key.read_bytes(), self.cert.read_bytes()
        root = self.client_ca.read_bytes() if self.client_ca is not None else None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=root)


@dataclass(frozen=True)
class Certificate:
    """What the server checks of its certificate: when it is valid, and for which names."""

    not_before: datetime.datetime  # UTC
    not_after: datetime.datetime  # UTC
    # Its subjectAltName's DNS names (lower case) and IP addresses, or its
    # subject's common name when it has none (as clients then match it).
    names: frozenset[str]

    def lacks(self, names: frozenset[str]) -> list[str]:
        """The `names` this certificate does not cover, sorted (a wildcard covers one label)."""
        return sorted(name for name in names if not any(_covers(own, name) for own in self.names))


def read_certificate(path: Path) -> Certificate:
    """The first certificate of a PEM file (with the `cryptography` package's X.509 parser).

    Raises:
        OSError: the file does not read.
        ValueError: it holds no certificate that parses.
    """
    try:
        certificate = x509.load_pem_x509_certificate(Path(path).read_bytes())
    except ValueError:
        raise ValueError("no PEM certificate in it") from None
    try:
        alternative = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        common = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        names = {str(attribute.value).lower() for attribute in common}
    else:
        dns = alternative.value.get_values_for_type(x509.DNSName)
        addresses = alternative.value.get_values_for_type(x509.IPAddress)
        names = {name.lower() for name in dns} | {str(address) for address in addresses}
    return Certificate(
        certificate.not_valid_before_utc, certificate.not_valid_after_utc, frozenset(names)
    )


def _covers(own: str, name: str) -> bool:
    if own == name:
        return True
    # RFC 6125: "*.example.com" matches exactly one label in front of example.com.
    head, _, rest = name.partition(".")
    return own.startswith("*.") and bool(head) and own[2:] == rest


class ReloadableGrpcCredentials:
    """Server credentials whose certificate `reload()` replaces for new connections."""

    def __init__(self, files: TlsFiles):
        self.files = files
        self.names = files.names()  # of the certificate in use
        self._lock = threading.Lock()
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self.credentials = grpc.dynamic_ssl_server_credentials(
            files.grpc_configuration(),
            self._fetch,  # type: ignore[arg-type]  # None means "no change"; the stub omits it
            require_client_authentication=files.client_ca is not None,
        )

    def reload(self) -> None:
        """Read the files again; the next handshake uses them. Raises ValueError."""
        configuration = self.files.grpc_configuration(keep_names=self.names)
        with self._lock:
            self._pending = configuration
        self.names = self.files.names()

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
        self.names = files.names()  # of the certificate in use

    def reload(self) -> None:
        self.context = self.files.ssl_context(keep_names=self.names)
        self.names = self.files.names()

    def __call__(self) -> ssl.SSLContext:
        return self.context
