"""TLS for the gRPC port and the metrics endpoint, with certificates reloaded in place.

Both read PEM files named on the command line. gRPC's dynamic server
credentials ask `ReloadableGrpcCredentials` for a new certificate
configuration at each handshake, so after `reload()` new connections get the
new certificate while open ones (a WatchJob stream, a client following its
job) carry on; the metrics endpoint takes a fresh `ssl.SSLContext` the same
way. A reload that fails (a half-written file, a key that does not match, a
certificate expired or not yet valid) raises, and the certificates in use stay:
every client would fail the handshake with such a certificate.
"""

from __future__ import annotations

import datetime
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

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

    def ssl_context(self) -> ssl.SSLContext:
        """A server-side context for these files (checks that the key fits the certificate).

        Raises:
            ValueError: a file is missing or unreadable, or the key does not fit.
        """
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        named = f"{self.cert}, {self.key}" + (f", {self.client_ca}" if self.client_ca else "")
        try:
            context.load_cert_chain(self.cert, self.key)
            if self.client_ca is not None:
                context.load_verify_locations(cafile=self.client_ca)
                context.verify_mode = ssl.CERT_REQUIRED
            not_before, not_after = certificate_validity(self.cert)
        except (OSError, ssl.SSLError, ValueError) as error:
            reason = _REASONS.get(str(getattr(error, "reason", None)))
            reason = reason or getattr(error, "strerror", None) or error.args[-1]
            raise ValueError(f"cannot use the TLS files {named}: {reason}") from None
        now = datetime.datetime.now(datetime.UTC)
        if now < not_before:
            raise ValueError(
                f"cannot use the TLS files {named}: the certificate is not valid before "
                f"{not_before:%Y-%m-%d %H:%M} UTC"
            )
        if now >= not_after:
            raise ValueError(
                f"cannot use the TLS files {named}: the certificate expired on "
                f"{not_after:%Y-%m-%d %H:%M} UTC"
            )
        return context

    def valid_until(self) -> datetime.datetime | None:
        """When the certificate expires (UTC); None if it does not read."""
        try:
            return certificate_validity(self.cert)[1]
        except (OSError, ValueError):
            return None

    def grpc_configuration(self) -> grpc.ServerCertificateConfiguration:
        self.ssl_context()  # the same checks, with a message that names the files
        key, cert = self.key.read_bytes(), self.cert.read_bytes()
        root = self.client_ca.read_bytes() if self.client_ca is not None else None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=root)


def certificate_validity(path: Path) -> tuple[datetime.datetime, datetime.datetime]:
    """(not before, not after), in UTC, of the first certificate of a PEM file.

    Read from the DER with a few lines of ASN.1, since the standard library
    decodes a certificate only while verifying a peer.

    Raises:
        OSError: the file does not read.
        ValueError: it holds no certificate that parses.
    """
    text = Path(path).read_text(errors="replace")
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    if begin not in text or end not in text.split(begin, 1)[1]:
        raise ValueError("no PEM certificate in it")
    der = ssl.PEM_cert_to_DER_cert(begin + text.split(begin, 1)[1].split(end, 1)[0] + end)
    try:
        certificate = _der_items(_der_items(der)[0][1])  # Certificate ::= SEQUENCE {tbs, ...}
        fields = _der_items(certificate[0][1])  # TBSCertificate
        if fields[0][0] == 0xA0:  # [0] version, present in v2 and v3
            fields = fields[1:]
        validity = _der_items(fields[3][1])  # serial, signature, issuer, validity
        return _der_time(*validity[0]), _der_time(*validity[1])
    except (IndexError, ValueError):
        raise ValueError("the certificate's validity does not parse") from None


def _der_items(data: bytes) -> list[tuple[int, bytes]]:
    """The (tag, contents) of the DER elements one after another in `data`."""
    items, at = [], 0
    while at < len(data):
        tag, length, at = data[at], data[at + 1], at + 2
        if length & 0x80:  # long form: the next (length & 0x7F) bytes hold the length
            count = length & 0x7F
            length, at = int.from_bytes(data[at : at + count], "big"), at + count
        if at + length > len(data):
            raise ValueError("a DER element runs past its end")
        items.append((tag, data[at : at + length]))
        at += length
    return items


def _der_time(tag: int, value: bytes) -> datetime.datetime:
    text = value.decode("ascii")
    if tag == 0x17:  # UTCTime, YYMMDDHHMMSSZ: RFC 5280 reads YY >= 50 as 19YY
        text = ("19" if int(text[:2]) >= 50 else "20") + text
    elif tag != 0x18:  # GeneralizedTime, YYYYMMDDHHMMSSZ
        raise ValueError("not a time")
    parsed = datetime.datetime.strptime(text, "%Y%m%d%H%M%SZ")
    return parsed.replace(tzinfo=datetime.UTC)


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
