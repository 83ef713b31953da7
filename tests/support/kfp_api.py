"""The fake KFP API server as a fixture, and the imgclf command line the operations tests drive."""

from __future__ import annotations

import kfp.client.client
import pytest

from pipelines import operations
from tests.support.fake_kfp import FakeKfpServer
from trainer import cli as trainer_cli


@pytest.fixture
def kfp_api(monkeypatch, tmp_path):
    """A running fake KFP API server; no developer-machine KFP settings leak into the client."""
    # The client reads a saved namespace from ~/.config/kfp/context.json when that file exists.
    monkeypatch.setattr(kfp.client.client.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "no-kfp-context.json"))
    for name in (operations.HOST_ENV, operations.TOKEN_ENV, "KF_PIPELINES_UI_ENDPOINT",
                 "KF_PIPELINES_OVERRIDE_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    with FakeKfpServer() as server:
        yield server


def imgclf(*argv: str) -> int:
    """The imgclf command line as pipelines/cli.py builds it, with the operations commands added."""
    parser, commands = trainer_cli.build_parser(prog="imgclf")
    operations.add_commands(commands)
    return trainer_cli.run(parser, list(argv))
