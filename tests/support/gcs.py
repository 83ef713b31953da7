"""Fixtures for a local GCS API server (gcp-storage-emulator); filled in by the storage work."""
