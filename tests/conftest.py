"""Shared fixtures for the vmbackup test suite."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (HERE, ROOT):
    if path not in sys.path:
        sys.path.insert(0, path)

pytest_plugins = ["xapisim.pytest_plugin"]
