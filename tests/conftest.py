"""Shared pytest set-up: fixtures live in tests/support and are loaded as plugins."""

import os

# Keep TensorFlow's start-up chatter out of test logs; must be set before TensorFlow is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

pytest_plugins = ["tests.support.gcs", "tests.support.datasets", "tests.support.kfp_api", "tests.support.browser"]
