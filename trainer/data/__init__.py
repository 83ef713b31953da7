"""Data stage: look at, validate, convert and read images (fingerprint, validation, conversion, demo_data, reader)."""
