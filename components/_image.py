"""The container image every imgclf component runs in, named once for the whole project."""

IMAGE_NAME = "ghcr.io/imgclf/imgclf"
IMAGE_TAG = "0.1.0"
IMAGE = f"{IMAGE_NAME}:{IMAGE_TAG}"
