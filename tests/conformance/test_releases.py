"""tests/conformance/releases.py itself: the schema install that several tiers and CI jobs share."""

from __future__ import annotations

import subprocess
import threading
import types
import zipfile

import pytest

from tests.conformance import releases


def tiny_wheel(folder) -> str:
    """A wheel pip installs without a network: one module that says which install it came from."""
    path = folder / "tinyschema-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("tinyschema/__init__.py", "VALUE = 1\n")
        wheel.writestr("tinyschema-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: tinyschema\nVersion: 1.0\n")
        wheel.writestr("tinyschema-1.0.dist-info/WHEEL",
                       "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr("tinyschema-1.0.dist-info/RECORD", "")
    return str(path)


def test_two_runs_installing_at_once_never_see_half_an_install(tmp_path, monkeypatch):
    """Both runs are inside pip at the same time; neither finds the release's folder until it is whole."""
    monkeypatch.setattr(releases, "CACHE", tmp_path / "cache")
    release = releases.Release("9.9.9", "test", (tiny_wheel(tmp_path),))
    seen_while_installing = []

    def look():
        seen_while_installing.extend(path.name for path in (tmp_path / "cache").iterdir()
                                     if not path.name.startswith("."))

    # Both enter pip together; when both have finished it, and before either goes on, the cache is looked at.
    start, finish = threading.Barrier(2, timeout=60), threading.Barrier(2, action=look, timeout=60)

    def run(command, **kwargs):
        start.wait()
        done = subprocess.run(command, **kwargs)
        finish.wait()
        return done

    monkeypatch.setattr(releases, "subprocess", types.SimpleNamespace(run=run))
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(releases.schema_dir(release))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert len(results) == 2 and results[0] == results[1], results
    target = results[0]
    assert seen_while_installing == []
    assert (target / "tinyschema" / "__init__.py").read_text() == "VALUE = 1\n"
    assert (target / releases.MARKER).read_text() == release.wheels[0]
    assert [path.name for path in (tmp_path / "cache").iterdir()] == [target.name], "a scratch folder was left"
    # Installed once, found again without pip.
    monkeypatch.setattr(releases, "subprocess", None)
    assert releases.schema_dir(release) == target


def test_a_failed_install_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setattr(releases, "CACHE", tmp_path / "cache")
    release = releases.Release("9.9.9", "test", (str(tmp_path / "missing-1.0-py3-none-any.whl"),))
    with pytest.raises(RuntimeError, match=r"cannot install the schema of KFP 9\.9\.9 .*PyPI must be reachable"):
        releases.schema_dir(release)
    assert list((tmp_path / "cache").iterdir()) == []
