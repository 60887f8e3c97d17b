"""Benchmarks of zpipe against raw pyzmq and pipeline-lib (issue 4): `python -m bench`."""
