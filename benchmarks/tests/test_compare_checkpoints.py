"""benchmarks/compare_checkpoints.py: the bitwise check that a refactor changed no number."""

import numpy as np
import pytest
from scripts import load_script

compare = load_script("compare_checkpoints")


def test_identical_states_have_no_differing_leaf():
  state = {"params": {"w": np.arange(6, dtype=np.float32)}, "step": np.int32(3)}
  assert compare.differing_leaves(state, {k: v for k, v in state.items()}) == []


def test_one_ulp_or_a_dtype_is_a_difference():
  a = {"params": {"w": np.ones(3, np.float32), "b": np.zeros(2, np.float32)}}
  b = {"params": {"w": np.nextafter(a["params"]["w"], 2), "b": np.zeros(2, np.float64)}}
  assert compare.differing_leaves(a, b) == ["['params']['b']", "['params']['w']"]


def test_different_trees_are_refused():
  with pytest.raises(SystemExit, match="different trees"):
    compare.differing_leaves({"a": np.zeros(1)}, {"b": np.zeros(1)})
