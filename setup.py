"""setup.py: the package is pure Python; kernels are compiled on first use (Triton JIT)."""
from setuptools import setup

setup()
