"""The image-classification pipeline: validate data, convert to TFRecords, train on GPUs, evaluate."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Model

from components.train import train
from pipelines._steps import prepare_data, release
from pipelines.cluster import ClusterSettings
from trainer.hyperparameters import DEFAULTS, FIELDS

# Also the tuning pipeline's pipelineInfo.name: the backend's cache is scoped to this name
# (backend/src/v2/driver cache lookups filter on "pipeline/<name>"), so sharing it lets a tuning run and a
# training run on the same content validate and convert it once.
PIPELINE_NAME = "image-classification"


class Outputs(NamedTuple):
    """What a run hands on: the model, the converted data set, the data and evaluation reports."""

    model: Model
    dataset: Dataset
    validation: Artifact
    evaluation: Artifact
    blessing: Artifact
    eval_value: float


def build_pipeline(settings: ClusterSettings | None = None) -> dsl.graph_component.GraphComponent:
    """The pipeline, fitted to a cluster by ``settings`` (node selectors, tolerations, credentials, sizes)."""
    settings = settings or ClusterSettings()

    @dsl.pipeline(name=PIPELINE_NAME, description=(
        "SageMaker's Image Classification - TensorFlow algorithm on Kubeflow: transfer learning of a "
        "Keras backbone with a new classification head, on a folder of class sub-folders."))
    def image_classification(
        data_uri: str,
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
        initial_model_uri: str = "",
        checkpoint_root: str = "",
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
        """Trains and evaluates an image classifier on a class-folder data set.

        Steps: look-at-data -> validate-data -> convert-to-tfrecords -> train (GPU) -> evaluate -> bless-model,
        then for a blessed model push-model (when model_registry_uri is set; then deploy-model when
        serving_namespace is set) and batch-predict (when batch_data_uri is set). The gate serves the model on
        loopback and checks its answers (infra validation). With caching on, a run on unchanged content reuses
        validation, conversion, training and evaluation; the look, the gate, the push, the deployment and batch
        prediction run every time.

        Args:
            data_uri: gs:// URI or mounted path of a folder with one sub-folder of images per class.
            max_rejected_fraction: Largest share of unusable image files the run tolerates.
            accelerator_count: GPUs for the training step, as text ("0": CPUs only); KFP reads it from 2.4.0.
            initial_model_uri: An earlier imgclf model to continue training from (incremental training).
            checkpoint_root: gs:// path or mounted volume for training backups that survive preemption.
            jit_compile: Compile the training step with XLA.
            min_eval_value: The model is blessed only when eval_metric reaches this value (0: no threshold).
            baseline_model_uri: An earlier model the new one must not fall below on eval_metric ("" : none).
            model_registry_uri: gs:// path or volume where a blessed model is pushed as a new version.
            batch_data_uri: Images to classify with a blessed model, written as JSON lines.
            serving_namespace: Kubernetes namespace where a pushed version is served as a KServe InferenceService
                ("" : not deployed).
            serving_model_name: The InferenceService's name (and model name in its URLs); "": the registry folder's.
            serving_gpus: GPUs of the model server (0: CPUs).
            serving_canary_traffic_percent: Share of traffic (1-99) for the new version beside the one served
                before; 0 sends it all to the new version.

        Every other argument is one of the algorithm's hyperparameters; see the README's table.
        """
        hyperparameters = {name: value for name, value in locals().items() if name in FIELDS}

        # Look at the data (every run), then validate and convert it: both reused from the cache while the
        # content is unchanged, and so are training and evaluation, whose inputs are then the same.
        data = prepare_data(data_uri, binary_mode=binary_mode, max_rejected_fraction=max_rejected_fraction,
                            validation_split_ratio=validation_split_ratio, test_split_ratio=test_split_ratio,
                            random_seed=random_seed, settings=settings)
        validation, conversion = data.validation, data.conversion

        training = train(dataset=conversion.outputs["dataset"], initial_model_uri=initial_model_uri,
                         backup_root=checkpoint_root, jit_compile=jit_compile, **hyperparameters)
        # Retries cover preemption; the step resumes from its last backup (see checkpoint_root). The backup
        # is found through the model output's URI, which every retry of the task shares. The backend retries
        # it from 2.4.1 (a root task); see the README for a node that disappears (Argo's retryPolicy).
        training.set_retry(num_retries=3, backoff_duration="60s", backoff_factor=2)
        settings.request_gpus(training, accelerator_count)
        settings.apply(training, "train", display_name="Train")

        released = release(training.outputs["trained_model"], conversion.outputs["dataset"], eval_metric=eval_metric,
                           min_eval_value=min_eval_value, baseline_model_uri=baseline_model_uri,
                           model_registry_uri=model_registry_uri, batch_data_uri=batch_data_uri, settings=settings,
                           serving_namespace=serving_namespace, serving_model_name=serving_model_name,
                           serving_gpus=serving_gpus, serving_canary_traffic_percent=serving_canary_traffic_percent)
        evaluation, gate = released.evaluation, released.gate

        return Outputs(training.outputs["trained_model"], conversion.outputs["dataset"],
                       validation.outputs["validation"], evaluation.outputs["evaluation"], gate.outputs["blessing"],
                       evaluation.outputs["eval_value"])

    return image_classification


image_classification = build_pipeline()
