"""Pipeline step 6: copy a blessed model into a new version folder of the model registry."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Model

from components._image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def push_model(
    trained_model: Input[Model],
    registry_uri: str,
    blessing: Input[Artifact],
) -> str:
    """Pushes the model of this run to the registry; returns the new version's URI (or, when the registry's
    newest version already is this model, as in a run reused from the cache, that version's URI).

    Args:
        trained_model: The training step's model folder.
        registry_uri: The registry's root (gs:// URI or mounted path); versions go to 000001/, 000002/...
        blessing: The quality gate's folder; its blessing.json is stored with the version, and a
            decision of "not blessed" is refused.
    """
    import json
    import os

    from trainer import logs
    from trainer.layout import BLESSING_FILE
    from trainer.serve.registry import push_model as push

    logs.configure()
    with open(os.path.join(blessing.path, BLESSING_FILE), encoding="utf-8") as handle:
        decision = json.load(handle)
    return push(trained_model.path, registry_uri, metadata={**decision, "model_uri": trained_model.uri})
