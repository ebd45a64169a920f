"""Every config key flaxvae knows, with its default. Config files start from this.

Scripts can rely on these keys existing in every config; a config file only overrides what
differs, and `--config.key=value` on the command line overrides both. A model's own keys
(`config.model.*` besides `name`) are its constructor's keyword arguments: `model_config`
fills them in from there, the one place their defaults live.
"""

import ml_collections

from flaxvae import models


def model_config(name="mlp", **overrides):
  """config.model for model `name`: every key of the model with its default, then `overrides`."""
  config = ml_collections.ConfigDict({"name": name, **models.model_options(name)})
  config.update(overrides)
  return config


def base_optimizer():
  """An optimizer section (config.optimizer, config.adversary.optimizer) with its defaults."""
  o = ml_collections.ConfigDict()
  o.name = "adam"  # adam, adamw, adamax, lamb
  o.learning_rate = 1e-3
  o.schedule = "constant"  # constant, warmup_constant or warmup_cosine
  o.warmup_steps = 0
  o.decay_start = 0  # warmup_cosine: flat at the peak until this step, then cosine
  o.end_factor = 0.0  # warmup_cosine: the final rate as a fraction of the peak
  o.b1 = 0.9
  o.b2 = 0.999
  o.eps = 1e-8
  o.weight_decay = 0.0  # decoupled (adamw, adamax, lamb)
  o.grad_clip_norm = 0.0  # 0 disables global-norm clipping
  o.accumulate_steps = 1  # microbatches per step, gradients averaged (same numbers, less memory)
  o.skip_nonfinite = True  # a step with a NaN/inf loss or gradient leaves the state unchanged
  o.skip_threshold = 0.0  # > 0: skip a step whose gradient norm exceeds this
  o.adaptive_skip = 0.0  # > 0: also skip above this multiple of a running quantile of recent norms
  o.adaptive_skip_quantile = 0.9
  o.adaptive_skip_window = 200  # recent finite gradient norms the quantile is taken over

  # top-level parameter groups never updated, e.g. ("decoder", "to_output")
  o.frozen = ()
  return o


def base_config():
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.num_steps = 10_000
  config.batch_size = 128  # global: split evenly over all devices
  config.steps_per_dispatch = 1  # train steps run per jitted call (lax.scan over batches)
  config.scan_unroll = (
    1  # lax.scan unroll factor; conv models want it equal to steps_per_dispatch on CPU
  )
  # compute dtype (float32, bfloat16); parameters, optimizer state and loss sums stay float32
  config.dtype = "float32"
  config.log_every_steps = 1000
  # > 0 keeps an EMA of the parameters, used for evaluation; its decay warms up from 0.1
  # (train/step.py ema_decay_at), so an early evaluation is not mostly the initialisation
  config.ema_decay = 0.0
  config.max_consecutive_skips = 50
  config.time_budget_s = (
    0.0  # > 0: stop training at the first log step after this many seconds, then evaluate
  )

  config.model = model_config("mlp")

  config.objective = ml_collections.ConfigDict()
  config.objective.name = "elbo"  # elbo (k-sample average) or iwae
  config.objective.num_samples = 1
  config.objective.likelihood = (
    "bernoulli"  # bernoulli, gaussian, discretized_logistic, mixture_logistic
  )
  config.objective.gaussian_logvar = ml_collections.config_dict.placeholder(float)  # None: learned
  config.objective.num_mixtures = 10  # mixture_logistic: logistic components per pixel
  config.objective.beta = 1.0
  config.objective.kl_warmup_steps = 0
  config.objective.free_bits = 0.0  # nats per group of latents (elbo objective only)
  config.objective.free_bits_per = (
    "unit"  # the groups free bits floor: each latent unit, or each layer
  )
  # > 0: + weight * LPIPS(x, x_hat) per pixel, summed like log p(x|z) (LDM's perceptual term);
  # needs a model with the reconstruction capability and the LPIPS weights (flaxvae weights)
  config.objective.perceptual_weight = 0.0

  config.data = ml_collections.ConfigDict()
  config.data.name = "fashion_mnist"
  config.data.source_dir = "/usr/share/datasets/fashion-mnist"
  config.data.data_dir = (
    ""  # prepared datasets; empty: $FLAXVAE_DATA_DIR, $TFDS_DATA_DIR or ~/.cache/flaxvae/tfds
  )
  config.data.protocol = (
    "grey"  # grey, 8bit, binarized (dynamic; fixed-seed test draw), static_binarized
  )
  config.data.train_split = "train"
  config.data.eval_split = "test"
  config.data.pipeline = "auto"  # auto, in_memory (train split on device) or streaming (Grain)
  config.data.in_memory_max_bytes = 1 << 30  # auto: splits up to this size stay on every device
  config.data.read_threads = 2  # streaming: Grain threads reading and decoding batches
  config.data.prefetch_batches = 64  # streaming: batches Grain reads ahead of the trainer

  config.optimizer = base_optimizer()

  config.adversary = adversary_config()

  config.init = ml_collections.ConfigDict()
  config.init.params_from = ""  # a trained run's workdir: start from (some of) its parameters
  config.init.param_groups = ()  # top-level parameter groups taken from it; () takes them all

  config.parallel = ml_collections.ConfigDict()
  config.parallel.backend = "shard_map"  # shard_map or pmap
  config.parallel.num_devices = 0  # 0: all devices JAX sees
  config.parallel.mesh = (
    ""  # "data:2,fsdp:4": parameters, optimizer state and EMA split over fsdp; "": all on data
  )
  config.parallel.wait_timeout_s = (
    600.0  # the host waits this long on one dispatch before calling the run stuck (several devices)
  )

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 5_000  # 0: only at the end and on preemption
  config.checkpoint.max_to_keep = 3
  config.checkpoint.keep_best = 1  # also keep the checkpoints with the highest eval ELBO
  config.checkpoint.allow_config_change = False  # True: resume even if meaning-changing keys differ

  config.eval = ml_collections.ConfigDict()
  config.eval.every_steps = 5_000  # 0: only the final evaluation
  config.eval.batch_size = 1_000
  config.eval.num_examples = 2_000  # during training; the final evaluation uses the whole split
  config.eval.num_importance_samples = 100  # during training
  config.eval.final_num_importance_samples = 5_000
  config.eval.final_num_examples = 0  # 0: the whole split
  config.eval.amortization_examples = 1_000  # final evaluation only; 0 skips the amortization gap
  config.eval.amortization_steps = 500  # per-example Adam steps on the local variational parameters
  config.eval.amortization_learning_rate = 1e-2  # cosine-decayed to 0 over the steps
  config.eval.num_image_samples = 64
  config.eval.log_px_estimator = (
    "iwae"  # final evaluation's log p(x): iwae, or ais (also reports IWAE's)
  )
  config.eval.ais_steps = 500  # annealing steps (sigmoid schedule); also BDMC's
  config.eval.ais_chains = 4  # chains per example, their estimates of p(x) averaged
  config.eval.ais_leapfrog = 5  # leapfrog steps per HMC transition
  config.eval.ais_examples = 1_000  # AIS on the first N evaluated examples (0: all)
  config.eval.ais_init = (
    "auto"  # auto (q(z|x) if the model has its density, else p(z)), posterior, prior
  )
  config.eval.bdmc_examples = (
    0  # > 0: BDMC sandwich of log p(x) on N examples simulated from the model
  )
  config.eval.schedule = (
    "every"  # every (eval.every_steps), or log: also log-spaced steps from step 0
  )
  config.eval.log_points = (
    12  # log schedule: evaluations at 0 and ~log-spaced steps up to num_steps
  )
  # PSNR, SSIM, LPIPS, rFID and latent statistics (eval/reconstruction.py): always for models
  # with the reconstruction capability; True adds them for other models with one latent layer
  config.eval.reconstruction_metrics = False
  config.eval.rfid_examples = 0  # final evaluation's rFID on the first N examples (0: all)
  return config


def adversary_config():
  """config.adversary: off ("none"), with LDM's discriminator and loss settings ready for
  name="patchgan" (taming-transformers' PatchGAN, LDM's LPIPSWithDiscriminator)."""
  a = ml_collections.ConfigDict()
  a.name = "none"  # none, or patchgan (pix2pix's NLayerDiscriminator)
  a.num_layers = 3  # stride-2 convolutions before the two stride-1 ones
  a.width = 64  # channels of the first convolution, doubled per layer up to 8x
  a.norm = "batch"  # batch (statistics of the global batch across devices), group or none
  a.loss = "hinge"  # hinge or non_saturating
  a.weight = 0.5  # LDM's disc_weight: multiplies the adaptive weight
  # LDM's adaptive weight: |grad of the reconstruction| / |grad of the adversarial term| at the
  # decoder's last layer, clipped to [0, max_adaptive_weight]
  a.adaptive_weight = True
  a.max_adaptive_weight = 1e4
  a.start_step = 0  # the adversarial term reaches the autoencoder from this step (LDM disc_start)
  a.train_start = -1  # the discriminator trains from this step; -1: start_step (LDM)
  a.lecam_weight = 0.0  # > 0: LeCam regularisation (Tseng et al. 2021)
  a.lecam_decay = 0.99  # its EMA of the discriminator's mean outputs
  a.r1_weight = 0.0  # > 0: R1 gradient penalty on real images, times weight / 2
  a.optimizer = ml_collections.ConfigDict(base_optimizer())
  a.optimizer.b1, a.optimizer.b2 = 0.5, 0.9  # LDM's Adam
  return a


def ldm_autoencoder_recipe(
  *, data, batch_size, discriminator_start=50_001, base_learning_rate=4.5e-6, **model_options
):
  """LDM's KL autoencoder recipe (latent-diffusion's autoencoder_kl_*.yaml with
  LPIPSWithDiscriminator): an L1 reconstruction (the laplace likelihood with LDM's logvar 0,
  see objectives/likelihoods.py) + LPIPS (weight 1.0) + KL weight 1e-6, all summed over pixels
  and latent elements as LDM does; a 3-layer PatchGAN with BatchNorm and hinge loss from
  `discriminator_start` (disc_weight 0.5, adaptive weight); both players Adam (0.5, 0.9) at
  LDM's rate, base_learning_rate times the global batch (main.py's scaling). `model_options`
  change autoencoder_kl's own defaults (kl-f8's: channels 128, multipliers 1,2,4,4, ...)."""
  config = base_config()
  config.model = model_config("autoencoder_kl", **model_options)
  config.data.name = data
  config.objective.likelihood = "laplace"
  config.objective.beta = 1e-6
  config.objective.perceptual_weight = 1.0
  config.batch_size = batch_size
  config.num_steps = 500_000
  for o in (config.optimizer, config.adversary.optimizer):
    o.learning_rate = base_learning_rate * batch_size
    o.b1, o.b2 = 0.5, 0.9
  a = config.adversary
  a.name, a.num_layers, a.width, a.norm, a.loss = "patchgan", 3, 64, "batch", "hinge"
  a.weight, a.start_step = 0.5, discriminator_start
  config.log_every_steps = 100
  config.checkpoint.every_steps = 5_000
  config.eval.every_steps = 25_000
  config.eval.batch_size = 16
  config.eval.num_examples = 1_000
  config.eval.num_importance_samples = 1
  config.eval.final_num_importance_samples = 1
  config.eval.final_num_examples = 10_000
  config.eval.amortization_examples = 0
  config.eval.num_image_samples = 16
  return config


def tiny_variant(config, image_shape=None):
  """The same config shrunk to run two steps in seconds on a CPU (`get_config("tiny")`): the
  test that every shipped config trains uses it on a small synthetic dataset of its shape.

  Layer counts become 1 per resolution and widths 1/16 (at least 8); the batch, steps and
  evaluation become tiny. The architecture's structure (resolutions, likelihood, protocol)
  stays, so the code path is the config's own.
  """
  c = config
  c.batch_size, c.num_steps, c.steps_per_dispatch, c.scan_unroll = 8, 2, 1, 1
  c.log_every_steps, c.ema_decay = 1, c.ema_decay and 0.5
  c.checkpoint.every_steps, c.eval.every_steps = 0, 0
  c.eval.batch_size, c.eval.final_num_examples = 8, 8
  c.eval.final_num_importance_samples, c.eval.amortization_examples = 2, 0
  c.eval.num_image_samples = 4
  c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, 1)
  c.optimizer.decay_start = 0
  m = c.model
  if m.name == "vdvae":
    shrink = lambda spec: ",".join(
      f"{r}:{min(int(n), 1)}" for r, n in (p.split(":") for p in spec.split(","))
    )
    m.dec_layers, m.enc_blocks = shrink(m.dec_layers), shrink(m.enc_blocks)
    widths = str(m.widths)
    m.widths = (
      str(max(8, int(widths) // 16))
      if widths.isdigit()
      else ",".join(
        f"{r}:{max(8, int(w) // 16)}" for r, w in (p.split(":") for p in widths.split(","))
      )
    )
    m.latent_channels = min(m.latent_channels, 4)
  if m.name == "autoencoder_kl":  # the same levels and layout, 8 channels in groups of 4
    m.channels, m.norm_groups, m.num_res_blocks = 8, 4, 1
  if c.adversary.name != "none":  # both sides of the discriminator's start in two steps
    c.adversary.width, c.adversary.start_step = 8, min(c.adversary.start_step, 1)
    c.adversary.train_start = -1
  return c


def set_keys(config, **changes):
  """Sets {"a.b.c": value} (dotted keys, as `--config.a.b.c=value`) in `config`, locked or not;
  returns it."""
  with config.unlocked():
    for key, value in changes.items():
      node = config
      *path, leaf = key.split(".")
      for part in path:
        node = node[part]
      node[leaf] = value
  return config


def load_config_file(path, arg=None):
  """get_config(arg) of the config file at `path` (get_config() when `arg` is None), as
  `--config path[:arg]` loads it: for scripts and tests that take a config without the CLI."""
  import importlib.util  # noqa: PLC0415  (config files only)
  import os  # noqa: PLC0415

  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f"flaxvae_config_{name}", path)
  if spec is None:
    raise FileNotFoundError(f"config file {path} not found")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config() if arg is None else module.get_config(arg)


def sibling(config_file, name, arg=None):
  """get_config(arg) of config `name` in the folder of `config_file` (a config's __file__):
  a config that is another one with a few changes says so instead of repeating it."""
  import os  # noqa: PLC0415

  return load_config_file(os.path.join(os.path.dirname(os.path.abspath(config_file)), name), arg)


def vdvae_recipe(
  *,
  data,
  dec_layers,
  enc_blocks,
  width,
  learning_rate,
  grad_clip,
  skip_threshold,
  ema_decay,
  batch_size,
  dims,
):
  """VDVAE's published recipe (openai/vdvae hps.py) for `data`: bottleneck 0.25, 16 latent
  channels, a 10-component mixture of logistics on 8-bit data, AdamW (b2 0.9, weight decay
  0.01) after 100 warm-up steps. VDVAE's loss is per dimension and flaxvae's per example, so
  its clip and skip thresholds are multiplied by `dims`, the dimensions per example."""
  config = base_config()
  config.model = model_config(
    "vdvae",
    dec_layers=dec_layers,
    enc_blocks=enc_blocks,
    widths=str(width),
    bottleneck=0.25,
    latent_channels=16,
    pad_to=0,
    activation="gelu",
  )
  config.data.name = data
  config.data.protocol = "8bit"
  config.objective.likelihood = "mixture_logistic"
  config.objective.num_mixtures = 10
  config.batch_size = batch_size
  config.num_steps = 1_000_000
  o = config.optimizer
  o.name, o.learning_rate, o.b2, o.weight_decay = "adamw", learning_rate, 0.9, 0.01
  o.schedule, o.warmup_steps = "warmup_constant", 100
  o.grad_clip_norm, o.skip_threshold = grad_clip * dims, skip_threshold * dims
  config.ema_decay = ema_decay
  config.log_every_steps = 100
  config.checkpoint.every_steps = 5_000
  config.eval.every_steps = 25_000
  config.eval.batch_size = 64
  config.eval.num_examples = 1_000
  config.eval.num_importance_samples = 10
  config.eval.final_num_importance_samples = 100
  config.eval.amortization_examples = 0
  return config
