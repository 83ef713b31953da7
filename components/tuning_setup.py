"""Tuning step 1: check the search and create its study folder, shared by every trial."""

from kfp import dsl
from kfp.dsl import Artifact, Output

from components._image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def tuning_setup(
    study: Output[Artifact],
    ranges: str,
    objective: str,
    strategy: str,
    max_trials: int,
    parallel_trials: int,
    early_stopping_type: str,
    study_root: str,
    run_id: str,
    augmentation: bool,
    augmentation_random_flip: str,
    augmentation_random_rotation: float,
    augmentation_random_zoom: float,
    batch_size: int,
    beta_1: float,
    beta_2: float,
    binary_mode: bool,
    dropout_rate: float,
    early_stopping: bool,
    early_stopping_min_delta: float,
    early_stopping_patience: int,
    epochs: int,
    epsilon: float,
    eval_metric: str,
    image_resize_interpolation: str,
    initial_accumulator_value: float,
    label_smoothing: float,
    learning_rate: float,
    momentum: float,
    optimizer: str,
    regularizers_l2: float,
    reinitialize_top_layer: str,
    rho: float,
    train_only_top_layer: bool,
    validation_split_ratio: float,
    test_split_ratio: float,
    random_seed: int,
    model: str,
    weights: str,
    image_size: int,
    class_weight: str,
    tflite_quantization: str,
) -> list[int]:
    """Checks the ranges and settings and writes the study (search space, objective, journal).

    Every hyperparameter that is not ranged keeps the value given here in every trial; a ranged one
    is searched (its value here is not used).

    Args:
        study: A copy of study.json; its metadata names the study folder.
        ranges: SageMaker ParameterRanges JSON or our YAML form; "" searches the recommended ranges.
        objective: validation:accuracy, validation:loss, or in binary mode validation:precision|recall|auc|prc.
        strategy: Bayesian, Random, Grid or Hyperband.
        max_trials: Trials in all.
        parallel_trials: Trials at a time.
        early_stopping_type: Auto stops a trial whose value at an epoch is worse than the median of the other
            trials' running averages there (from epoch 2, once 3 others reached it); Off does not.
        study_root: gs:// path or shared volume for the study folder ("": this step's own artifact
            location, which must then be gs:// or, in kfp.local, a local path).
        run_id: The pipeline run's id, naming the study folder under study_root; "" where the backend cannot
            give it (before 2.5.0): a fresh id then, made once per run (this step is neither cached nor retried).

    Returns:
        The lanes, one per trial running at once (each runs its trials one after another). The
        study folder's URI is in the study artifact's metadata (``study_uri``): a step's only output
        is what a loop can iterate over in kfp.local.
    """
    import json
    import os

    from trainer import logs
    from trainer.tune import tuning

    logs.configure()
    fixed = {name: value for name, value in locals().items() if name in tuning.hps.FIELDS}
    config = tuning.make_config(ranges, fixed, objective=objective, strategy=strategy, max_trials=max_trials,
                                parallel_trials=parallel_trials, early_stopping_type=early_stopping_type)
    study_uri = tuning.study_location(study_root, run_id, study.uri)
    written = tuning.create_study(config, study_uri)
    os.makedirs(study.path, exist_ok=True)
    with open(os.path.join(study.path, tuning.CONFIG_FILE), "w", encoding="utf-8") as handle:
        json.dump(written, handle, indent=2)
    study.metadata.update({"study_uri": study_uri, "n_trials": config.n_trials, "strategy": config.strategy,
                           "objective": config.objective, "tuned": list(config.space.names)})
    return list(range(config.lanes))
