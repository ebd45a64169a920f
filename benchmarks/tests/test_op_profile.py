"""benchmarks/op_profile.py: XLA:CPU's thunk trace read into time per kind of op."""

import json
import os
import subprocess
import sys

import pytest
from scripts import load_script

from tests.conftest import REPO

cases = load_script("cases")
op_profile = load_script("op_profile")


def test_self_times_take_nested_thunks_out_of_their_loop():
  # A while loop (0-100 ns) runs two fusions inside it; a convolution follows on the thread.
  events = [("fusion.2", 60, 30), ("while", 0, 100), ("fusion.1", 10, 40), ("convolution", 100, 5)]
  assert sorted(op_profile.self_times(events)) == [
    ("convolution", 5),
    ("fusion.1", 40),
    ("fusion.2", 30),
    ("while", 30),
  ]
  names = (
    "convolution.3",
    "conv_general_dilated.12",
    "ynn_fusion.4",
    "dot.7",
    "transpose_copy_fusion.9",
    "copy.2",
    "while.1",
    "add_maximum_fusion.3",
    "wrapped_log-plus-one",
    "rng",
  )
  assert [op_profile.op_kind(n) for n in names] == [
    "convolution",
    "convolution",
    "dot",
    "dot",
    "layout transpose or copy",
    "layout transpose or copy",
    "control flow",
    "elementwise fusion",
    "elementwise fusion",
    "other",
  ]


def test_waits_after_an_asynchronous_op_count_to_it_until_a_long_wait_ends():
  us = 1_000
  events = [
    ("conv", 0, 1 * us),
    ("fusion", 1 * us, 2 * us),  # the conv goes on after its event
    ("next", 500 * us, 501 * us),  # a long wait: the conv's completion
    ("other", 503 * us, 504 * us),  # a short hand-off, no conv in flight
    ("late", 600 * us, 601 * us),
  ]  # a long wait with no conv in flight: idle
  waited, other_ns = op_profile.untraced_waits(events, lambda name: name.startswith("conv"))
  assert waited == {"conv": 498 * us} and other_ns == 2 * us + 96 * us
  assert op_profile.untraced_waits([("a", 0, 5), ("b", 1, 3), ("c", 4, 9)], bool) == ({}, 0)
  # Two in flight: the wait goes to the one started last.
  waited, _ = op_profile.untraced_waits(
    [("conv.1", 0, 1), ("conv.2", 1, 2), ("x", 100, 101)], lambda name: name.startswith("conv")
  )
  assert waited == {"conv.2": 98}


@pytest.mark.slow  # minutes of compiles or child processes: -m 'not slow' leaves it out
def test_profile_case_traces_the_trainers_step_in_a_child_with_thunk_tracing(
  tmp_path, capfd, tiny_data_dir
):
  status = cases.main(
    [
      "cases.py",
      f"--config={REPO / 'configs' / 'fashion_mnist_mlp.py'}",
      "--cases",
      "profile",
      "--config.data.name=tiny",
      f"--config.data.data_dir={tiny_data_dir}",
      "--config.batch_size=8",
      "--config.steps_per_dispatch=2",
      "--config.model.hidden=(16,)",
    ]
  )
  out = capfd.readouterr().out
  assert status in (0, None), out
  row = json.loads(out.strip().splitlines()[-1])
  assert row["case"] == "profile" and row["steps"] == 6 and row["threads"] >= 1
  assert set(row["ms_per_step_by_kind"]) == {*op_profile.OP_KINDS, op_profile.WAITING}
  assert row["busy_ms_per_step"] + row["convolution_wait_ms_per_step"] <= (
    sum(row["ms_per_step_by_kind"].values()) + 0.01
  )
  assert sum(row["share_by_kind"].values()) == pytest.approx(1.0, abs=1e-3)
  assert row["heaviest"] and all(h["ms_per_step"] >= 0 and h["shape"] for h in row["heaviest"])


TRACE_CONVOLUTIONS = """
import json, sys
import flaxvae
flaxvae.apply_process_defaults()
import jax, jax.numpy as jnp
sys.path.insert(0, BENCHMARKS)
import op_profile
def chain(x, w):
  for _ in range(4):
    x = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return x
x, w = jnp.ones((64, 32, 32, 8)), jnp.full((3, 3, 8, 8), 0.01)
compiled = jax.jit(chain).lower(x, w).compile()
jax.block_until_ready(compiled(x, w))
per_op, async_ns, other_ns, wall, _ = op_profile.trace_ops(
    lambda: compiled(x, w), op_profile._hlo_instructions(compiled), 10)
conv_ns = sum(ns for name, ns in per_op.items() if op_profile.op_kind(name) == "convolution")
print(json.dumps(dict(conv_ns=conv_ns, async_ns=async_ns, wall_ns=wall * 1e9)))
"""


def test_the_profile_counts_convolutions_that_finish_after_their_thunk(tmp_path):
  # XLA:CPU's Eigen convolutions end on the intra-op pool after their traced thunk returns: a
  # profile of traced thunks alone credited a chain of convolutions with almost none of its time.
  env = dict(os.environ, XLA_FLAGS=op_profile.TRACE_THUNKS)
  script = TRACE_CONVOLUTIONS.replace("BENCHMARKS", repr(str(REPO / "benchmarks")))
  result = subprocess.run(
    [sys.executable, "-c", script],
    env=env,
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=300,
    check=True,
  )
  row = json.loads(result.stdout.strip().splitlines()[-1])
  assert row["conv_ns"] >= 0.8 * row["wall_ns"] and row["async_ns"] <= row["conv_ns"]
