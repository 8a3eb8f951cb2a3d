"""Build hook for the optional native extension; all metadata lives in pyproject.toml."""
from setuptools import setup

setup()
