"""Pipeline step 7: serve the pushed version as a KServe InferenceService running `imgclf serve`, and wait for Ready."""

from kfp import dsl

from components._image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def deploy_model(
    version_uri: str,
    serving_namespace: str,
    serving_model_name: str,
    serving_gpus: int = 0,
    serving_canary_traffic_percent: int = 0,
    cpu: str = "1",
    memory: str = "2Gi",
    image: str = IMAGE,
) -> str:
    """Applies an InferenceService for the pushed version through the Kubernetes API and waits until it is Ready;
    returns its URL. Fails with the service's own reason when it does not become Ready.

    Args:
        version_uri: The registry version push-model wrote (a gs:// URI the serving pod reads).
        serving_namespace: The namespace of the InferenceService; this step's service account needs get, create
            and patch on inferenceservices.serving.kserve.io there.
        serving_model_name: The InferenceService's name and model name in its URLs ("": the registry folder's).
        serving_gpus: NVIDIA GPUs for the server (0: CPUs only; use the image's GPU variant with GPUs).
        serving_canary_traffic_percent: 1-99 sends that share of the traffic to this version and the rest to
            the one served before (KServe's Serverless mode); 0 sends it all here.
        cpu: CPU request and limit of the server.
        memory: Memory request and limit of the server.
        image: The image running `imgclf serve` (`imgclf compile --image` sets it with the steps' image).
    """
    from trainer import logs
    from trainer.serve.deploy import deploy

    logs.configure()
    result = deploy(version_uri, name=serving_model_name, namespace=serving_namespace, image=image, cpu=cpu,
                    memory=memory, gpus=serving_gpus, canary_traffic_percent=serving_canary_traffic_percent)
    return result["url"]
