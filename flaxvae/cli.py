"""The `flaxvae` command: `flaxvae COMMAND [flags]`; `flaxvae COMMAND --help` for each.

    flaxvae train --config configs/fashion_mnist_mlp.py --workdir runs/mlp [--config.key=value ...]
    flaxvae prepare-data fashion_mnist [--source_dir DIR] [--data_dir DIR]
    flaxvae prepare-data folder --source DIR --name NAME [--test_fraction F]
    flaxvae bench-input --config configs/fashion_mnist_mlp.py
    flaxvae bench --config configs/fashion_mnist_mlp.py [--steps N] [--cases default,dispatch,scaling]

Problems a user can fix (a bad config value, missing data, a batch that does
not split over the devices) end with one line on stderr and exit status 2,
before any file in the workdir is touched.
"""
import logging
import os
import sys

from absl import flags
from ml_collections import config_flags

from flaxvae import malloc, xla_flags

USAGE_ERROR = 2
COMMANDS = {}
_SCALING_CHILD = "FLAXVAE_BENCH_SCALING_CHILD"  # set in the bench's scaling child process


class UsageError(ValueError):
  pass


def command(name):
  def add(fn):
    COMMANDS[name] = fn
    return fn
  return add


def _parse(argv, define):
  """Parses `argv` into a fresh FlagValues; any problem becomes a one-line UsageError."""
  fv = flags.FlagValues()
  define(fv)
  flags.DEFINE_boolean("help", False, "show this help", flag_values=fv, short_name="h")
  try:
    positional = fv(argv)[1:]
  except Exception as e:  # absl and config_flags raise several types, all user errors here
    raise UsageError(_one_line(e)) from None
  if fv.help:
    print(fv.main_module_help() if hasattr(fv, "main_module_help") else "")
    print(fv.get_help())
    sys.exit(0)
  return fv, positional


def _one_line(e):
  text = " ".join(str(e).split())
  return text if len(text) < 400 else text[:400] + " ..."


def _config_flags(argv):
  """Defines --config (with its --config.key=value overrides, read from `argv`) and --workdir."""
  def define(fv):
    config_flags.DEFINE_config_file("config", None, "a config file (configs/*.py), "
                                    "optionally followed by :ARG for get_config(ARG)",
                                    flag_values=fv, lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "the run's directory: metrics, checkpoints, images",
                        flag_values=fv)
    flags.DEFINE_string("coordinator_address", None, "multi-process: host:port of process 0",
                        flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "multi-process: how many processes", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "multi-process: this process's index", flag_values=fv)
  return define



@command("train")
def train_command(argv):
  """Trains a VAE, resuming from the workdir's latest checkpoint if there is one."""
  fv, _ = _parse(argv, _config_flags(argv))
  if fv.config is None or not fv.workdir:
    raise UsageError("train needs --config configs/NAME.py and --workdir DIR")
  from flaxvae import distributed, train
  distributed.initialize(fv.coordinator_address, fv.num_processes, fv.process_id)
  final = train.train(fv.config, fv.workdir)
  print(f"test ELBO {final['elbo']:.2f} nats (rate {final['rate']:.2f}, "
        f"distortion {final['distortion']:.2f})")
  print(f"workdir: {os.path.abspath(fv.workdir)}  (metrics.jsonl, tensorboard/, images/, "
        "checkpoints/)")


@command("prepare-data")
def prepare_data_command(argv):
  """Prepares a dataset as TFDS ArrayRecord files once, so training needs no download.

  fashion_mnist (offline, IDX files); mnist, binarized_mnist, cifar10, celeb_a, imagenet32,
  imagenet64 (TFDS catalog: TensorFlow and internet once, `pip install 'flaxvae[prep]'`);
  folder --source DIR --name NAME [--test_fraction F] (your images; then data.name=NAME).
  """
  def define(fv):
    flags.DEFINE_string("source_dir", None, "folder with the original files", flag_values=fv)
    flags.DEFINE_string("data_dir", None, "where prepared datasets live "
                        "(default $FLAXVAE_DATA_DIR or ~/.cache/flaxvae/tfds)", flag_values=fv)
    flags.DEFINE_string("source", None, "folder: the images (or .npy arrays), optionally one "
                        "sub-folder per label", flag_values=fv)
    flags.DEFINE_string("name", None, "folder: the dataset's name (then data.name=NAME)",
                        flag_values=fv)
    flags.DEFINE_float("test_fraction", 0.0, "folder: fraction held out as split `test`",
                       flag_values=fv)
  fv, names = _parse(argv, define)
  from flaxvae import records
  known = ["fashion_mnist", *sorted(records.CATALOG), "folder"]
  if len(names) != 1 or names[0] not in known:
    raise UsageError(f"prepare-data takes one dataset name: {', '.join(known)}")
  name = names[0]
  if name == "fashion_mnist":
    from flaxvae import datasets
    path = datasets.prepare_fashion_mnist(fv.source_dir, fv.data_dir)
  elif name == "folder":
    if not fv.source or not fv.name:
      raise UsageError("prepare-data folder needs --source DIR and --name NAME")
    from flaxvae import folder
    path = folder.prepare_folder(fv.source, fv.name, fv.test_fraction, fv.data_dir)
    name = fv.name
  else:
    path = records.prepare_catalog(name, fv.data_dir)
  print(f"{name} ready in {path}")


@command("bench-input")
def bench_input_command(argv):
  """Examples/s each input pipeline delivers to the devices (no training), as JSON."""
  def define(fv):
    _config_flags(argv)(fv)
    flags.DEFINE_float("seconds", 5.0, "time per pipeline", flag_values=fv)
    flags.DEFINE_boolean("with_training", False, "also train end to end on each path and on "
                         "synthetic device-resident batches", flag_values=fv)
  fv, _ = _parse(argv, define)
  if fv.config is None:
    raise UsageError("bench-input needs --config configs/NAME.py")
  import json
  from flaxvae import pipeline
  result = pipeline.bench_input(fv.config, fv.seconds)
  if fv.with_training:
    result["training_examples_per_s"] = pipeline.bench_training(fv.config)
  print(json.dumps(result))


@command("bench")
def bench_command(argv):
  """Trainer step benchmarks (compile, examples/s, FLOP/s, MFU, scaling), one JSON line per case."""
  def define(fv):
    _config_flags(argv)(fv)
    flags.DEFINE_integer("steps", 0, "train steps per timed window (0: about 2 s)", flag_values=fv)
    flags.DEFINE_integer("windows", 5, "timed windows per case (the median is reported)",
                         flag_values=fv)
    flags.DEFINE_list("cases", ["default", "dispatch", "scaling"], "which cases", flag_values=fv)
    flags.DEFINE_boolean("input_only", False, "time only the input pipelines (bench-input)",
                         flag_values=fv)
  fv, _ = _parse(argv, define)
  if fv.config is None:
    raise UsageError("bench needs --config configs/NAME.py")
  from flaxvae import bench
  unknown = set(fv.cases) - set(bench.CASES)
  if unknown:
    raise UsageError(f"unknown --cases {sorted(unknown)}: choose from {', '.join(bench.CASES)}")
  if fv.input_only:
    import json
    from flaxvae import pipeline
    print(json.dumps(pipeline.bench_input(fv.config)))
    return
  if os.environ.get(_SCALING_CHILD) == "1":
    bench.run_cases(fv.config, ("scaling",), steps=fv.steps, windows=fv.windows)
    return
  here = tuple(c for c in fv.cases if c != "scaling")
  if here:
    bench.run_cases(fv.config, here, steps=fv.steps, windows=fv.windows)
  if "scaling" in fv.cases:
    _bench_scaling_in_child(argv[1:])


def _bench_scaling_in_child(args):
  """The scaling case in its own process with 8 simulated CPU devices.

  Simulated devices split the host's threads, which slows even a one-device step
  (~20% for the conv VAE), so the other cases run in this process without them.
  """
  import subprocess
  sys.stdout.flush()
  env = dict(os.environ, **{_SCALING_CHILD: "1"})
  xla_flags.add("--xla_force_host_platform_device_count=8", env)
  status = subprocess.run([sys.executable, "-m", "flaxvae.cli", "bench", *args],
                          env=env, check=False).returncode
  if status:
    raise UsageError(f"the scaling case failed (exit status {status}); its error is above")


@command("evaluate")
def evaluate_command(argv):
  """log p(x), inference and amortization gaps, ELBO surgery, active units -> DIR/eval.json."""
  def define(fv):
    flags.DEFINE_string("workdir", None, "the run's directory", flag_values=fv)
    flags.DEFINE_string("split", None, "split to evaluate (default: the run's eval split)",
                        flag_values=fv)
    flags.DEFINE_integer("num_importance_samples", None,
                         "K (default: eval.final_num_importance_samples)", flag_values=fv)
    flags.DEFINE_integer("max_examples", None, "first N examples (default: the whole split)",
                         flag_values=fv)
    flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)", flag_values=fv)
  fv, _ = _parse(argv, define)
  if not fv.workdir:
    raise UsageError("evaluate needs --workdir DIR (a trained run)")
  from flaxvae import evaluate
  row = evaluate.evaluate_workdir(fv.workdir, fv.split, fv.num_importance_samples,
                                  fv.max_examples, fv.step)
  print(evaluate.format_table(row))
  print(f"written: {os.path.join(fv.workdir, 'eval.json')}")


@command("report")
def report_command(argv):
  """PNG plots of the evaluation metrics over training steps, into DIR/report/."""
  fv, _ = _parse(argv, lambda fv: flags.DEFINE_string("workdir", None, "the run's directory",
                                                      flag_values=fv))
  if not fv.workdir:
    raise UsageError("report needs --workdir DIR (a trained run)")
  from flaxvae import report
  for path in report.make_report(fv.workdir):
    print(path)


def main(argv=None):
  if argv is None:  # the program itself, not a caller in Python: tune malloc before JAX loads
    malloc.reexec_with_tuned_malloc(sys.argv)
  argv = list(sys.argv if argv is None else argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help") or argv[1] not in COMMANDS:
    print(__doc__.strip())
    print("commands: " + ", ".join(sorted(COMMANDS)))
    if len(argv) >= 2 and argv[1] not in ("-h", "--help", "help"):
      print(f"flaxvae: error: unknown command {argv[1]!r}", file=sys.stderr)
      return USAGE_ERROR
    return 0 if len(argv) >= 2 else USAGE_ERROR
  from flaxvae.datasets import DataError
  from flaxvae.models import ConfigError
  try:
    COMMANDS[argv[1]]([f"flaxvae {argv[1]}", *argv[2:]])
  except (UsageError, ConfigError, DataError) as e:
    print(f"flaxvae {argv[1]}: error: {_one_line(e)}", file=sys.stderr)
    return USAGE_ERROR
  return 0


if __name__ == "__main__":
  sys.exit(main())
