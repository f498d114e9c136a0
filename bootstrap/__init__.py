"""Bootstraps a RunPod worker from its network volume. Standard library plus uv, filelock,
psutil (and boto3 for ``s3://``): it runs before the worker's environment exists."""

__version__ = "0.1.0"
