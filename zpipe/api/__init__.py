"""Pipelines from Python; what users import is re-exported by ``zpipe`` itself."""
