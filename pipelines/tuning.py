"""The tuning pipeline: validate and convert once, search hyperparameters with parallel trials, release the best.

Designed for the open-source KFP v2 backend as well as kfp.local and Vertex: no ``dsl.Collected``
(whose fan-in the open-source driver has supported only in part). The trials share an Optuna study
in a folder every step can reach (gs:// or a volume), so nothing has to be gathered from the loop.
A loop's ``parallelism`` is fixed when the pipeline is compiled (``iteratorPolicy.parallelismLimit``),
while ``parallel_trials`` is a run-time setting, so trials run in lanes: one loop over ``parallel_trials``
lanes, without a limit, iterating over the setup step's list output, each lane one GPU task running its
trials one after another. (A nested loop, one task per trial, is what kfp.local 2.17 cannot run: its
inner iterations do not see the pipeline's parameters.)

The loop sits inside a sub-pipeline (``trial_lanes``), and the select step runs ``.after()`` that
sub-pipeline's task: backends up to 2.3.0 name no Argo task after a loop ("invalid dependency
for-loop-1", kfp #10050; 2.4.0 names it ``for-loop-N-loop``), while a dependency on a sub-DAG task is
an ordinary one on every backend (``backend/src/v2/compiler/argocompiler/dag.go``).

The pipeline's ``pipelineInfo.name`` is the main pipeline's (the backend scopes its cache to it), so the
look, validation and conversion of a tuning run are reused by a training run on the same content and
the reverse; its display name, ``image-classification-tuning``, is the name it is uploaded under.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model

from components.select_best_trial import select_best_trial
from components.tuning_setup import tuning_setup
from components.tuning_trials import tuning_trials
from pipelines._steps import prepare_data, release
from pipelines.cluster import ClusterSettings
from pipelines.image_classification import PIPELINE_NAME as CACHE_SCOPE
from trainer.hyperparameters import DEFAULTS, FIELDS
from trainer.tune.tuning import DEFAULT_OBJECTIVE

# The name it is uploaded and shown under (pipelineInfo.displayName); its cache scope is CACHE_SCOPE.
PIPELINE_NAME = "image-classification-tuning"
# The run form's tuning settings, with their defaults (the hyperparameters follow the schema).
TUNING_DEFAULTS = {"ranges": "", "objective": DEFAULT_OBJECTIVE, "strategy": "Bayesian", "max_trials": 10,
                   "parallel_trials": 2, "early_stopping_type": "Auto", "study_root": ""}


class Outputs(NamedTuple):
    """What a run hands on: the best model, its hyperparameters, the trials, the data and evaluation reports."""

    model: Model
    best_hyperparameters: Artifact
    tuning: Artifact
    dataset: Dataset
    validation: Artifact
    evaluation: Artifact
    blessing: Artifact
    eval_value: float


def build_pipeline(settings: ClusterSettings | None = None) -> dsl.graph_component.GraphComponent:
    """The tuning pipeline, fitted to a cluster by ``settings`` (as the main pipeline)."""
    settings = settings or ClusterSettings()

    @dsl.pipeline(name="trial-lanes", description="The lanes of trials, side by side: one GPU task each.")
    def trial_lanes(lanes: list[int], study: Input[Artifact], dataset: Input[Dataset], jit_compile: bool,
                    accelerator_count: str):
        with dsl.ParallelFor(lanes, name="lanes") as lane:
            trials = tuning_trials(study=study, lane=lane, dataset=dataset, jit_compile=jit_compile,
                                   gpus=accelerator_count)
            trials.set_caching_options(False)
            # Retries cover preemption; the retried lane skips the trials it finished and continues the
            # interrupted one from its last per-epoch backup. Backends retry tasks inside a loop from 2.14.0.
            trials.set_retry(num_retries=3, backoff_duration="60s", backoff_factor=2)
            settings.request_gpus(trials, accelerator_count)
            settings.apply(trials, "train", display_name="Trial lane")

    @dsl.pipeline(name=CACHE_SCOPE, display_name=PIPELINE_NAME, description=(
        "SageMaker's automatic model tuning for the Image Classification - TensorFlow algorithm on Kubeflow: "
        "a Bayesian, Random, Grid or Hyperband search over its hyperparameters with parallel GPU trials, "
        "and the best model evaluated, gated and pushed as by the main pipeline."))
    def image_classification_tuning(
        data_uri: str,
        ranges: str = TUNING_DEFAULTS["ranges"],
        objective: str = TUNING_DEFAULTS["objective"],
        strategy: str = TUNING_DEFAULTS["strategy"],
        max_trials: int = TUNING_DEFAULTS["max_trials"],
        parallel_trials: int = TUNING_DEFAULTS["parallel_trials"],
        early_stopping_type: str = TUNING_DEFAULTS["early_stopping_type"],
        study_root: str = TUNING_DEFAULTS["study_root"],
        augmentation: bool = DEFAULTS["augmentation"],
        augmentation_random_flip: str = DEFAULTS["augmentation_random_flip"],
        augmentation_random_rotation: float = DEFAULTS["augmentation_random_rotation"],
        augmentation_random_zoom: float = DEFAULTS["augmentation_random_zoom"],
        batch_size: int = DEFAULTS["batch_size"],
        beta_1: float = DEFAULTS["beta_1"],
        beta_2: float = DEFAULTS["beta_2"],
        binary_mode: bool = DEFAULTS["binary_mode"],
        dropout_rate: float = DEFAULTS["dropout_rate"],
        early_stopping: bool = DEFAULTS["early_stopping"],
        early_stopping_min_delta: float = DEFAULTS["early_stopping_min_delta"],
        early_stopping_patience: int = DEFAULTS["early_stopping_patience"],
        epochs: int = DEFAULTS["epochs"],
        epsilon: float = DEFAULTS["epsilon"],
        eval_metric: str = DEFAULTS["eval_metric"],
        image_resize_interpolation: str = DEFAULTS["image_resize_interpolation"],
        initial_accumulator_value: float = DEFAULTS["initial_accumulator_value"],
        label_smoothing: float = DEFAULTS["label_smoothing"],
        learning_rate: float = DEFAULTS["learning_rate"],
        momentum: float = DEFAULTS["momentum"],
        optimizer: str = DEFAULTS["optimizer"],
        regularizers_l2: float = DEFAULTS["regularizers_l2"],
        reinitialize_top_layer: str = DEFAULTS["reinitialize_top_layer"],
        rho: float = DEFAULTS["rho"],
        train_only_top_layer: bool = DEFAULTS["train_only_top_layer"],
        validation_split_ratio: float = DEFAULTS["validation_split_ratio"],
        test_split_ratio: float = DEFAULTS["test_split_ratio"],
        random_seed: int = DEFAULTS["random_seed"],
        model: str = DEFAULTS["model"],
        weights: str = DEFAULTS["weights"],
        image_size: int = DEFAULTS["image_size"],
        class_weight: str = DEFAULTS["class_weight"],
        tflite_quantization: str = DEFAULTS["tflite_quantization"],
        max_rejected_fraction: float = 0.01,
        accelerator_count: str = settings.gpu_count_default,
        jit_compile: bool = False,
        min_eval_value: float = 0.0,
        baseline_model_uri: str = "",
        model_registry_uri: str = "",
        batch_data_uri: str = "",
        serving_namespace: str = "",
        serving_model_name: str = "",
        serving_gpus: int = 0,
        serving_canary_traffic_percent: int = 0,
    ) -> Outputs:
        """Searches hyperparameters with parallel trials and releases the best model.

        Steps: look-at-data -> validate-data -> convert-to-tfrecords -> tuning-setup -> tuning-trials (one GPU
        task per lane, parallel_trials lanes at once, each running its trials one after another) ->
        select-best-trial -> evaluate -> bless-model -> push-model (-> deploy-model) | batch-predict, as the main
        pipeline.

        Args:
            data_uri: gs:// URI or mounted path of a folder with one sub-folder of images per class.
            ranges: SageMaker ParameterRanges JSON (or our YAML form) of the hyperparameters to search;
                "" searches the reference's recommended ranges.
            objective: validation:accuracy (maximized), validation:loss (minimized), or in binary mode
                validation:precision, validation:recall, validation:auc or validation:prc.
            strategy: Bayesian, Random, Grid (categorical ranges only) or Hyperband.
            max_trials: Trials in all.
            parallel_trials: Trials at a time, each on its own GPU(s).
            early_stopping_type: Auto stops a trial worse than the median of the other trials at the same
                epoch (from epoch 2); Off.
            study_root: gs:// path or volume mounted by every step for the shared study (needed when the
                pipeline root is not on GCS, e.g. the default MinIO).
            max_rejected_fraction: Largest share of unusable image files the run tolerates.
            accelerator_count: GPUs for each lane of trials, as text ("0": CPUs only); KFP reads it from 2.4.0.
            jit_compile: Compile the training step with XLA.
            min_eval_value: The best model is blessed only when eval_metric reaches this value (0: none).
            baseline_model_uri: An earlier model the best one must not fall below on eval_metric.
            model_registry_uri: gs:// path or volume where a blessed model is pushed as a new version.
            batch_data_uri: Images to classify with a blessed model, written as JSON lines.
            serving_namespace: Namespace where a pushed version is served as a KServe InferenceService ("": none);
                with serving_model_name, serving_gpus and serving_canary_traffic_percent as in the main pipeline.

        Every other argument is one of the algorithm's hyperparameters, kept at this value in every trial
        unless ranges searches it.
        """
        hyperparameters = {name: value for name, value in locals().items() if name in FIELDS}

        # The same look, validation and conversion as the main pipeline, reused from the cache on unchanged content.
        data = prepare_data(data_uri, binary_mode=binary_mode, max_rejected_fraction=max_rejected_fraction,
                            validation_split_ratio=validation_split_ratio, test_split_ratio=test_split_ratio,
                            random_seed=random_seed, settings=settings)
        validation, conversion = data.validation, data.conversion

        # Backends before 2.5.0 pass the run-id placeholder as literal text; the setup step then names the study.
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER if settings.backend.pipeline_job_id else ""
        setup = tuning_setup(ranges=ranges, objective=objective, strategy=strategy, max_trials=max_trials,
                             parallel_trials=parallel_trials, early_stopping_type=early_stopping_type,
                             study_root=study_root, run_id=run_id, **hyperparameters)
        # The study is state shared by the trials: every run makes its own.
        setup.set_caching_options(False)
        settings.apply(setup, "push", display_name="Set up the search")

        lanes = trial_lanes(lanes=setup.outputs["Output"], study=setup.outputs["study"],
                            dataset=conversion.outputs["dataset"], jit_compile=jit_compile,
                            accelerator_count=accelerator_count)
        if settings.backend.display_names:
            lanes.set_display_name("Trials")

        best = select_best_trial(study=setup.outputs["study"]).after(lanes)
        best.set_caching_options(False)
        settings.apply(best, "push", display_name="Select the best trial")

        released = release(best.outputs["best_model"], conversion.outputs["dataset"], eval_metric=eval_metric,
                           min_eval_value=min_eval_value, baseline_model_uri=baseline_model_uri,
                           model_registry_uri=model_registry_uri, batch_data_uri=batch_data_uri, settings=settings,
                           serving_namespace=serving_namespace, serving_model_name=serving_model_name,
                           serving_gpus=serving_gpus, serving_canary_traffic_percent=serving_canary_traffic_percent)
        evaluation, gate = released.evaluation, released.gate
        return Outputs(best.outputs["best_model"], best.outputs["best_hyperparameters"], best.outputs["tuning"],
                       conversion.outputs["dataset"], validation.outputs["validation"],
                       evaluation.outputs["evaluation"], gate.outputs["blessing"], evaluation.outputs["eval_value"])

    return image_classification_tuning


image_classification_tuning = build_pipeline()
