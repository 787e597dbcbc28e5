"""The container stack: the image's build context, and the CI check that runs it."""

from __future__ import annotations

from conftest import REPO_ROOT


def _patterns(path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line and not line.startswith("#")]


def test_both_dockerignore_files_send_the_same_context():
    """BuildKit reads deploy/Dockerfile.dockerignore, the classic builder the root one."""
    assert _patterns(REPO_ROOT / ".dockerignore") == _patterns(
        REPO_ROOT / "deploy" / "Dockerfile.dockerignore"
    )
