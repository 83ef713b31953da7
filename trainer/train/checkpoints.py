"""Where training backs up its state so that a retried (preempted) step resumes instead of restarting."""

from __future__ import annotations

import hashlib
import logging

from trainer import storage

log = logging.getLogger(__name__)


def durable_backup_dir(backup_root: str, model_uri: str) -> str | None:
    """Choose a backup folder that outlives the training pod, the same for every retry of one task and
    different for every other task.

    The model output's URI has both properties: KFP's driver fixes it once per task (the pipeline
    root, the task's name and a salt drawn per task) and hands the same executor input to every retry
    of the task's pod, while another run or another task gets another URI. (The run id would do too,
    but as an input it would make the step's cache key new in every run.) An explicit
    ``backup_root`` (a gs:// bucket path or a mounted volume) wins and gets a folder named by a hash
    of the URI; otherwise a gs:// model URI gets a sibling folder. Local-only outputs (kfp.local, or
    an artifact store TensorFlow cannot write to, such as MinIO) get no backup: say so, because a
    preempted run then starts again from epoch 1.
    """
    if backup_root:
        task = hashlib.sha256(model_uri.rstrip("/").encode("utf-8")).hexdigest()[:20]
        backup_dir = storage.join(backup_root, task, "train")
        log.info("Training backups of %s go to %s", model_uri, backup_dir)
        return backup_dir
    if model_uri.startswith("gs://"):
        return model_uri.rstrip("/") + "-backup"
    log.warning("No durable backup location: set the pipeline parameter checkpoint_root to a gs:// path or "
                "a mounted volume so a preempted training step resumes from its last epoch.")
    return None
