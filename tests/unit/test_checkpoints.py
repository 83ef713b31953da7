"""Where a training step backs up its state so that a retry after preemption resumes."""

import logging
import re

from trainer.train.checkpoints import durable_backup_dir


def test_explicit_root_is_per_task_and_safe_for_paths():
    # Keyed on the model output's URI, which every retry of one task shares and no other task has.
    one = durable_backup_dir("gs://ckpt/imgclf", "gs://root/run 7/train/a/trained_model")
    assert one == durable_backup_dir("gs://ckpt/imgclf", "gs://root/run 7/train/a/trained_model/")
    assert one != durable_backup_dir("gs://ckpt/imgclf", "gs://root/run 8/train/b/trained_model")
    assert re.fullmatch(r"gs://ckpt/imgclf/[0-9a-f]{20}/train", one)
    assert re.fullmatch(r"/mnt/volume/[0-9a-f]{20}/train", durable_backup_dir("/mnt/volume", "/tmp/out"))


def test_gcs_model_output_gets_a_sibling_backup():
    assert durable_backup_dir("", "gs://root/run/train/trained_model/") == \
        "gs://root/run/train/trained_model-backup"


def test_local_output_has_no_backup_and_says_so(caplog):
    caplog.set_level(logging.WARNING, logger="trainer.train.checkpoints")
    assert durable_backup_dir("", "/minio/mlpipeline/run/trained_model") is None
    assert "checkpoint_root" in caplog.text
