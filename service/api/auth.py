"""Security at the edge: bearer tokens become principals, and methods need roles.

`AuthInterceptor` authenticates every call except the standard health service
(Docker and Kubernetes probe it without credentials), checks that the caller's
role allows the method at all (`service.jobs.access`), and leaves the
principal on the call's context, where `principal_of` reads it: handlers never
parse metadata. Ownership (may this trainer cancel that job?) is the job
manager's question, asked with the same principal. Without a token file every
caller is `LOCAL`, the anonymous admin of a loopback server.

A token is `ntr_<id>_<secret>`: a public identifier (12 hex digits) and 256
random bits. The token file (`ntrain serve --auth-tokens FILE`) has one
principal a line, `NAME ROLE HASH`, blank lines and `#` comments allowed:

    # ntrain token new alice --role trainer --auth-tokens FILE  appends a line
    alice   trainer  sha256$<id>$<SHA-256 of the secret>

Checking a token is one dictionary lookup by its id and one SHA-256 compared
in constant time, a few microseconds whoever sends it. A plain SHA-256 is
enough because the secret is 256 random bits made by `ntrain token new`: a
stolen file cannot be searched back to a token, so a server key (HMAC) would
add a secret to keep and rotate and no strength. A slow password hash (scrypt)
stays for what people choose, the metrics endpoint's basic-auth passwords
(`--metrics-basic-auth`, `NAME HASH` lines): it costs the same whether the user
exists or not, and at most `SCRYPT_AT_ONCE` run at once. Token files of the
scrypt era are refused with a line saying how to reissue each token.

Refusals are counted per peer address (`PeerFailures`): logged (the peer, never
the token), and past a few a minute answered after a delay, which slows a
client that guesses while holding at most `MAX_DELAYED` threads.
No token, password or hash ever appears in a log line, an error or a label.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from ntrain.v1 import training_pb2

from service.jobs.access import LOCAL, NAME_PATTERN, ROLES, Action, Principal, authorize
from service.jobs.errors import PermissionDenied, Unauthenticated
from service.protocol import PRIORITY_CLASSES

log = logging.getLogger(__name__)

# scrypt's cost for metrics passwords: 16 MiB and some tens of milliseconds a
# check (OWASP's minimum for scrypt is N=2^17 with r=8; the password that
# make-certs.sh makes is 192 random bits, so the hash only has to resist a
# stolen file holding a password someone chose by hand).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
SCRYPT_AT_ONCE = 2  # scrypt checks running at once (16 MiB each); others wait
SCRYPT_WAIT_SECONDS = 10.0  # then the login is refused as a failure
_SCHEME = "scrypt"
_KEY_BYTES = 32
TOKEN_SCHEME = "sha256"
TOKEN_PATTERN = re.compile(r"ntr_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")

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
    f"/{SERVICE}/UploadDataset": Action.PUSH_DATA,
    f"/{SERVICE}/ListDatasets": Action.READ,
    f"/{SERVICE}/GetDataset": Action.READ,
    f"/{SERVICE}/DeleteDataset": Action.DELETE_DATA,
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
    """A fresh bearer token, `ntr_<id>_<secret>`: a public id and 256 random bits."""
    return f"ntr_{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}"


def token_hash(token: str) -> str:
    """`sha256$<id>$<key>`, what the token file keeps of a `new_token()`.

    Raises:
        ValueError: the token is not one `new_token()` makes.
    """
    match = TOKEN_PATTERN.fullmatch(token)
    if match is None:
        raise ValueError("a token is ntr_<id>_<secret>, as ntrain token new makes")
    token_id, secret = match.groups()
    return f"{TOKEN_SCHEME}${token_id}${_b64(_sha256(secret))}"


def _sha256(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_secret(secret: str) -> str:
    """`scrypt$N$r$p$salt$key` for a password, with a fresh random salt."""
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


def _token_key(text: str) -> tuple[str, bytes]:
    """(id, SHA-256 of the secret) of a token_hash(); ValueError saying nothing of the text."""
    scheme, _, rest = text.partition("$")
    token_id, _, key = rest.partition("$")
    try:
        digest = _unb64(key)
    except ValueError:
        digest = b""
    if (
        scheme != TOKEN_SCHEME
        or re.fullmatch(r"[0-9a-f]{12}", token_id) is None
        or len(digest) != hashlib.sha256().digest_size
    ):
        raise ValueError("the hash is not sha256$<id>$<key> (ntrain token new writes it)")
    return token_id, digest


def _entries(
    path: Path, fields: Sequence[str], optional: int = 0
) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each entry; ValueError naming the line, never its text.

    Up to `optional` more fields may follow the required ones.
    """
    try:
        text = path.read_text()
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror}") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        values = line.split()
        if not len(fields) <= len(values) <= len(fields) + optional:
            raise ValueError(f"{path}:{number}: expected {' '.join(fields)}")
        yield number, values


# -- the token file ------------------------------------------------------------------------


class TokenTable:
    """The principals of a token file, found by their tokens' ids."""

    def __init__(self, entries: Sequence[tuple[Principal, str]]):
        self._by_id: dict[str, tuple[Principal, bytes]] = {}
        for principal, text in entries:
            token_id, digest = _token_key(text)
            if token_id in self._by_id:
                raise ValueError(f"{principal.name}'s token id is another principal's too")
            self._by_id[token_id] = (principal, digest)
        self._unknown = _sha256(secrets.token_urlsafe(32))  # compared for an unknown id

    @classmethod
    def load(cls, path: Path) -> TokenTable:
        """Read `NAME ROLE HASH [max-priority=N]` lines.

        max-priority: the highest priority a trainer may submit at (a number,
        or low, normal, high); without it, high.

        Raises:
            ValueError: the file is unreadable, a line is malformed (file:line), or
                it holds a scrypt hash of the old tokens (saying how to reissue them).
        """
        entries: list[tuple[Principal, str]] = []
        names: set[str] = set()
        for number, (name, role, text, *options) in _entries(
            path, ("NAME", "ROLE", "HASH"), optional=1
        ):
            where = f"{path}:{number}"
            if not is_valid_name(name):
                raise ValueError(f"{where}: a name is letters, digits and ._@- (64 at most)")
            if role not in ROLES:
                raise ValueError(f"{where}: the role must be one of {', '.join(ROLES)}")
            if name in names:
                raise ValueError(f"{where}: {name} is listed twice")
            if text.startswith(f"{_SCHEME}$"):
                raise ValueError(
                    f"{where}: {name}'s token is of the old kind (a scrypt hash), which this "
                    f"server no longer accepts; reissue it: delete the line, then run ntrain "
                    f"token new {name} --role {role} --auth-tokens {path}"
                )
            try:
                _token_key(text)
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from None
            max_priority = None
            for option in options:
                key, _, value = option.partition("=")
                try:
                    if key != "max-priority":
                        raise ValueError
                    max_priority = PRIORITY_CLASSES.get(value)
                    if max_priority is None:
                        max_priority = int(value)
                except ValueError:
                    raise ValueError(
                        f"{where}: after the hash only max-priority=N (a number, or "
                        f"{', '.join(PRIORITY_CLASSES)}) may follow"
                    ) from None
            names.add(name)
            entries.append((Principal(name=name, role=role, max_priority=max_priority), text))
        try:
            return cls(entries)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None

    def __len__(self) -> int:
        return len(self._by_id)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(principal.name for principal, _ in self._by_id.values())

    def authenticate(self, token: str) -> Principal | None:
        """The principal whose token this is, or None: one lookup and one SHA-256."""
        match = TOKEN_PATTERN.fullmatch(token)
        if match is None:
            return None
        token_id, secret = match.groups()
        principal, expected = self._by_id.get(token_id, (None, self._unknown))
        # The same work for an unknown id as for a known one.
        if hmac.compare_digest(_sha256(secret), expected) and principal is not None:
            return principal
        return None


class PasswordTable:
    """Basic-auth users and their scrypt password hashes (`NAME HASH` lines).

    A check costs one scrypt whether the user exists or not (an unknown user's
    password is checked against a dummy hash as costly as the dearest real
    one), so its time does not tell which users exist; `SCRYPT_AT_ONCE` bound
    the memory of concurrent checks.
    """

    def __init__(self, entries: dict[str, str]):
        self._entries = {name: _Hash.parse(text) for name, text in entries.items()}
        self._known: set[tuple[str, bytes]] = set()  # (name, SHA-256) of passwords that matched
        dearest = max(
            self._entries.values(),
            key=lambda hashed: hashed.n * hashed.r * hashed.p,
            default=_Hash(SCRYPT_N, SCRYPT_R, SCRYPT_P, b"", b""),
        )
        self._dummy = _Hash(
            dearest.n, dearest.r, dearest.p, secrets.token_bytes(16), secrets.token_bytes(32)
        )
        self._slots = threading.BoundedSemaphore(SCRYPT_AT_ONCE)

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

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def check(self, name: str, password: str) -> bool:
        hashed = self._entries.get(name)
        remembered = (name, _sha256(password))
        if hashed is not None and remembered in self._known:
            return True
        if not self._slots.acquire(timeout=SCRYPT_WAIT_SECONDS):
            log.warning("metrics login refused: %d password checks already running", SCRYPT_AT_ONCE)
            return False
        try:
            matched = (hashed or self._dummy).matches(password)
        finally:
            self._slots.release()
        if matched and hashed is not None:
            self._known.add(remembered)
            return True
        return False


# -- refusals per peer ---------------------------------------------------------------------

FAILURE_WINDOW_SECONDS = 60.0
FREE_FAILURES = 5  # refusals a peer gets per window before they are delayed
FAILURE_DELAY_SECONDS = 1.0
MAX_DELAYED = 16  # refusals held back at once, each holding a thread; others answer at once
MAX_PEERS = 4096  # peers remembered, the least recent forgotten first


def peer_host(peer: str) -> str:
    """The address of a gRPC peer (`ipv4:1.2.3.4:5678`, `ipv6:[::1]:5678`) without its port."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0] or rest
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]") or rest
    return peer


@dataclass
class _PeerRecord:
    window_start: float
    count: int = 0


class PeerFailures:
    """Failed authentications per peer address: logged, and repeated ones slowed down.

    The first refusal of a peer in each `FAILURE_WINDOW_SECONDS` is logged
    with its reason, and the count of the window before when it had more; past
    `FREE_FAILURES` in a window each refusal is answered `FAILURE_DELAY_SECONDS`
    late, at most `MAX_DELAYED` at once (a delay holds a thread, so past that a
    refusal is answered at once). A peer's right token is never delayed.

    Args:
        what: what was refused, for the log (e.g. "token", "metrics login").
    """

    def __init__(
        self,
        what: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.what = what
        self._clock, self._sleep = clock, sleep
        self._lock = threading.Lock()
        self._peers: OrderedDict[str, _PeerRecord] = OrderedDict()
        self._delayed = 0

    def failed(self, peer: str, reason: str) -> None:
        """Count a refusal of `peer` (host only, its port dropped); may sleep before returning."""
        host, now = peer_host(peer), self._clock()
        with self._lock:
            record = self._peers.get(host)
            earlier = 0
            if record is None or now - record.window_start >= FAILURE_WINDOW_SECONDS:
                earlier = record.count if record is not None else 0
                record = self._peers[host] = _PeerRecord(window_start=now)
            self._peers.move_to_end(host)
            while len(self._peers) > MAX_PEERS:
                self._peers.popitem(last=False)
            record.count += 1
            count = record.count
            delay = count > FREE_FAILURES and self._delayed < MAX_DELAYED
            if delay:
                self._delayed += 1
        if earlier > 1:
            log.warning("refused %d %ss from %s in the minute before", earlier, self.what, host)
        if count == 1:
            log.warning("refused a %s from %s: %s", self.what, host, reason)
        elif count == FREE_FAILURES + 1:
            log.warning(
                "refused %d %ss from %s within %.0f s: its refusals are now answered %.0f s late",
                count, self.what, host, FAILURE_WINDOW_SECONDS, FAILURE_DELAY_SECONDS,
            )  # fmt: skip
        if delay:
            try:
                self._sleep(FAILURE_DELAY_SECONDS)
            finally:
                with self._lock:
                    self._delayed -= 1

    def count(self, peer: str) -> int:
        """Refusals of the peer's address in its current window."""
        with self._lock:
            record = self._peers.get(peer_host(peer))
            return 0 if record is None else record.count


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
    Refusals go to `failures` (logged per peer, repeated ones delayed).
    """

    def __init__(
        self,
        tokens: Callable[[], TokenTable | None],
        failures: PeerFailures | None = None,
    ):
        self._tokens = tokens
        self.failures = failures or PeerFailures("call")

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
            self.failures.failed(context.peer(), f"{method}: {error.message}")
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
