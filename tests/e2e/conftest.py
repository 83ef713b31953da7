"""Keeps the kind tier out of runs that did not ask for it: it needs a cluster that only CI sets up."""

import pathlib

_HERE = pathlib.Path(__file__).resolve().parent


def _asked_for(config) -> bool:
    """True with ``-m`` naming e2e, or with a path inside tests/e2e on the command line."""
    if "e2e" in (config.getoption("markexpr") or ""):
        return True
    for arg in config.args:
        path = pathlib.Path(arg.split("::")[0]).resolve()
        if path == _HERE or _HERE in path.parents:
            return True
    return False


def pytest_collection_modifyitems(config, items):
    if _asked_for(config):
        return
    # Deselected rather than skipped: a bare `pytest` is not a request for the e2e tier, and selecting it
    # explicitly without KFP_HOST must fail, which the tests themselves do.
    e2e = [item for item in items if item.get_closest_marker("e2e")]
    if e2e:
        config.hook.pytest_deselected(items=e2e)
        items[:] = [item for item in items if not item.get_closest_marker("e2e")]
