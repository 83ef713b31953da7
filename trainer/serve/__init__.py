"""Serving stage: bless, push, check, deploy, serve models (registry, infra_validation, deploy, serving, prediction)."""
