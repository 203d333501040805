"""LogContext: the keys a project's work binds for every event it logs, and what comes back."""

from __future__ import annotations

import pytest
from structlog.contextvars import bind_contextvars, clear_contextvars, get_contextvars

from watcher.logs import LogContext


@pytest.fixture(autouse=True)
def _clean_context() -> None:
    clear_contextvars()


def test_keys_are_bound_inside_and_the_earlier_ones_come_back_after() -> None:
    """Inside the block the keys are bound (a nested block's win); after it, each key is as it
    was: an earlier value restored, a key unbound before unbound again, others untouched."""
    bind_contextvars(project_id="outer", replica="r1")
    with LogContext(project_id="p1", kind="image"):
        assert get_contextvars() == {"project_id": "p1", "kind": "image", "replica": "r1"}
        with LogContext(project_id="p2"):
            assert get_contextvars()["project_id"] == "p2"
        assert get_contextvars() == {"project_id": "p1", "kind": "image", "replica": "r1"}
    assert get_contextvars() == {"project_id": "outer", "replica": "r1"}


def test_the_keys_come_back_when_the_block_raises() -> None:
    """An exception out of the block still restores the keys."""
    with pytest.raises(ZeroDivisionError), LogContext(project_id="p1"):
        raise ZeroDivisionError
    assert get_contextvars() == {}
