"""The one mapping of core errors onto Python exceptions (`rust/py/src/errors.rs`): every
variant of the core's error enum, as the bindings raise it."""

from __future__ import annotations

import errno

import pipellm
from pipellm import _core

EXPECTED: dict[str, type[BaseException]] = {
    "IvOrder": pipellm.IvOrderError,
    "Authentication": pipellm.AuthenticationError,
    "IvExhausted": pipellm.IvExhaustedError,
    "InvalidLength": ValueError,
    "InvalidArgument": ValueError,
    "Closed": pipellm.PipelineClosedError,
    "Forked": pipellm.PipelineClosedError,
    "OutOfMemory": MemoryError,
    "Backend": pipellm.PipeLLMError,
    # OS failures are OSError with their errno (Python picks the subclass), not ValueError.
    "Os": PermissionError,
    # A full process-wide table is pipellm's own condition, not a bad argument.
    "Capacity": pipellm.CapacityError,
}


def test_every_core_error_maps_to_its_class() -> None:
    got = dict(_core._error_examples())
    assert set(got) == set(EXPECTED), "a variant without an example, or one not expected"
    for name, cls in EXPECTED.items():
        e = got[name]
        assert type(e) is cls, (name, type(e), cls)
        assert str(e), name  # every error says what happened


def test_os_errors_carry_their_errno_and_capacity_is_a_pipellm_error() -> None:
    got = dict(_core._error_examples())
    os_error = got["Os"]
    assert isinstance(os_error, OSError) and os_error.errno == errno.EPERM
    assert "mprotect" in str(os_error)
    assert issubclass(pipellm.CapacityError, pipellm.PipeLLMError)
    assert not issubclass(pipellm.CapacityError, ValueError)
