"""The benchmark scripts' tests (`make test-bench`), on the product suite's fixtures and its 8
simulated CPU devices; the scripts import each other from benchmarks/."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from tests.conftest import compilation_cache, pytest_configure, tiny_data_dir  # noqa: F401
