"""sift-train: train on the samples that matter, measured in wall-clock time to target accuracy."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sift-train")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "unknown"

__all__ = ["select"]


def __getattr__(name: str):
    # the library API loads on first use: `import sift_cli` (the console script's) stays free of torch
    if name in __all__:
        from sift_cli import api

        return getattr(api, name)
    raise AttributeError(f"module 'sift_cli' has no attribute {name!r}")
