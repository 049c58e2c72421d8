"""Suite-wide rules: unexpected error logs fail the test (DESIGN.md section 6)."""

import logging
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _fail_on_error_logs(
    request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> Iterator[None]:
    yield
    if request.node.get_closest_marker("allow_error_logs"):
        return
    errors = [r for r in caplog.get_records("call") if r.levelno >= logging.ERROR]
    if errors:
        lines = "\n".join(f"{r.name}: {r.getMessage()}" for r in errors)
        pytest.fail(f"unexpected error logs:\n{lines}")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "allow_error_logs: the test expects ERROR log records"
    )
