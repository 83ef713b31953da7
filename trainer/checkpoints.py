"""Where training backs up its state so that a retried (preempted) step resumes instead of restarting."""

from __future__ import annotations

import logging
import re

from trainer import storage

log = logging.getLogger(__name__)


def durable_backup_dir(backup_root: str, model_uri: str, run_id: str) -> str | None:
    """Choose a backup folder that outlives the training pod and is the same for each retry.

    A retry of a KFP task keeps the run id and the output artifact URI, so either identifies the
    backup of the attempt that was interrupted. An explicit ``backup_root`` (a gs:// bucket path or
    a mounted volume) wins; otherwise a gs:// model URI gets a sibling folder. Local-only outputs
    (kfp.local, or an artifact store TensorFlow cannot write to, such as MinIO) get no backup:
    say so, because a preempted run then starts again from epoch 1.
    """
    if backup_root:
        safe_run = re.sub(r"[^A-Za-z0-9._-]", "_", run_id) or "run"
        return storage.join(backup_root, safe_run, "train")
    if model_uri.startswith("gs://"):
        return model_uri.rstrip("/") + "-backup"
    log.warning("No durable backup location: set the pipeline parameter checkpoint_root to a gs:// path or "
                "a mounted volume so a preempted training step resumes from its last epoch.")
    return None
