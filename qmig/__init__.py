"""The `qmig` command line and benchmarks."""

from broker import __version__  # one copy: the broker reports it in $SYS too

__all__ = ["__version__"]
