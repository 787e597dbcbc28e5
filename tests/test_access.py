"""Roles and ownership: what each role may do, on its own jobs and on others'."""

from __future__ import annotations

import pytest

from service.jobs.access import (
    ADMIN,
    LOCAL,
    TRAINER,
    VIEWER,
    Action,
    Principal,
    authorize,
    may_see_request_id,
)
from service.jobs.errors import PermissionDenied

ALICE = Principal(name="alice", role=TRAINER)
BOB = Principal(name="bob", role=TRAINER)
VERA = Principal(name="vera", role=VIEWER)
ROOT = Principal(name="root", role=ADMIN)


def allowed(principal: Principal, action: Action, owner: str | None = None) -> bool:
    try:
        authorize(principal, action, owner)
    except PermissionDenied:
        return False
    return True


def test_a_viewer_only_reads():
    assert allowed(VERA, Action.READ)
    for action in (Action.SUBMIT, Action.CANCEL, Action.USE_MODEL):
        assert not allowed(VERA, action)
        assert not allowed(VERA, action, owner="vera")


def test_a_trainer_acts_on_its_own_jobs_only():
    assert allowed(ALICE, Action.SUBMIT) and allowed(ALICE, Action.READ, owner="bob")
    for action in (Action.CANCEL, Action.USE_MODEL):
        assert allowed(ALICE, action, owner="alice")
        assert not allowed(ALICE, action, owner="bob")
        assert not allowed(ALICE, action, owner="")  # unowned jobs are the admins'
    with pytest.raises(PermissionDenied, match="trainer 'alice' may not cancel a job owned by"):
        authorize(ALICE, Action.CANCEL, owner="bob")


def test_an_admin_and_the_local_caller_may_do_anything():
    for principal in (ROOT, LOCAL):
        for action in Action:
            assert allowed(principal, action, owner="alice") and allowed(principal, action)


def test_request_ids_are_shown_to_their_owner_and_admins():
    assert may_see_request_id(ALICE, "alice") and may_see_request_id(ROOT, "alice")
    assert not may_see_request_id(BOB, "alice") and not may_see_request_id(VERA, "alice")
    assert not may_see_request_id(VERA, "")  # an anonymous owner is nobody's match
    assert may_see_request_id(LOCAL, "")


def test_a_role_must_be_known():
    with pytest.raises(ValueError, match="role must be one of viewer, trainer, admin"):
        Principal(name="eve", role="root")
