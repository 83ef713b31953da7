"""Where a training step backs up its state so that a retry after preemption resumes."""

import logging

from trainer.checkpoints import durable_backup_dir


def test_explicit_root_is_per_run_and_safe_for_paths():
    assert durable_backup_dir("gs://ckpt/imgclf", "gs://root/x/trained_model", "run 7/a") == \
        "gs://ckpt/imgclf/run_7_a/train"
    assert durable_backup_dir("/mnt/volume", "/tmp/out", "") == "/mnt/volume/run/train"


def test_gcs_model_output_gets_a_sibling_backup():
    assert durable_backup_dir("", "gs://root/run/train/trained_model/", "r1") == \
        "gs://root/run/train/trained_model-backup"


def test_local_output_has_no_backup_and_says_so(caplog):
    caplog.set_level(logging.WARNING, logger="trainer.checkpoints")
    assert durable_backup_dir("", "/minio/mlpipeline/run/trained_model", "r1") is None
    assert "checkpoint_root" in caplog.text
