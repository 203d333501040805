"""Fixtures shared by every test suite."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    """Run async tests on asyncio, the loop the daemon uses."""
    return "asyncio"
