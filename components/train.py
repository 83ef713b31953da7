"""Pipeline step 3: fine-tune the backbone and its classification head on the training split."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from components._image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train(
    dataset: Input[Dataset],
    trained_model: Output[Model],
    metrics: Output[Metrics],
    tensorboard_logs: Output[Artifact],
    initial_model_uri: str,
    backup_root: str,
    jit_compile: bool,
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
):
    """Trains the image classifier; every hyperparameter is described by `imgclf hyperparameters --list`.

    Args:
        dataset: TFRecord shards from the conversion step.
        trained_model: The exported model folder (SavedModel, Keras model, label map, hyperparameters).
        metrics: Final training and validation metrics.
        tensorboard_logs: TensorBoard event files; point a Kubeflow Tensorboard at this artifact's URI.
        initial_model_uri: An earlier imgclf model folder to continue from (incremental training), or "".
        backup_root: Durable folder (gs:// or volume) for per-epoch backups, so a retried step resumes;
            "" backs up next to the model output when that is on GCS, and otherwise not at all.
            Retries of this step find the backup through trained_model's URI, which is the same for
            every retry of one task (no run id among the inputs, so a run on unchanged data reuses
            this step from the cache).
        jit_compile: Compile the training step with XLA.
    """
    import json

    from trainer import hyperparameters, logs
    from trainer.train import checkpoints, training

    hp = hyperparameters.Hyperparameters.from_mapping(
        {name: value for name, value in locals().items() if name in hyperparameters.FIELDS})
    logs.configure()
    backup_dir = checkpoints.durable_backup_dir(backup_root, trained_model.uri)
    result = training.train(hp, dataset.path, trained_model.path, initial_model_dir=initial_model_uri or None,
                            backup_dir=backup_dir, tensorboard_dir=tensorboard_logs.path, jit_compile=jit_compile)
    for name, value in result["final_metrics"].items():
        metrics.log_metric(name, float(value))
    # The figures live in the artifact's metadata; a file at its URI too lets a cache reuse the step
    # (kfp.local treats an output without a file as missing).
    with open(metrics.path, "w", encoding="utf-8") as handle:
        json.dump(metrics.metadata, handle, indent=2)
    trained_model.metadata.update({"framework": "tensorflow", "backbone": model,
                                   "epochs_completed": result["epochs_completed"]})
