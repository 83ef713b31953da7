"""The search itself: seeded samplers, the shared journal under concurrent writers, failed and stopped trials."""

import json
import re
import threading
import types

import pytest

from trainer import storage
from trainer.tune import tuning, tuning_report
from trainer.tune.tuning import ObjectJournal, TuningError

RANGES = {"learning_rate": {"min": 0.0001, "max": 0.1, "scaling": "Logarithmic"}, "optimizer": ["adam", "sgd"]}


def fake_training(fail_when=None, curve=None, backups=None):
    """A stand-in for trainer.train.training.train with the same contract: epochs through the callbacks, a result.

    The objective is a fixed function of the hyperparameters, so what the search does with it can be checked.
    ``backups``, a list, collects the backup_dir of every call.
    """
    def train(hp, dataset_dir, model_dir, *, jit_compile=False, callbacks=(), backup_dir=None):
        if backups is not None:
            backups.append(backup_dir)
        if fail_when and fail_when(hp):
            raise RuntimeError(f"out of memory at batch_size {hp.batch_size}")
        value = 0.0
        network = types.SimpleNamespace(stop_training=False)  # what Keras hands its callbacks
        for callback in callbacks:
            callback.set_model(network)
        for epoch in range(hp.epochs):
            value = (curve or (lambda hp, e: min(1.0, hp.learning_rate * 10 * (e + 1))))(hp, epoch)
            for callback in callbacks:
                callback.on_epoch_end(epoch, {"val_accuracy": value, "val_loss": 1 - value})
            if network.stop_training:
                break
        storage.write_bytes(storage.join(model_dir, "model.keras"), b"weights")
        return {"epochs_completed": epoch + 1, "validation_metrics": {"accuracy": value, "loss": 1 - value}}
    return train


def run_search(study_dir, ranges=RANGES, fixed=None, train_fn=None, **settings):
    config = tuning.make_config(ranges, {"epochs": 2, **(fixed or {})}, **settings)
    tuning.create_study(config, str(study_dir))
    for lane in range(config.lanes):
        tuning.run_lane(str(study_dir), lane, "unused", train_fn=train_fn or fake_training())
    return tuning.summarize(str(study_dir))


@pytest.mark.parametrize("strategy", ["Bayesian", "Random", "Hyperband"])
def test_a_search_is_repeatable_with_its_seed(tmp_path, strategy):
    first = run_search(tmp_path / "a", strategy=strategy, max_trials=4, parallel_trials=1)
    again = run_search(tmp_path / "b", strategy=strategy, max_trials=4, parallel_trials=1)
    other = run_search(tmp_path / "c", strategy=strategy, max_trials=4, parallel_trials=1, fixed={"random_seed": 1})
    params = [[t["hyperparameters"] for t in s["trials"]] for s in (first, again, other)]
    assert params[0] == params[1]
    assert params[0] != params[2]


def test_parallel_lanes_do_not_draw_the_same_values(tmp_path):
    summary = run_search(tmp_path, strategy="Random", max_trials=4, parallel_trials=2)
    rates = [t["hyperparameters"]["learning_rate"] for t in summary["trials"]]
    assert len(set(rates)) == 4


def test_grid_visits_every_point_once(tmp_path):
    summary = run_search(tmp_path, ranges={"optimizer": ["adam", "sgd", "rmsprop"]}, strategy="Grid",
                         max_trials=10, parallel_trials=1)
    assert sorted(t["hyperparameters"]["optimizer"] for t in summary["trials"]) == ["adam", "rmsprop", "sgd"]


def test_the_best_trial_follows_the_objectives_direction(tmp_path):
    best_acc = run_search(tmp_path / "acc", max_trials=4, parallel_trials=2, early_stopping_type="Off")
    best_loss = run_search(tmp_path / "loss", max_trials=4, parallel_trials=2, early_stopping_type="Off",
                           objective="validation:loss")
    values = [t["value"] for t in best_acc["trials"]]
    assert best_acc["best"]["value"] == max(values)
    assert best_loss["best"]["value"] == min(t["value"] for t in best_loss["trials"])
    best = best_acc["trials"][best_acc["best"]["trial"]]
    assert best_acc["best"]["hyperparameters"]["learning_rate"] == best["hyperparameters"]["learning_rate"]
    assert best_acc["best"]["hyperparameters"]["epochs"] == 2  # the fixed ones are part of the best set


def test_a_failing_trial_is_recorded_and_the_search_goes_on(tmp_path):
    summary = run_search(tmp_path, ranges={"batch_size": [16, 4096]}, strategy="Grid", max_trials=2,
                         parallel_trials=1, train_fn=fake_training(fail_when=lambda hp: hp.batch_size > 1000))
    by_batch = {t["hyperparameters"]["batch_size"]: t for t in summary["trials"]}
    assert by_batch[4096]["status"] == "failed"
    assert by_batch[4096]["error"] == "RuntimeError: out of memory at batch_size 4096"
    assert by_batch[16]["status"] == "completed"
    assert summary["best"]["trial"] == by_batch[16]["trial"]


def test_a_bad_combination_fails_its_trial_only(tmp_path):
    # small_cnn needs at least 16 pixels: the schema refuses image_size 8 in that trial alone.
    summary = run_search(tmp_path, ranges={"image_size": [8, 32]}, fixed={"model": "small_cnn", "weights": "none"},
                         strategy="Grid", max_trials=2, parallel_trials=2)
    statuses = {t["hyperparameters"]["image_size"]: t["status"] for t in summary["trials"]}
    assert statuses == {8: "failed", 32: "completed"}


def test_when_every_trial_fails_the_search_fails_listing_the_reasons(tmp_path):
    summary = run_search(tmp_path, max_trials=2, parallel_trials=1, train_fn=fake_training(fail_when=lambda hp: True))
    with pytest.raises(TuningError) as caught:
        tuning.select_best(str(tmp_path), str(tmp_path / "best"), str(tmp_path / "report"))
    message = str(caught.value)
    assert "no trial completed" in message
    assert message.count("RuntimeError: out of memory at batch_size 32") == 2
    # The reports are written all the same, with each failure.
    assert "failed: RuntimeError" in (tmp_path / "report" / "report.md").read_text()
    assert summary["best"] is None


def by_trial(*curves):
    """A curve for fake_training: the n-th trial to train reports curves[n] (its objective at epochs 1, 2, ...)."""
    started = []

    def curve(hp, epoch):
        if epoch == 0:
            started.append(hp)
        return curves[len(started) - 1][epoch]
    return curve


def test_trials_clearly_worse_at_an_epoch_are_stopped_and_recorded(tmp_path):
    # Later trials are far worse than the first three: Auto early stopping stops them after the warm-up epoch.
    summary = run_search(tmp_path, strategy="Random", max_trials=5, parallel_trials=1, fixed={"epochs": 4},
                         train_fn=fake_training(curve=by_trial(*[[0.9] * 4] * 3, *[[0.1] * 4] * 2)))
    assert [t["status"] for t in summary["trials"]] == ["completed"] * 3 + ["stopped early"] * 2
    assert all(t["epochs"] == 2 and t["value"] == pytest.approx(0.1) for t in summary["trials"][3:])
    assert all(t["epochs"] == 4 for t in summary["trials"][:3])


@pytest.mark.parametrize("curves, statuses", [
    # SageMaker's rule: worse at an epoch than the median of the others' running averages up to that epoch.
    # Running averages at epoch 2: 0.6, 0.7, 0.8, 0.9 (median 0.75): 0.72 is stopped (though not in the worst
    # quarter); then 0.78 goes on (median 0.72, the stopped trial counting too).
    ([[0.6, 0.6, 0.6], [0.7, 0.7, 0.7], [0.8, 0.8, 0.8], [0.9, 0.9, 0.9], [0.72, 0.72, 0.72], [0.78, 0.78, 0.78]],
     ["completed"] * 4 + ["stopped early", "completed"]),
    # The value at the epoch counts, not the best so far: 0.95 at epoch 1 does not save 0.1 at epoch 2.
    ([[0.9] * 3] * 3 + [[0.95, 0.1, 0.1]], ["completed"] * 3 + ["stopped early"]),
    # Never at the warm-up epoch, however bad: a slow start that catches up completes.
    ([[0.9] * 3] * 3 + [[0.05, 0.95, 0.95]], ["completed"] * 4),
    # Not before 3 other trials have reported the epoch: 0.89 against one finished 0.90 goes on.
    ([[0.9, 0.9, 0.9], [0.89, 0.89, 0.89]], ["completed"] * 2),
    # Minimizing: a loss above the median is worse (the fake's loss is 1 - accuracy).
    ([[0.9] * 3] * 3 + [[0.5, 0.5, 0.5]], ["completed"] * 3 + ["stopped early"]),
])
def test_auto_early_stopping_is_the_median_rule_the_readme_states(tmp_path, curves, statuses):
    objective = "validation:loss" if curves[-1][0] == 0.5 else "validation:accuracy"
    summary = run_search(tmp_path, strategy="Random", max_trials=len(curves), parallel_trials=1, objective=objective,
                         fixed={"epochs": 3}, train_fn=fake_training(curve=by_trial(*curves)))
    assert [t["status"] for t in summary["trials"]] == statuses
    assert all(t["epochs"] == 2 for t in summary["trials"] if t["status"] == "stopped early")


def test_failed_trials_do_not_set_the_bar_for_early_stopping(tmp_path):
    """Three trials that reached 0.9 and then failed (out of memory at epoch 3) do not count: against the three
    completed at 0.6 (median 0.6), 0.7 goes on; counted, they would lift the median to 0.75 and stop it."""
    curves = [[0.9, 0.9, None]] * 3 + [[0.6] * 3] * 3 + [[0.7] * 3]
    started = []

    def curve(hp, epoch):
        if epoch == 0:
            started.append(hp)
        value = curves[len(started) - 1][epoch]
        if value is None:
            raise RuntimeError("out of memory")
        return value

    summary = run_search(tmp_path, strategy="Random", max_trials=len(curves), parallel_trials=1,
                         fixed={"epochs": 3}, train_fn=fake_training(curve=curve))
    assert [t["status"] for t in summary["trials"]] == ["failed"] * 3 + ["completed"] * 4
    assert [t["intermediate"] for t in summary["trials"][:3]] == [{"1": 0.9, "2": 0.9}] * 3


def test_a_trial_whose_objective_is_not_a_number_fails_with_the_reason_everywhere(tmp_path):
    config = tuning.make_config(RANGES, {"epochs": 3}, strategy="Random", max_trials=2, parallel_trials=1)
    tuning.create_study(config, str(tmp_path))
    records = tuning.run_lane(str(tmp_path), 0, "unused",
                              train_fn=fake_training(curve=by_trial([0.5, float("nan"), 0.9], [0.5, 0.6, 0.7])))
    reason = ("validation accuracy is nan after epoch 2: training diverged; try a lower learning_rate or another "
              "optimizer")
    # The lane's record (and so its metrics), the study's summary and tuning.json agree.
    assert [(r["status"], r["error"], r["value"], r["epochs"]) for r in records] == [
        ("failed", reason, None, 2), ("completed", None, pytest.approx(0.7), 3)]
    assert tuning.trial_metrics(records, "maximize") == {"trials_completed": 1.0, "trials_stopped_early": 0.0,
                                                         "trials_failed": 1.0, "best_objective": pytest.approx(0.7)}
    summary = tuning.select_best(str(tmp_path), str(tmp_path / "best"), str(tmp_path / "report"))
    assert [(t["status"], t["error"], t["value"]) for t in summary["trials"]] == [
        ("failed", reason, None), ("completed", None, pytest.approx(0.7))]
    on_disk = json.loads((tmp_path / "report" / "tuning.json").read_text())  # strict JSON: no NaN anywhere
    assert on_disk["trials"][0]["intermediate"] == {"1": 0.5} and on_disk["best"]["trial"] == 1


def test_the_markdown_report_keeps_multi_line_errors_in_their_row(tmp_path):
    summary = run_search(tmp_path, max_trials=2, parallel_trials=1, train_fn=fake_training(
        fail_when=lambda hp: hp.learning_rate > 0.001))
    summary["trials"][0].update(status="failed", error="ResourceExhaustedError: OOM when allocating\r\n  tensor "
                                "[64,224,224,3] | on GPU\nHint: lower batch_size")
    table = [line for line in tuning_report.markdown(summary).splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(summary["trials"])
    cells = [len(re.findall(r"(?<!\\)\|", line)) for line in table]
    assert cells == [cells[0]] * len(table)
    assert "OOM when allocating   tensor [64,224,224,3] \\| on GPU Hint: lower batch_size" in table[2]


def test_a_retried_lane_skips_finished_trials_and_records_the_interrupted_one(tmp_path):
    config = tuning.make_config(RANGES, {"epochs": 1}, max_trials=2, parallel_trials=1)
    tuning.create_study(config, str(tmp_path))
    tuning.run_trial(str(tmp_path), 0, "unused", train_fn=fake_training())
    study, _ = tuning.open_study(str(tmp_path), 0)
    # Slot 1 started, then its pod was killed before the trial had its hyperparameters: nothing to continue.
    study.ask().set_user_attr("slot", 1)
    backups = []
    tuning.run_lane(str(tmp_path), 0, "unused", train_fn=fake_training(backups=backups))
    trials = tuning.summarize(str(tmp_path))["trials"]
    assert [(t["slot"], t["status"]) for t in trials] == [(0, "completed"), (1, "failed"), (1, "completed")]
    assert trials[1]["error"].startswith("interrupted")
    assert trials[1]["hyperparameters"] == {} and trials[2]["hyperparameters"]
    # The new trial trains with a backup of its own, never the interrupted trial's.
    assert backups == [str(tmp_path / "trials" / "1" / "backup" / str(trials[2]["trial"]))]
    assert not trials[2]["resumed_at_epochs"]


def test_the_journal_keeps_every_batch_of_concurrent_writers(tmp_path):
    writers, batches = 6, 15

    def write(worker):
        journal = ObjectJournal(str(tmp_path / "journal"))
        for i in range(batches):
            journal.append_logs([{"worker": worker, "i": i}, {"worker": worker, "i": i, "second": True}])

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    logs = list(ObjectJournal(str(tmp_path / "journal")).read_logs(0))
    assert len(logs) == writers * batches * 2
    # A batch is never split, and each writer's batches keep their order.
    for first, second in zip(logs[::2], logs[1::2], strict=True):
        assert second == {**first, "second": True}
    for worker in range(writers):
        assert [e["i"] for e in logs[::2] if e["worker"] == worker] == list(range(batches))
    assert list(ObjectJournal(str(tmp_path / "journal")).read_logs(len(logs) - 2)) == logs[-2:]


def test_the_journal_works_on_gcs(gcs_bucket):
    # Writers that catch up before each claim. (The emulator ignores ifGenerationMatch, so the claim's
    # atomicity between simultaneous writers rests on GCS's precondition, not on this test.)
    root = f"gs://{gcs_bucket}/study/journal"
    first, second = ObjectJournal(root), ObjectJournal(root)
    first.append_logs([{"a": 1}])
    second.append_logs([{"b": 2}])  # must not overwrite the first writer's object
    first.append_logs([{"c": 3}])
    assert list(ObjectJournal(root).read_logs(0)) == [{"a": 1}, {"b": 2}, {"c": 3}]
    assert storage.read_bytes_if_exists(f"{root}/00000003.json") is None


def test_reports_mark_the_best_and_plot_each_tuned_hyperparameter(tmp_path):
    summary = run_search(tmp_path, max_trials=3, parallel_trials=1, early_stopping_type="Off")
    page = tuning_report.html(summary)
    assert page.count("<svg") == 3  # per trial, learning_rate, optimizer
    assert "(log scale)" in page and "&#9733; best" in page
    markdown = tuning_report.markdown(summary)
    assert f"| {summary['best']['trial']} (best) | completed |" in markdown
    path = tuning_report.write_html(summary, str(tmp_path / "out" / "report.html"))
    assert open(path, encoding="utf-8").read() == page


def test_select_best_copies_the_model_and_writes_params_that_params_takes(tmp_path):
    from trainer import hyperparameters as hps

    run_search(tmp_path / "study", max_trials=2, parallel_trials=1)
    summary = tuning.select_best(str(tmp_path / "study"), str(tmp_path / "best"), str(tmp_path / "report"))
    assert (tmp_path / "best" / "model.keras").read_bytes() == b"weights"
    resolved = hps.Hyperparameters.resolve(files=[str(tmp_path / "report" / "best_hyperparameters.yaml")])
    assert resolved.to_dict() == summary["best"]["hyperparameters"]
    on_disk = json.loads((tmp_path / "report" / "tuning.json").read_text())
    assert {"objective", "direction", "strategy", "best", "trials"} <= set(on_disk)
    assert set(on_disk["trials"][0]) >= {"trial", "status", "value", "hyperparameters", "epochs", "seconds"}


def test_a_run_without_an_id_gets_a_study_folder_of_its_own(tmp_path):
    """Backends before 2.5.0 give the setup step no run id: two such runs must not share one study."""
    root = str(tmp_path / "studies")
    assert tuning.study_location(root, "run-1", "unused") == storage.join(root, "run-1")
    first, second = (tuning.study_location(root, "", "unused") for _ in range(2))
    assert first != second and all(re.fullmatch(re.escape(root) + r"/[0-9a-f]{32}", uri) for uri in (first, second))
    # Without study_root, the setup step's own artifact location, which is one per run already.
    assert tuning.study_location("", "", str(tmp_path / "artifact")) == str(tmp_path / "artifact")
