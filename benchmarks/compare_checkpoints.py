"""Are two runs' checkpoints bitwise identical? The check behind "a refactor changes no number".

    .venv/bin/python benchmarks/compare_checkpoints.py RUN_A RUN_B STEP

Reads the `state` item of checkpoint STEP in both workdirs (params, optimizer state, EMA, RNG,
step and guard counters) and compares every leaf's dtype and bytes; exits 1 naming the leaves
that differ. The house refactor (issue 33) was checked this way: the default config trained for
200 steps before and after it, with a small final evaluation, which does not touch the state:

    flaxvae train --config configs/fashion_mnist_mlp.py --workdir RUN --config.num_steps=200 \
      --config.eval.final_num_importance_samples=2 --config.eval.final_num_examples=16 \
      --config.eval.amortization_examples=0 --config.log_every_steps=100
"""

import os
import sys

import jax
import numpy as np

from flaxvae.train import checkpoint


def differing_leaves(state_a, state_b):
  """Paths of the leaves whose dtype or bytes differ; a different tree structure raises."""
  leaves_a = jax.tree_util.tree_leaves_with_path(state_a)
  leaves_b = jax.tree_util.tree_leaves_with_path(state_b)
  if [path for path, _ in leaves_a] != [path for path, _ in leaves_b]:
    raise SystemExit("the two states have different trees: not the same model or version")
  return [
    jax.tree_util.keystr(path)
    for (path, a), (_, b) in zip(leaves_a, leaves_b)
    if np.asarray(a).dtype != np.asarray(b).dtype
    or np.asarray(a).tobytes() != np.asarray(b).tobytes()
  ]


def main(argv):
  if len(argv) != 4:
    raise SystemExit(__doc__)
  run_a, run_b, step = argv[1:]
  states = [
    checkpoint.read_state(os.path.join(run, "checkpoints", step, "state")) for run in (run_a, run_b)
  ]
  differing = differing_leaves(*states)
  leaves = jax.tree.leaves(states[0])
  print(
    f"{len(leaves)} leaves, {sum(np.asarray(x).nbytes for x in leaves)} bytes; "
    f"differing: {', '.join(differing) or 'none'}"
  )
  return 1 if differing else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
