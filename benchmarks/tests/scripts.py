"""Loading the scripts of benchmarks/ in tests."""

import importlib.util

from tests.conftest import REPO


def load_script(name):
  """benchmarks/NAME.py, a script rather than a package module."""
  spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
