"""Benchmarks behind ``qmig bench``: kept import-light because load-generator workers import it."""
