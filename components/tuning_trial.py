"""Tuning step 3: one trial of the search, trained on the converted data set."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Output

from components._image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def tuning_trial(study_uri: str, slot: int, dataset: Input[Dataset], jit_compile: bool, metrics: Output[Metrics]):
    """Asks the study for hyperparameters, trains, reports every epoch's objective, and tells the result.

    The trial's model goes to the study folder (trials/<slot>/model). A trial that fails (a bad
    combination, out of memory) is recorded in the study with its reason and this step still succeeds,
    so the search goes on; a step killed by preemption is retried and the slot runs a new trial.

    Args:
        study_uri: The study folder written by the setup step.
        slot: Which trial of the search this is (0 .. n_trials - 1).
        dataset: TFRecord shards from the conversion step (validation split for the objective).
        jit_compile: Compile the training step with XLA.
        metrics: This trial's objective, epochs and duration.
    """
    import logging

    from trainer import tuning

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    record = tuning.run_trial(study_uri, slot, dataset.path, jit_compile=jit_compile)
    metrics.log_metric("trial", record["trial"])
    metrics.log_metric("epochs", record["epochs"])
    metrics.log_metric("seconds", record["seconds"])
    if record["value"] is not None:
        metrics.log_metric("objective", float(record["value"]))
    metrics.metadata["status"] = record["status"]
