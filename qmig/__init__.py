"""The `qmig` command line and benchmarks."""

__version__ = "0.1.0"
