"""Every config key flaxvae knows, with its default. Config files start from this.

Scripts can rely on these keys existing in every config; a config file only
overrides what differs. `--config.key=value` on the command line overrides both.
"""
import ml_collections


def base_config():
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.num_steps = 10_000
  config.batch_size = 128  # global: split evenly over all devices
  config.steps_per_dispatch = 1  # train steps run per jitted call (lax.scan over batches)
  config.scan_unroll = 1  # lax.scan unroll factor; conv models want it equal to steps_per_dispatch on CPU
  config.dtype = "float32"  # compute dtype; parameters, optimizer state and loss sums stay float32
  config.log_every_steps = 1000
  config.ema_decay = 0.0  # > 0 keeps an EMA of the parameters, used for evaluation
  config.max_consecutive_skips = 50

  config.model = ml_collections.ConfigDict()
  config.model.name = "mlp"
  config.model.latent_dim = 20
  config.model.activation = "relu"

  config.objective = ml_collections.ConfigDict()
  config.objective.name = "elbo"  # elbo (k-sample average) or iwae
  config.objective.num_samples = 1
  config.objective.likelihood = "bernoulli"  # bernoulli, gaussian, discretized_logistic
  config.objective.gaussian_logvar = ml_collections.config_dict.placeholder(float)  # None: learned
  config.objective.beta = 1.0
  config.objective.kl_warmup_steps = 0
  config.objective.free_bits = 0.0  # nats per latent dim

  config.data = ml_collections.ConfigDict()
  config.data.name = "fashion_mnist"
  config.data.source_dir = "/usr/share/datasets/fashion-mnist"
  config.data.data_dir = ""  # prepared TFDS datasets; empty: $FLAXVAE_DATA_DIR or ~/.cache/flaxvae/tfds
  config.data.binarization = "none"  # none (grey levels in [0,1]), dynamic (Bernoulli per step), static (> 0.5)
  config.data.train_split = "train"
  config.data.eval_split = "test"
  config.data.pipeline = "auto"  # auto, in_memory (train split on device) or streaming (Grain)
  config.data.in_memory_max_bytes = 1 << 30  # auto: splits up to this size stay on every device
  config.data.read_threads = 2  # streaming: Grain threads reading and decoding batches
  config.data.prefetch_batches = 64  # streaming: batches Grain reads ahead of the trainer

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.schedule = "constant"  # constant or warmup_cosine
  config.optimizer.warmup_steps = 0
  config.optimizer.end_factor = 0.0
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.999
  config.optimizer.eps = 1e-8
  config.optimizer.weight_decay = 0.0
  config.optimizer.grad_clip_norm = 0.0  # 0 disables global-norm clipping
  config.optimizer.skip_nonfinite = True  # a step with a NaN/inf loss or gradient leaves the state unchanged
  config.optimizer.skip_threshold = 0.0  # > 0: skip a step whose gradient norm exceeds this
  config.optimizer.adaptive_skip = 0.0  # > 0: also skip above this multiple of a running quantile of recent norms
  config.optimizer.adaptive_skip_quantile = 0.9
  config.optimizer.adaptive_skip_window = 200  # recent finite gradient norms the quantile is taken over

  config.parallel = ml_collections.ConfigDict()
  config.parallel.backend = "shard_map"  # shard_map or pmap
  config.parallel.num_devices = 0  # 0: all devices JAX sees

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 5_000
  config.checkpoint.max_to_keep = 3
  config.checkpoint.keep_best = 1  # also keep the checkpoints with the highest eval ELBO
  config.checkpoint.allow_config_change = False  # True: resume even if meaning-changing keys differ

  config.eval = ml_collections.ConfigDict()
  config.eval.every_steps = 5_000
  config.eval.batch_size = 1_000
  config.eval.num_examples = 2_000  # during training; the final evaluation uses the whole split
  config.eval.num_importance_samples = 100  # during training
  config.eval.final_num_importance_samples = 5_000
  config.eval.final_num_examples = 0  # 0: the whole split
  config.eval.amortization_examples = 1_000  # final evaluation only; 0 skips the amortization gap
  config.eval.amortization_steps = 500  # per-example Adam steps on (mean, logvar)
  config.eval.amortization_learning_rate = 1e-2  # cosine-decayed to 0 over the steps
  config.eval.num_image_samples = 64
  return config
