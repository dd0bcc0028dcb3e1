"""Build entry point. The pure-Python library installs without a compiler; csrc/ extensions hook in here."""

from setuptools import setup

setup()
