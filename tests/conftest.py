import os

import pytest
from hypothesis import settings

# Hypothesis: deterministic in CI so a red run can be reproduced from the log.
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=60)
settings.register_profile("dev", deadline=None, max_examples=60)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def pytest_configure(config):
    config.addinivalue_line("markers", "may_skip: a test that may legitimately skip in CI (e.g. needs a GPU)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI every dependency is installed, so a skip means a broken setup: report it as a failure."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") and report.skipped and not item.get_closest_marker("may_skip"):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where every dependency is installed: {report.longrepr}"
