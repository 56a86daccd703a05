import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# The tests never reach the network: an app started without weights does not probe the Hub
# (tests of the download use a fake Hub and set what they need themselves).
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def app_server(request, tmp_path_factory):
    """The real app on a free port, one per test module (tests/app_server.py). A module
    may set APP_SERVER_OPTIONS = {...} (keyword arguments of app_server.launch)."""
    from app_server import launch

    options = dict(getattr(request.module, "APP_SERVER_OPTIONS", {}))
    server = launch(tmp_path_factory.mktemp("app"), **options)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    """One folder of fixture checkpoints for the whole run (fixtures.FixtureModels writes
    each at most once: the ViT-L one alone is 1.3 GB)."""
    return tmp_path_factory.mktemp("fixture_checkpoints")
