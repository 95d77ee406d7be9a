import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import threestudio_root  # noqa: E402

SKIP_REASON = (
    "threestudio integration test: run `python tests/harness/prepare_threestudio.py` (or set THREESTUDIO_ROOT "
    "to a threestudio work tree; see README, 'Tests') to run it"
)
# CI sets this: a missing threestudio tree is then an error, not 100 silently skipped integration tests.
REQUIRE_ENV = "SCOREDISTILL_REQUIRE_THREESTUDIO"


def pytest_configure(config):
    config.addinivalue_line("markers", "threestudio: needs a threestudio work tree (.threestudio/ or THREESTUDIO_ROOT)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on a 2-core CPU")


def pytest_collection_modifyitems(config, items):
    if threestudio_root() is not None:
        return
    if os.environ.get(REQUIRE_ENV) == "1":
        raise pytest.UsageError(
            f"{REQUIRE_ENV}=1 but no threestudio work tree: run `python tests/harness/prepare_threestudio.py` "
            "or set THREESTUDIO_ROOT"
        )
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if "threestudio" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_sd():
    """Path of the tiny random Stable Diffusion pipeline folder (built once per cache)."""
    from harness import tiny_sd_path

    return tiny_sd_path()


@pytest.fixture(scope="session")
def threestudio_module():
    from harness import import_threestudio

    return import_threestudio()
