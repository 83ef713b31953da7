"""The compiled pipelines as each supported KFP backend release would take them.

A STAND-IN for the backends (no cluster here): the schemas are each release's own (PyPI wheels matching
the protos its go.mod pins, parsed strictly in a subprocess), and the driver's behaviour is encoded rule
by rule in ``tests/conformance/releases.py``, each rule with the Go source file it was read in.

What is checked: the committed YAMLs (or those named by IMGCLF_CONFORMANCE_MAIN / IMGCLF_CONFORMANCE_TUNING,
with IMGCLF_CONFORMANCE_BACKEND the oldest backend they claim) on every release from the one they target,
and the YAMLs of every ``--min-backend`` choice, compiled here, on every release they claim.
"""

from __future__ import annotations

import os
import pathlib

import pytest

from pipelines import backends
from pipelines.cluster import ClusterSettings
from pipelines.compiler import COMMITTED as COMMITTED_PAIRS
from pipelines.compiler import COMPILED_PIPELINE, COMPILED_TUNING_PIPELINE, compile_pipeline, compile_tuning_pipeline
from tests.conformance import releases
from tests.conformance.releases import RELEASES

TRAIN, LANE = "exec-train", "exec-tuning-trials"
COMMITTED = {"main": os.environ.get("IMGCLF_CONFORMANCE_MAIN", COMPILED_PIPELINE),
             "tuning": os.environ.get("IMGCLF_CONFORMANCE_TUNING", COMPILED_TUNING_PIPELINE)}
COMMITTED_BACKEND = os.environ.get("IMGCLF_CONFORMANCE_BACKEND", backends.DEFAULT_BACKEND)


def claimed(oldest: str) -> list[releases.Release]:
    return [release for release in RELEASES if release.at_least(oldest)]


def committed_cases() -> list:
    return [pytest.param(name, release, id=f"{name}-committed-on-{release.version}")
            for name in COMMITTED for release in claimed(COMMITTED_BACKEND)]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[tuple[str, str], pathlib.Path]:
    """Both pipelines compiled for every --min-backend choice (2.2.0 with 4 fixed GPUs)."""
    folder = tmp_path_factory.mktemp("targets")
    paths = {}
    for target in backends.BACKENDS:
        settings = ClusterSettings.from_options(min_backend=target, gcs_secret="gcs-key",
                                                gpus=4 if target == "2.2.0" else None)
        paths[(target, "main")] = pathlib.Path(compile_pipeline(str(folder / f"main-{target}.yaml"), settings=settings))
        paths[(target, "tuning")] = pathlib.Path(compile_tuning_pipeline(str(folder / f"tuning-{target}.yaml"),
                                                                          settings=settings))
    return paths


def target_cases() -> list:
    return [pytest.param(target, name, release, id=f"{name}-for-{target}-on-{release.version}")
            for target in backends.BACKENDS for name in ("main", "tuning") for release in claimed(target)]


def check_runs(path: pathlib.Path, release: releases.Release) -> None:
    """Everything that fails a run before it starts or at its second step, on ``release``."""
    spec, _ = releases.load(path)
    problems = [*releases.strict_parse(release, path), *releases.renamed_producers(spec, release),
                *releases.loop_dependencies(spec, release), *releases.literal_placeholders(spec, release)]
    assert not problems, f"{path} on KFP {release.version}:\n" + "\n".join(problems)


@pytest.mark.parametrize(("name", "release"), committed_cases())
def test_committed_yaml_runs(name, release):
    check_runs(pathlib.Path(COMMITTED[name]), release)


@pytest.mark.parametrize("name", ["main", "tuning"])
@pytest.mark.parametrize("release", claimed("2.2.0"), ids=lambda r: r.version)
def test_committed_2_2_0_pair_runs_everywhere_with_one_gpu(name, release):
    """pipelines/kfp-2.2.0/: the YAMLs for Kubeflow 1.9, which run on every newer backend too (one GPU, fixed)."""
    path = pathlib.Path(COMMITTED_PAIRS["2.2.0"][0 if name == "main" else 1])
    check_runs(path, release)
    spec, _ = releases.load(path)
    executor = TRAIN if name == "main" else LANE
    assert releases.gpu_limits(spec, executor, {"accelerator_count": "1"}, release) == {"nvidia.com/gpu": "1"}


@pytest.mark.parametrize(("target", "name", "release"), target_cases())
def test_every_target_runs_where_it_claims(compiled, target, name, release):
    check_runs(compiled[(target, name)], release)


@pytest.mark.parametrize(("name", "executor"), [("main", TRAIN), ("tuning", LANE)])
@pytest.mark.parametrize("release", claimed(COMMITTED_BACKEND), ids=lambda r: r.version)
def test_committed_gpu_request_is_the_run_forms(name, executor, release):
    """The training pod (and each tuning lane's) gets the form's GPU count; "0" a zero limit, i.e. no GPU."""
    spec, _ = releases.load(COMMITTED[name])
    for form, expected in (("1", {"nvidia.com/gpu": "1"}), ("4", {"nvidia.com/gpu": "4"}), ("0", {})):
        limits = releases.gpu_limits(spec, executor, {"accelerator_count": form}, release)
        # Kubernetes allocates no device for a zero quantity of an extended resource.
        requested = {kind: count for kind, count in limits.items() if count != "0"}
        assert requested == expected, (f"{COMMITTED[name]} on KFP {release.version}: accelerator_count {form!r} "
                                       f"gives GPU limits {limits}")


@pytest.mark.parametrize("name", ["main", "tuning"])
def test_fixed_gpu_count_for_2_2_0(compiled, name):
    """2.2.0 reads only the numeric count: the one given at compile time, whatever the form says."""
    spec, _ = releases.load(compiled[("2.2.0", name)])
    executor = TRAIN if name == "main" else LANE
    for release in claimed("2.2.0"):
        assert releases.gpu_limits(spec, executor, {"accelerator_count": "1"}, release) == {"nvidia.com/gpu": "4"}
    settings = ClusterSettings.from_options(min_backend="2.2.0", gpus=0)
    assert settings.gpu_count_default == "0"


# A preempted training step or tuning lane is retried 3 times, 60 s, then 120 s, then 240 s later.
PREEMPTION_RETRY = {"maxRetryCount": 3, "backoffDuration": "60s", "backoffFactor": 2.0, "backoffMaxDuration": "3600s"}
# (training retried, tuning lanes retried) per release: nothing up to 2.4.0; root tasks only in 2.4.1 and 2.5.0
# (training is one, the lanes sit in a loop); every task from 2.14.0 (argocompiler/container.go).
RETRIED = {"2.2.0": (False, False), "2.4.1": (True, False), "2.5.0": (True, False), "2.15.0": (True, True),
           "2.17.3": (True, True)}


@pytest.mark.parametrize("target", sorted(COMMITTED_PAIRS))
def test_training_and_the_lanes_carry_the_preemption_retry_policy(target):
    main, tuning = (releases.load(path)[0] for path in COMMITTED_PAIRS[target])
    assert main["root"]["dag"]["tasks"]["train"]["retryPolicy"] == PREEMPTION_RETRY
    assert tuning["components"]["comp-for-loop-1"]["dag"]["tasks"]["tuning-trials"]["retryPolicy"] == PREEMPTION_RETRY


@pytest.mark.parametrize("release", RELEASES, ids=lambda r: r.version)
def test_preemption_retries_where_the_backend_applies_them(release):
    assert set(RETRIED) == {r.version for r in RELEASES}, "state the rule for every release"
    main, _ = releases.load(COMMITTED["main"])
    tuning, _ = releases.load(COMMITTED["tuning"])
    applied = (releases.retried(main, "root", "train", release),
               releases.retried(tuning, "comp-for-loop-1", "tuning-trials", release))
    assert applied == RETRIED[release.version]


def test_display_names_only_where_the_backend_resolves_them(compiled):
    for target in backends.BACKENDS:
        spec, _ = releases.load(compiled[(target, "main")])
        shown = spec["root"]["dag"]["tasks"]["look-at-data"]["taskInfo"]["name"]
        assert (shown == "Look at data") == (target == "2.14.0"), target


def test_shm_and_secret_fields_follow_the_target(compiled):
    for target, backend in backends.BACKENDS.items():
        _, platform = releases.load(compiled[(target, "main")])
        train = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train"]
        assert ("emptyDirMounts" in train) == backend.empty_dir_mounts, target
        assert ("secretNameParameter" in train["secretAsVolume"][0]) == backend.secret_name_parameter, target
        assert train["secretAsVolume"][0]["secretName"] == "gcs-key"


def test_the_rules_catch_what_they_are_for():
    """Each rule fails a pipeline that breaks it (so a passing tier means something)."""
    old = next(release for release in RELEASES if release.version == "2.2.0")
    spec = {"root": {"dag": {"tasks": {
        "a": {"componentRef": {"name": "comp-a"}, "taskInfo": {"name": "Step A"}},
        "for-loop-1": {"componentRef": {"name": "comp-a"}, "parameterIterator": {}, "taskInfo": {"name": "x"}},
        "b": {"componentRef": {"name": "comp-a"}, "taskInfo": {"name": "b"}, "dependentTasks": ["for-loop-1"],
              "inputs": {"parameters": {"x": {"taskOutputParameter": {"producerTask": "a", "outputParameterKey": "o"},
                                              "run": {"runtimeValue": {"constant": "{{$.pipeline_job_uuid}}"}}}}}},
    }}}, "components": {"comp-a": {"executorLabel": "exec-a"}}}
    assert "cannot find producer task" in releases.renamed_producers(spec, old)[0]
    assert "invalid dependency for-loop-1" in releases.loop_dependencies(spec, old)[0]
    assert "pipeline_job_uuid" in releases.literal_placeholders(spec, old)[0]


def test_an_unknown_field_is_refused_up_to_2_4_0_and_ignored_from_2_4_1(compiled):
    """The driver's parse (releases.driver_refuses_unknown_fields): the 2.5.0 target's secretNameParameter is
    unknown to 2.4.1's kubernetes_platform, which drops it; the 2.4.1 target's resourceCount fails on 2.2.0."""
    by_version = {release.version: release for release in RELEASES}
    ignored = releases.strict_parse(by_version["2.4.1"], compiled[("2.5.0", "main")])
    assert ignored and all(problem.startswith("ignored by the 2.4.1 driver") for problem in ignored), ignored
    assert any("secretNameParameter" in problem for problem in ignored), ignored
    refused = releases.strict_parse(by_version["2.2.0"], compiled[("2.4.1", "main")])
    assert any(problem.startswith("refused by the 2.2.0 driver") and "resourceCount" in problem
               for problem in refused), refused


@pytest.mark.parametrize("task", ["validate-data", "convert-to-tfrecords"])
def test_prepared_data_is_shared_by_both_pipelines(task):
    """A tuning run and a training run on the same content find each other's validation and conversion in
    the cache: same cache scope, same key parts (see releases.cache_identity), on every release."""
    main, _ = releases.load(COMMITTED["main"])
    tuning, _ = releases.load(COMMITTED["tuning"])
    assert main["root"]["dag"]["tasks"][task]["cachingOptions"] == {"enableCache": True}
    mine, theirs = releases.cache_identity(main, task), releases.cache_identity(tuning, task)
    assert mine == theirs, {key: (mine[key], theirs[key]) for key in mine if mine[key] != theirs[key]}


def test_kubeflow_1_8_is_not_supported(tmp_path):
    """2.0.3's driver knows neither CPU/memory requests (api at 758c91f) nor tolerations (kubernetes_platform
    at bd9f74e), which training needs on GPU nodes: even the 2.2.0 YAML fails there, as the README says."""
    path = compile_pipeline(str(tmp_path / "main.yaml"), settings=ClusterSettings.from_options(min_backend="2.2.0"))
    problems = "\n".join(releases.strict_parse(releases.UNSUPPORTED, path))
    assert 'no field named "cpuRequest"' in problems and 'no field named "tolerations"' in problems, problems
