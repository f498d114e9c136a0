"""Bootstraps a RunPod worker from its network volume. Standard library plus uv, filelock,
psutil (and boto3 for ``s3://``): it runs before the worker's environment exists.

Comments cite the external contract as §N (sections of ``docs/SPEC.md``) and the failure
catalogue as F1–F20 (rows of ``docs/FAILURES.md``); both are copies the repository holds."""

__version__ = "0.1.0"
