"""The optional C++ kernel of the CPU statistics (collect/_fused.cpp); everything else is in pyproject.toml.

Built by ``pip install`` where a C++ compiler is at hand (no torch or numpy needed to build it);
where it is not, the install goes on without it and collection uses the torch code (slower on a
CPU, the same values)."""

import sys

from setuptools import Extension, setup

flags = [] if sys.platform == "win32" else ["-O3", "-std=c++17", "-fno-exceptions", "-fvisibility=hidden", "-Wno-psabi"]
setup(ext_modules=[Extension("collect._fused", ["collect/_fused.cpp"], extra_compile_args=flags, optional=True)])
