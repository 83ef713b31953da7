"""Fixtures that generate small image-folder data sets; filled in by the data work."""
