"""Tuning step 2: one lane of the search, running its trials one after another on the converted data set."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Output

from components._image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def tuning_trials(study: Input[Artifact], lane: int, dataset: Input[Dataset], jit_compile: bool,
                  gpus: str, metrics: Output[Metrics]):
    """Runs this lane's trials: each asks the study for hyperparameters, trains, reports every epoch, tells.

    Lanes run side by side, parallel_trials of them, each on its own GPU(s). A trial's model goes to the
    study folder (trials/<slot>/model). A trial that fails (a bad combination, out of memory) is recorded
    in the study with its reason and the lane goes on; a lane killed by preemption is retried, skips
    the trials it already finished and continues the interrupted one from its last per-epoch backup
    (trials/<slot>/backup/<trial number>).

    Args:
        study: The setup step's study artifact; its metadata names the study folder.
        lane: This lane's number, from 0; it runs trial slots lane, lane + lanes, lane + 2 * lanes, ...
        dataset: TFRecord shards from the conversion step (the validation split gives the objective).
        jit_compile: Compile the training step with XLA.
        gpus: The run form's accelerator_count, as text (logged as such). Passed as an input so that the
            compiled loop carries the pipeline parameter that the GPU request reads: kfp 2.17 does not carry
            a parameter used only in ``set_accelerator_limit`` into a ParallelFor. A YAML compiled for KFP
            2.2.0 does not read it: its lanes get the GPU count fixed at compile time.
        metrics: The lane's trials by status and its best objective.
    """
    import logging

    from trainer import logs
    from trainer.tune import tuning

    logs.configure()
    logging.info("Lane %d: the run form's accelerator_count is %r (the pod's GPU limit where the backend reads it; "
                 "a YAML compiled for KFP 2.2.0 fixes the count instead)", lane, gpus)
    records = tuning.run_lane(study.metadata["study_uri"], int(lane), dataset.path, jit_compile=jit_compile)
    if records:
        for name, value in tuning.trial_metrics(records, records[0]["direction"]).items():
            metrics.log_metric(name, value)
