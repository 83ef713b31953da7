"""Pipeline step 5: the quality gate; only a blessed model goes on to the registry."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components._image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def bless_model(
    trained_model: Input[Model],
    dataset: Input[Dataset],
    eval_metric: str,
    eval_value: float,
    min_eval_value: float,
    baseline_model_uri: str,
    blessing: Output[Artifact],
) -> bool:
    """Blesses the model of this run when it is good enough to push and serves; a model that is not ends the run
    green.

    Infra validation: the model is served on loopback by ``imgclf serve`` and asked about test-split images in
    each contract (TF Serving V1, SageMaker /invocations, V2); a model that does not load, or whose answers
    differ from its in-process predictions by more than 1e-5, is not blessed.

    Returns whether the model is blessed, as the plain return value ("Output") rather than a NamedTuple
    field: kfp.local (run-local; kfp 2.17) cannot evaluate a dsl.If on a named output and would skip
    the push silently. The reason, e.g. "not blessed: accuracy 0.9100 < threshold 0.9500", is in the
    log, in blessing.json and in the blessing artifact's metadata.

    Args:
        trained_model: The training step's model folder (served for infra validation; its URI is recorded).
        dataset: The converted data set; a baseline model is evaluated on its test split.
        eval_metric: The metric the evaluation step measured (its eval_metric output).
        eval_value: The model's value of eval_metric on the test split.
        min_eval_value: The threshold eval_value must reach; 0 means none.
        baseline_model_uri: An imgclf model folder (e.g. a registry version) the model must not fall
            below on eval_metric, or "" for none.
        blessing: Folder holding blessing.json (the decision and its reason), the model server's log and the
            baseline's evaluation.
    """
    import os

    from trainer import logs
    from trainer.serve.registry import decide_blessing

    logs.configure()
    os.makedirs(blessing.path, exist_ok=True)
    decision = decide_blessing(eval_metric, eval_value, dataset_dir=dataset.path, min_eval_value=min_eval_value,
                               baseline_model_uri=baseline_model_uri, model_uri=trained_model.uri,
                               output_dir=blessing.path, model_dir=trained_model.path)
    blessing.metadata.update(decision)
    return decision["blessed"]
