"""Experiment configs: `default.py` plus one file per experiment, each with `get_config()`."""
