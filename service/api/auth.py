"""Security at the edge: bearer tokens become principals, and methods need roles.

`AuthInterceptor` authenticates every call except the standard health service
(Docker and Kubernetes probe it without credentials), checks that the caller's
role allows the method at all (`service.jobs.access`), and leaves the
principal on the call's context, where `principal_of` reads it: handlers never
parse metadata. Ownership (may this trainer cancel that job?) is the job
manager's question, asked with the same principal. Without a token file every
caller is `LOCAL`, the anonymous admin of a loopback server.

The token file (`ntrain serve --auth-tokens FILE`) has one principal a line,
`NAME ROLE HASH`, blank lines and `#` comments allowed:

    # ntrain token new alice --role trainer --auth-tokens FILE  appends a line
    alice   trainer  scrypt$16384$8$1$<salt>$<key>

A token is never stored, only its salted scrypt hash; a presented token is
hashed with each entry's salt and compared in constant time. Each token that
matched is remembered (by its SHA-256, in memory) so that a client pays the
scrypt cost once per server start, not once per call. The metrics endpoint's
basic-auth file (`--metrics-basic-auth`) is the same with two fields, `NAME HASH`.
No token, password or hash ever appears in a log line, an error or a label.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from ntrain.v1 import training_pb2

from service.jobs.access import LOCAL, NAME_PATTERN, ROLES, Action, Principal, authorize
from service.jobs.errors import PermissionDenied, Unauthenticated

log = logging.getLogger(__name__)

# scrypt's cost: 16 MiB and some tens of milliseconds a check (OWASP's minimum
# for scrypt is N=2^17 with r=8 for passwords people choose; tokens made by
# `ntrain token new` are 256 random bits, so the hash only has to resist a
# stolen file holding a token someone chose by hand).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
_SCHEME = "scrypt"
_KEY_BYTES = 32

SERVICE = training_pb2.DESCRIPTOR.services_by_name["TrainingService"].full_name
# Open to everyone: the standard health service, for probes.
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
# What each method does, as far as roles go (the manager checks owners).
METHOD_ACTIONS: dict[str, Action] = {
    f"/{SERVICE}/SubmitJob": Action.SUBMIT,
    f"/{SERVICE}/GetJob": Action.READ,
    f"/{SERVICE}/ListJobs": Action.READ,
    f"/{SERVICE}/WatchJob": Action.READ,
    f"/{SERVICE}/CancelJob": Action.CANCEL,
    f"/{SERVICE}/Evaluate": Action.USE_MODEL,
    f"/{SERVICE}/Predict": Action.USE_MODEL,
    f"/{SERVICE}/GetServerInfo": Action.READ,
    f"/{SERVICE}/GetJobLogs": Action.READ,
    f"/{SERVICE}/DownloadModel": Action.USE_MODEL,
    f"/{SERVICE}/SubmitExperiment": Action.SUBMIT,
    f"/{SERVICE}/GetExperiment": Action.READ,
    f"/{SERVICE}/ListExperiments": Action.READ,
    f"/{SERVICE}/WatchExperiment": Action.READ,
    f"/{SERVICE}/CancelExperiment": Action.CANCEL,
    # Reflection describes the API: any authenticated principal may read it.
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": Action.READ,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": Action.READ,
}
_PRINCIPAL_ATTRIBUTE = "_ntrain_principal"


# -- secrets and their hashes ------------------------------------------------------------


def is_valid_name(name: str) -> bool:
    """Whether `name` may name a principal: letters, digits and ._@-, 64 at most."""
    return NAME_PATTERN.fullmatch(name) is not None


def new_token() -> str:
    """A fresh bearer token: 256 random bits, URL-safe text."""
    return secrets.token_urlsafe(32)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_secret(secret: str) -> str:
    """`scrypt$N$r$p$salt$key` for a token or password, with a fresh random salt."""
    salt = secrets.token_bytes(16)
    key = hashlib.scrypt(
        secret.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=_KEY_BYTES
    )
    return f"{_SCHEME}${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(key)}"


@dataclass(frozen=True)
class _Hash:
    n: int
    r: int
    p: int
    salt: bytes
    key: bytes

    @classmethod
    def parse(cls, text: str) -> _Hash:
        """Raises ValueError (saying nothing of the text) unless it is a hash_secret()."""
        try:
            scheme, n, r, p, salt, key = text.split("$")
            parsed = cls(int(n), int(r), int(p), _unb64(salt), _unb64(key))
        except ValueError:
            raise ValueError("the hash is not scrypt$N$r$p$salt$key") from None
        if scheme != _SCHEME or not (2 <= parsed.n <= 2**20 and parsed.n & (parsed.n - 1) == 0):
            raise ValueError("the hash is not scrypt$N$r$p$salt$key with N a power of 2")
        if not (1 <= parsed.r <= 32 and 1 <= parsed.p <= 16 and parsed.salt and parsed.key):
            raise ValueError("the hash has parameters out of range")
        return parsed

    def matches(self, secret: str) -> bool:
        key = hashlib.scrypt(
            secret.encode(),
            salt=self.salt,
            n=self.n,
            r=self.r,
            p=self.p,
            dklen=len(self.key),
            maxmem=256 * self.n * self.r + 2**20,
        )
        return hmac.compare_digest(key, self.key)


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def _entries(path: Path, fields: Sequence[str]) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each entry; ValueError naming the line, never its text."""
    try:
        text = path.read_text()
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror}") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        values = line.split()
        if len(values) != len(fields):
            raise ValueError(f"{path}:{number}: expected {' '.join(fields)}")
        yield number, values


# -- the token file ------------------------------------------------------------------------


class TokenTable:
    """The principals of a token file and their token hashes."""

    def __init__(self, entries: Sequence[tuple[Principal, str]]):
        self._entries = [(principal, _Hash.parse(text)) for principal, text in entries]
        self._known: dict[bytes, Principal] = {}  # SHA-256 of a token that matched

    @classmethod
    def load(cls, path: Path) -> TokenTable:
        """Read `NAME ROLE HASH` lines.

        Raises:
            ValueError: the file is unreadable or a line is malformed (file:line).
        """
        entries: list[tuple[Principal, str]] = []
        names: set[str] = set()
        for number, (name, role, text) in _entries(path, ("NAME", "ROLE", "HASH")):
            where = f"{path}:{number}"
            if not is_valid_name(name):
                raise ValueError(f"{where}: a name is letters, digits and ._@- (64 at most)")
            if role not in ROLES:
                raise ValueError(f"{where}: the role must be one of {', '.join(ROLES)}")
            if name in names:
                raise ValueError(f"{where}: {name} is listed twice")
            try:
                _Hash.parse(text)
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from None
            names.add(name)
            entries.append((Principal(name=name, role=role), text))
        return cls(entries)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(principal.name for principal, _ in self._entries)

    def authenticate(self, token: str) -> Principal | None:
        """The principal whose token this is, or None."""
        digest = _digest(token)
        known = self._known.get(digest)
        if known is not None:
            return known
        for principal, hashed in self._entries:
            if hashed.matches(token):
                self._known[digest] = principal
                return principal
        return None


class PasswordTable:
    """Basic-auth users and their password hashes (`NAME HASH` lines)."""

    def __init__(self, entries: dict[str, str]):
        self._entries = {name: _Hash.parse(text) for name, text in entries.items()}
        self._known: set[tuple[str, bytes]] = set()

    @classmethod
    def load(cls, path: Path) -> PasswordTable:
        """Raises ValueError: the file is unreadable or a line is malformed (file:line)."""
        entries: dict[str, str] = {}
        for number, (name, text) in _entries(path, ("NAME", "HASH")):
            try:
                _Hash.parse(text)
            except ValueError as error:
                raise ValueError(f"{path}:{number}: {error}") from None
            entries[name] = text
        return cls(entries)

    def check(self, name: str, password: str) -> bool:
        hashed = self._entries.get(name)
        if hashed is None:
            return False
        remembered = (name, _digest(password))
        if remembered in self._known:
            return True
        if hashed.matches(password):
            self._known.add(remembered)
            return True
        return False


# -- the interceptor -----------------------------------------------------------------------


def principal_of(context: grpc.ServicerContext) -> Principal:
    """The caller of an RPC, as `AuthInterceptor` authenticated it."""
    principal = getattr(context, _PRINCIPAL_ATTRIBUTE, None)
    if not isinstance(principal, Principal):
        raise RuntimeError("no principal on this call: is AuthInterceptor installed?")
    return principal


def bearer_token(metadata: Sequence[tuple[str, Any]] | None) -> str:
    """The token of the call's `authorization: Bearer ...` metadata.

    Raises:
        Unauthenticated: there is none, or it is not a bearer token.
    """
    values = [value for key, value in metadata or () if key == "authorization"]
    if not values:
        raise Unauthenticated(
            "this server requires a bearer token (ntrain: --token-file or $NTRAIN_TOKEN)"
        )
    scheme, _, token = str(values[0]).partition(" ")
    if len(values) > 1 or scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("the authorization metadata must be one 'Bearer <token>'")
    return token.strip()


class AuthInterceptor(grpc.ServerInterceptor):
    """Authenticate and authorise every call (but health) before its handler runs.

    Args:
        tokens: returns the current token table (it changes on reload), or
            None for a server without authentication: every caller is LOCAL.

    Errors are raised as `Unauthenticated` and `PermissionDenied`; the
    ExceptionToStatusInterceptor outside this one turns them into status codes.
    The check runs in the RPC's worker thread, where the scrypt of a new
    token does not hold up the server's other calls.
    """

    def __init__(self, tokens: Callable[[], TokenTable | None]):
        self._tokens = tokens

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler

        def admit(context: grpc.ServicerContext) -> None:
            principal = self._authenticate(context, method)
            action = METHOD_ACTIONS.get(method)
            if action is None:  # a method nobody classified: closed until someone does
                raise PermissionDenied(f"{method} is not open to any role")
            authorize(principal, action)
            setattr(context, _PRINCIPAL_ATTRIBUTE, principal)

        return _guarded(handler, admit)

    def _authenticate(self, context: grpc.ServicerContext, method: str) -> Principal:
        tokens = self._tokens()
        if tokens is None:
            return LOCAL
        try:
            token = bearer_token(context.invocation_metadata())
            principal = tokens.authenticate(token)
            if principal is None:
                raise Unauthenticated("the bearer token is not valid on this server")
        except Unauthenticated as error:
            # The peer and the reason, never the token.
            log.warning("refused %s from %s: %s", method, context.peer(), error.message)
            raise
        return principal


def _guarded(
    handler: grpc.RpcMethodHandler, admit: Callable[[grpc.ServicerContext], None]
) -> grpc.RpcMethodHandler:
    """The same handler, calling `admit(context)` before its behaviour."""

    def unary(behaviour):
        def guarded(request: Any, context: grpc.ServicerContext) -> Any:
            admit(context)
            return behaviour(request, context)

        return guarded

    def stream(behaviour):
        def guarded(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            admit(context)
            yield from behaviour(request, context)

        return guarded

    kinds = (
        (handler.unary_unary, unary, grpc.unary_unary_rpc_method_handler),
        (handler.unary_stream, stream, grpc.unary_stream_rpc_method_handler),
        (handler.stream_unary, unary, grpc.stream_unary_rpc_method_handler),
        (handler.stream_stream, stream, grpc.stream_stream_rpc_method_handler),
    )
    for behaviour, wrap, make in kinds:
        if behaviour is not None:
            return make(
                wrap(behaviour),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    raise AssertionError("a method handler has no behaviour")
