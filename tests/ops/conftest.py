"""Shared fixtures for the operator tests.

Backends are parametrized by name; a backend that cannot run here (extension
not built, Triton not interpreted) is skipped with the dispatcher's reason.
"""

from typing import Callable

import pytest

from realhf.impl.ops import dispatch


@pytest.fixture
def require_backend() -> Callable[[str, str], None]:
    """Skip the calling test unless ``backend`` can run ``op`` on the CPU."""

    def check(op: str, backend: str) -> None:
        reason = dispatch.unusable_reason(op, backend, "cpu")
        if reason is not None:
            pytest.skip(f"{backend} backend of {op} unavailable: {reason}")

    return check
