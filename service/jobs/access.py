"""Who may do what: principals, their roles, and the rules on jobs they do not own.

Plain data, no gRPC: the API's auth interceptor turns a bearer token into a
`Principal` and asks `authorize` whether its role allows the method at all; the
job manager asks again with the job's owner where ownership matters (cancel,
evaluate, predict). Roles nest:

    viewer   read: get, list and watch any job and data set, server info
    trainer  also submit and push data sets, and cancel, evaluate and predict
             on its own jobs, delete its own data sets
    admin    everything, on any job and data set

A job's owner is the name of the principal that submitted it; "" means
anonymous (jobs submitted with authentication off, or before jobs had owners),
which only an admin may act on once authentication is on.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from service.jobs.errors import PermissionDenied
from service.protocol import PRIORITY_CLASSES

VIEWER = "viewer"
TRAINER = "trainer"
ADMIN = "admin"
ROLES = (VIEWER, TRAINER, ADMIN)

# The highest priority a trainer may submit at unless the token file says otherwise.
DEFAULT_MAX_PRIORITY = PRIORITY_CLASSES["high"]

# Letters, digits and ._@- : a name that prints safely in a table and a log line.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


class Action(enum.Enum):
    """What a request does, as far as permissions go; the value reads in a message."""

    READ = "read jobs"
    SUBMIT = "submit jobs"
    CANCEL = "cancel"
    USE_MODEL = "evaluate or predict with"
    PUSH_DATA = "push data sets"
    DELETE_DATA = "delete"


ROLE_ACTIONS: dict[str, frozenset[Action]] = {
    VIEWER: frozenset({Action.READ}),
    TRAINER: frozenset(
        {
            Action.READ,
            Action.SUBMIT,
            Action.CANCEL,
            Action.USE_MODEL,
            Action.PUSH_DATA,
            Action.DELETE_DATA,
        }
    ),
    ADMIN: frozenset(Action),
}
# Actions on one job (or data set) that a trainer may take only on those it owns.
OWNED_ACTIONS = frozenset({Action.CANCEL, Action.USE_MODEL, Action.DELETE_DATA})


@dataclass(frozen=True, kw_only=True)
class Principal:
    """An authenticated caller: a name (a job's owner), a role, and how urgent its jobs may be.

    max_priority: the highest priority a trainer may submit at (None: the
    default, `high`); an admin may submit at any.
    """

    name: str
    role: str
    max_priority: int | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")

    @property
    def anonymous(self) -> bool:
        return not self.name

    def describe(self) -> str:
        return f"{self.role} {self.name!r}" if self.name else "the anonymous caller"


# Every caller when authentication is off: the server's loopback default, where
# whoever reaches the port is trusted as before (jobs it submits are unowned).
LOCAL = Principal(name="", role=ADMIN)


def authorize(
    principal: Principal, action: Action, owner: str | None = None, *, resource: str = "job"
) -> None:
    """Allow `action` for `principal`, on a job (or other `resource`) owned by `owner`.

    Raises:
        PermissionDenied: the role does not allow it, or the job is another's.
    """
    if action not in ROLE_ACTIONS[principal.role]:
        what = "" if resource == "job" else f" {resource}s"
        raise PermissionDenied(f"{principal.describe()} may not {action.value}{what}")
    if owner is None or principal.role == ADMIN or action not in OWNED_ACTIONS:
        return
    if principal.anonymous or owner != principal.name:
        whose = f"owned by {owner!r}" if owner else "that has no owner"
        raise PermissionDenied(
            f"{principal.describe()} may not {action.value} a {resource} {whose}; only its owner "
            "or an admin may"
        )


def authorize_priority(principal: Principal, priority: int) -> None:
    """Allow a job of `priority` from `principal`: above its maximum only an admin may go.

    Raises:
        PermissionDenied: a trainer's job above its maximum.
    """
    if principal.role == ADMIN:
        return
    allowed = DEFAULT_MAX_PRIORITY if principal.max_priority is None else principal.max_priority
    if priority > allowed:
        raise PermissionDenied(
            f"{principal.describe()} may submit jobs of priority up to {allowed}, got {priority}; "
            "an admin may submit above it"
        )


def may_see_request_id(principal: Principal, owner: str) -> bool:
    """A request_id is its owner's idempotency key: shown to the owner and to admins only."""
    return principal.role == ADMIN or (not principal.anonymous and owner == principal.name)
