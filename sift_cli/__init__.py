"""sift-train: train on the samples that matter, measured in wall-clock time to target accuracy."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sift-train")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "unknown"
