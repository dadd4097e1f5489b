from __future__ import annotations

import os
from typing import Any

import pytest

import pipellm


@pytest.fixture
def key() -> pipellm.SessionKey:
    return pipellm.SessionKey.generate()


@pytest.fixture
def torch() -> Any:
    """PyTorch, which is an optional extra. CI installs it and sets PIPELLM_REQUIRE_TORCH=1,
    so there a missing torch fails the run instead of skipping its tests."""
    try:
        import torch as t
    except ImportError:
        if os.environ.get("PIPELLM_REQUIRE_TORCH") == "1":
            pytest.fail("PIPELLM_REQUIRE_TORCH=1 but torch is not installed")
        pytest.importorskip("torch")
        raise
    return t
