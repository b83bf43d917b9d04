"""Runs over stacks: plane sources, settings, the one pipeline driver, outputs and
executors (local, Dask)."""
