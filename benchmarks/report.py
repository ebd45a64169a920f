"""Runs every benchmark in one invocation and writes BENCHMARKS.md (`make bench` calls this).

    .venv/bin/python benchmarks/report.py [--out BENCHMARKS.md] [--rounds 3] [--parts mlp,conv]
    make bench BENCH_ARGS="--parts mlp,conv --rounds 2"

Every measurement is cached by its command (and round) in runs/bench_cache.jsonl: a `make
bench` that is stopped resumes where it was, and the parts can be measured in separate
sittings and reported together (`--fresh` measures everything again). A cached figure counts
only for the code that measured it: after a change to the package, a config or a twin, its
command runs again. runs/ is scratch, gone
on a fresh machine, so BENCHMARKS.md is the record: a part not measured by this invocation
keeps its section and raw rows from the existing --out file (each section says when it was
measured), and `--parts depth` on a fresh checkout adds the depth table to the others.

1. the MLP peers (benchmarks/peer_mlp_vae.py): torch, flax_jit, flax_scan;
2. `flaxvae train` on the default MLP config as `make run` trains it (a small final
   evaluation), steady-state examples/s read from its metrics.jsonl (the median of the
   log windows after the first, which includes compilation);
3. benchmarks/cases.py on the MLP and conv configs (step timings, FLOPs, MFU, dispatch,
   scaling; its default case is what `flaxvae bench --config` prints) and its op profiles;
4. the PyTorch twins of the conv VAE and of the VDVAE configs (benchmarks/torch_*.py) in
   .venv-torch, alternating with benchmarks/cases.py on the same configs; the latent KL
   autoencoder's twin (torch_kl_autoencoder.py, in .venv-ref: torchvision, lpips, diffusers)
   likewise, on each side of the discriminator's start;
5. the evaluation at the machine's limit (`cases.py --cases eval`: the K=5000 importance pass
   against its FLOP limit, AIS per 1,000 images), the VDVAE's compile time and memory
   against depth (`--cases depth`), and `flaxvae bench --aot` for the VDVAE configs for
   accelerators on 1 and 8 simulated devices, ImageNet-64 and FFHQ-256 also on 64, data-parallel,
   fsdp and fsdp with rematerialisation.
Every table row names the command that measured it, and so does every raw row (`command`, the
key the cache keeps the measurement by); a kept section whose raw rows name their commands is
drawn again from them by this code.
Ratios are the point: absolute figures move with machine load. On a shared host a
neighbour can slow one run down, so the compared runs alternate over `--rounds`
rounds and each implementation is credited with its best round (noise only ever
slows a run down); every round's figure is kept in the raw results.
"""

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import sections as owned_sections  # device_check.py and aot_autoencoder.py write their own

from flaxvae.train import outputs  # skips torn and superseded metrics rows, as users' readers do

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER = os.path.join(ROOT, "benchmarks", "peer_mlp_vae.py")
CASES = os.path.join(ROOT, "benchmarks", "cases.py")
PY = os.path.join(ROOT, ".venv", "bin", "python")
TORCH_PY = os.path.join(ROOT, ".venv-torch", "bin", "python")
# torch with torchvision, lpips and diffusers: the latent autoencoder's twin (Makefile REF_VENV).
REF_PY = os.path.join(ROOT, ".venv-ref", "bin", "python")
FLAXVAE = os.path.join(ROOT, ".venv", "bin", "flaxvae")


def code_fingerprint(root=ROOT):
  """A hash of the code a measurement depends on: the package, the configs and the scripts in
  benchmarks/ (the lab, the peers, the PyTorch twins). A cached figure measured by other code
  is stale."""
  digest = hashlib.sha256()
  paths = []
  for folder in ("flaxvae", "configs", "benchmarks"):
    for dirpath, _, files in os.walk(os.path.join(root, folder)):
      paths += [os.path.join(dirpath, f) for f in files if f.endswith(".py")]
  paths += [os.path.join(root, "pyproject.toml")]
  for path in sorted(p for p in paths if os.path.exists(p)):
    digest.update(os.path.relpath(path, root).encode())
    with open(path, "rb") as f:
      digest.update(hashlib.sha256(f.read()).digest())
  return digest.hexdigest()[:16]


class Cache:
  """Measurements kept by (command, round) in a JSON-lines file, so an interrupted or partial
  `make bench` resumes where it stopped and `--parts` can be measured in separate sittings.
  An entry is reused only if the code that measured it is the code here now (its `code`
  fingerprint); after a change to the package, a config or a twin the command runs again.
  Delete the file (or pass --fresh) to measure everything again."""

  def __init__(self, path, fresh=False, code=None):
    self.path, self.rows, self.used, self.code = path, {}, [], code
    if path and os.path.exists(path) and not fresh:
      with open(path) as f:
        for line in f:
          entry = json.loads(line)
          if entry.get("code") == code:
            self.rows[entry["key"]] = entry
    elif path and fresh and os.path.exists(path):
      os.replace(path, path + ".old")

  def get(self, key, measure):
    self.used.append(key)
    if key in self.rows:
      return self.rows[key]["value"]
    value = measure()
    entry = dict(key=key, value=value, measured=time.strftime("%Y-%m-%d %H:%M"), code=self.code)
    self.rows[key] = entry
    if self.path:
      os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
      with open(self.path, "a") as f:
        f.write(json.dumps(entry) + "\n")
    return value

  def dates(self, keys=None):
    return sorted({self.rows[k]["measured"] for k in (self.rows if keys is None else keys)})


CACHE = Cache(None)


def shown(cmd):
  """A command as BENCHMARKS.md shows it and the cache keys it: paths relative to the checkout,
  where `make bench` runs it."""
  return " ".join(os.path.relpath(c, ROOT) if os.path.isabs(c) else c for c in cmd)


def measured_rows(cmd, measure, round_index=0):
  """measure()'s rows for `cmd` (from the cache if this code measured them before), each
  carrying the command that measured it, so every row of BENCHMARKS.md can name it."""
  command = shown(cmd)
  rows = CACHE.get(f"{command} #round{round_index}", measure)
  return [dict(r, command=command) for r in rows]


def run_json_lines(cmd, env=None):
  """Runs `cmd` in the checkout and parses the JSON lines it prints."""
  print("+", " ".join(cmd), file=sys.stderr, flush=True)
  out = subprocess.run(
    cmd, check=True, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, **(env or {}))
  ).stdout
  return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def json_lines(cmd, env=None, round_index=0):
  return measured_rows(cmd, lambda: run_json_lines(cmd, env), round_index)


# The peers train a Bernoulli on grey levels (the PyTorch example's protocol), so the trainer is
# compared with them on the config that does the same work; the default config's `binarized`
# protocol also draws one uniform per pixel per step (dynamic binarization), timed beside it.
PEER_PROTOCOL_CONFIG = "configs/fashion_mnist_mlp_pytorch.py"
DEFAULT_CONFIG = "configs/fashion_mnist_mlp.py"
# Each trainer run gets a fresh workdir (an existing one would resume); the shown command says so.
FRESH_WORKDIR = '"$(mktemp -d)"'


def trainer_command(config, workdir=FRESH_WORKDIR):
  """`make run`'s training with a small final evaluation."""
  return [
    FLAXVAE,
    "train",
    "--config",
    config,
    "--workdir",
    workdir,
    "--config.eval.final_num_importance_samples=10",
    "--config.eval.amortization_examples=0",
  ]


def trainer_throughput(config=PEER_PROTOCOL_CONFIG):
  """`make run`'s training phase (24k steps, periodic evaluations and checkpoints) with a small
  final evaluation; steady-state examples/s from metrics.jsonl."""
  workdir = tempfile.mkdtemp(prefix="flaxvae-bench-")
  start = time.perf_counter()
  subprocess.run(trainer_command(config, workdir), check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
  wall = time.perf_counter() - start
  rows = outputs.read_metrics(workdir)
  train_rows = [r for r in rows if r["split"] == "train"]
  rates = [r["examples_per_s"] for r in train_rows[1:]] or [train_rows[0]["examples_per_s"]]
  return dict(
    examples_per_s=statistics.median(rates),
    window_rates=[round(r) for r in rates],
    steps=train_rows[-1]["step"],
    train_phase_s=train_rows[-1]["wall_s"],
    process_wall_s=wall,
    workdir=workdir,
    config=config,
  )


VDVAE = "configs/fashion_mnist_vdvae.py"
AOT_CONFIGS = ("cifar10_vdvae", "imagenet32_vdvae", "imagenet64_vdvae", "ffhq256_vdvae")
FSDP_AOT_CONFIGS = ("imagenet64_vdvae", "ffhq256_vdvae")


def aot_plan():
  """(config, devices, extra flags) of every `bench --aot` row: each VDVAE config for
  accelerators data-parallel on 1 and 8 devices; ImageNet-64 and FFHQ-256 also with fsdp, and
  with fsdp and remat, on 8 and 64 devices (the largest batch in 80 GB for fsdp+remat on 8: a
  second compile at twice the batch). Each compile of these models takes minutes here."""
  plan = []
  for name in AOT_CONFIGS:
    plan += [(name, 1, []), (name, 8, [])]
    if name in FSDP_AOT_CONFIGS:
      plan += [
        (name, 8, ["--mesh=fsdp:8"]),
        (name, 8, ["--mesh=fsdp:8", "--config.model.remat=True", "--device_memory=80GB"]),
        *[
          (name, 64, ["--config.batch_size=128", *v])  # FFHQ's 32 over 64 devices
          for v in (
            [],
            ["--mesh=data:8,fsdp:8"],
            ["--mesh=data:8,fsdp:8", "--config.model.remat=True"],
          )
        ],
      ]
  return plan


def aot_rows():
  """The rows of aot_plan() for --aot_configs and --aot_devices, each with its config name
  and the date it was measured. Layers are scanned (as on accelerators, where `scan_blocks`
  auto picks it)."""
  rows = []
  configs, devices = ARGS.aot_configs.split(","), ARGS.aot_devices.split(",")
  for name, num_devices, flags in aot_plan():
    if name not in configs or str(num_devices) not in devices:
      continue
    measured = json_lines(
      [
        FLAXVAE,
        "bench",
        "--aot",
        "--config",
        f"configs/{name}.py",
        f"--devices={num_devices}",
        *flags,
        "--config.model.scan_blocks=scan",
      ]
    )
    when = CACHE.rows[CACHE.used[-1]]["measured"]
    rows += [dict(r, config=name, measured=when) for r in measured]
  return rows


def aot_identity(row):
  """What an aot row measures; rows from before rows carried their config name are told
  apart by image shape (only ImageNet-64 and FFHQ-256 were measured then)."""
  config = (
    row.get("config") or {64: "imagenet64_vdvae", 256: "ffhq256_vdvae"}[row["image_shape"][0]]
  )
  return (config, row["num_devices"], row["mesh"], row["remat"], row["batch_size"])


def merge_aot(new_rows, earlier_rows):
  """A partial aot measurement (--aot_configs, --aot_devices) replaces its own rows and keeps
  the earlier report's others, in aot_plan()'s order of configs."""
  fresh = {aot_identity(r) for r in new_rows}
  rows = [r for r in earlier_rows if aot_identity(r) not in fresh] + list(new_rows)
  order = {name: i for i, name in enumerate(AOT_CONFIGS)}
  return sorted(
    rows, key=lambda r: (order[aot_identity(r)[0]], r["num_devices"], r["mesh"], r["remat"])
  )


def table(header, rows):
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


PARTS = ("mlp", "conv", "vdvae", "klae", "eval", "depth", "aot")
# Each part's section heading starts so (how an earlier report's sections are found again);
# "cases" is the table of every bench case, drawn from the mlp and conv parts.
HEADINGS = {
  "mlp": "## MLP VAE",
  "conv": "## Conv VAE",
  "vdvae": "## VDVAE",
  "klae": "## Latent KL autoencoder",
  "eval": "## The final evaluation",
  "depth": "## Depth:",
  "aot": "## Ahead of time",
  "cases": "## Every bench case",
}
RAW_HEADING = "## Raw results"


def earlier_report(path):
  """{part: (section lines, raw rows)} of the report at `path` (empty if there is none)."""
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    lines = f.read().splitlines()
  sections, raw, section, in_raw, raw_part = {}, {}, None, False, None
  for line in lines:
    if line.startswith("## "):
      section = next((p for p, h in HEADINGS.items() if line.startswith(h)), None)
      in_raw = line.startswith(RAW_HEADING)
      if section:
        sections[section] = []
    elif line.startswith("### ") and in_raw:
      raw_part = line[4:].strip()
      raw[raw_part] = []
    if section:
      sections[section].append(line)
    elif in_raw and raw_part and line.startswith("{"):
      raw[raw_part].append(json.loads(line))
  return {p: (sections[p], raw.get(p, [])) for p in sections}


def best(runs):
  """The best of an implementation's rounds, carrying every round's figure (the raw results
  keep them, and a kept section is drawn again from its raw rows)."""
  return dict(
    max(runs, key=lambda x: x["examples_per_s"]),
    round_examples_per_s=[round(x["examples_per_s"]) for x in runs],
  )


def backticked(text):
  return f"`{text}`" if text else "not recorded"


def command_cell(row):
  """A table's command column: the command that measured the row."""
  return backticked(row.get("command"))


def command_line(rows):
  """The line under a table whose rows one command measured (or, if not, each command)."""
  commands = list(dict.fromkeys(r.get("command") for r in rows))
  return ("Command: " if len(commands) == 1 else "Commands: ") + "; ".join(
    map(backticked, commands)
  )


def measure_mlp(rounds):
  """Peers and the trainer (on their protocol, and on the default one) alternate over rounds;
  then every MLP bench case once. The raw rows: each peer's and the trainer's best round, then
  the bench cases."""
  runs = {
    k: [] for k in ("torch", "flax_jit", "flax_scan", "flaxvae_train", "flaxvae_train_binarized")
  }
  trainer_configs = {
    "flaxvae_train": PEER_PROTOCOL_CONFIG,
    "flaxvae_train_binarized": DEFAULT_CONFIG,
  }
  for r in range(rounds):
    for impl in ("torch", "flax_jit", "flax_scan"):
      python = TORCH_PY if impl == "torch" else PY
      runs[impl].append(
        json_lines([python, PEER, impl, "--epochs", str(ARGS.peer_epochs)], round_index=r)[0]
      )
    for impl, config in trainer_configs.items():
      measured = measured_rows(
        trainer_command(config), lambda config=config: [trainer_throughput(config)], r
      )
      runs[impl].append(dict(measured[0], impl=impl))
  mlp = json_lines([PY, CASES, "--config", DEFAULT_CONFIG])
  return [best(v) for v in runs.values()] + mlp


def render_mlp(rows):
  by_impl = {r["impl"]: r for r in rows if "impl" in r}
  peers = {impl: by_impl[impl] for impl in ("torch", "flax_jit", "flax_scan")}
  trainer, binarized = by_impl["flaxvae_train"], by_impl["flaxvae_train_binarized"]
  scan, torch_mlp = peers["flax_scan"]["examples_per_s"], peers["torch"]["examples_per_s"]
  t, b = trainer["examples_per_s"], binarized["examples_per_s"]
  compute_s = trainer["steps"] * 128 / scan  # the same steps in the peer's bare scan loop
  per_round = {impl: r["round_examples_per_s"] for impl, r in by_impl.items()}
  return [
    "## MLP VAE (784-400-20, batch 128): the trainer against the peers",
    "",
    f"The peers train a Bernoulli on grey levels, so `flaxvae train` runs "
    f"`{PEER_PROTOCOL_CONFIG}` (the same model, protocol and batch) against them; the default "
    f"`{DEFAULT_CONFIG}` (`binarized`: one uniform drawn per pixel per step) is timed beside it.",
    "",
    f"Examples/s per round: {json.dumps(per_round)}.",
    "",
    table(
      ["implementation", "examples/s", "flaxvae train / it", "command"],
      [
        [
          "`flaxvae train`, grey protocol (metrics.jsonl, windows after the first)",
          round(t),
          "1.00",
          command_cell(trainer),
        ]
      ]
      + [
        [f"peer {k}", v["examples_per_s"], f"{t / v['examples_per_s']:.2f}", command_cell(v)]
        for k, v in peers.items()
      ]
      + [
        [
          "`flaxvae train`, default `binarized` protocol",
          round(b),
          f"{t / b:.2f}",
          command_cell(binarized),
        ]
      ],
    ),
    "",
    f"- trainer / flax_scan = **{t / scan:.2f}** (goal >= 0.95); "
    f"trainer / torch = **{t / torch_mlp:.2f}** (goal >= 2).",
    f"- Dynamic binarization (the default protocol) costs {100 * (1 - b / t):.0f}% of the "
    f"grey-protocol rate: the per-pixel uniform draw, not the model.",
    f"- `make run`'s training phase ({trainer['steps']} steps, evaluations every "
    f"5000 steps, checkpoints): {trainer['train_phase_s']:.1f} s wall from the start of "
    f"`train()` (setup, compilation, periodic evaluations and saves included) against "
    f"{compute_s:.1f} s of pure compute (the same steps at the rate of the peer's bare "
    f"`lax.scan` loop): {trainer['train_phase_s'] / compute_s:.2f}x. The whole process, "
    "with a 10-sample "
    f"final evaluation, took {trainer['process_wall_s']:.1f} s.",
    "",
  ]


def measure_conv(rounds):
  """The conv bench cases (the dispatch case in the first round) alternating with the PyTorch
  twin. The raw rows: the best round's default case, the dispatch cases, the twin's best round
  and the op profile."""
  conv, torch_conv = [], []
  for r in range(rounds):
    cases = "default,dispatch" if r == 0 else "default"
    conv.append(
      json_lines(
        [
          PY,
          CASES,
          "--config",
          "configs/fashion_mnist_conv.py",
          "--cases",
          cases,
          "--windows",
          "3",
        ],
        round_index=r,
      )
    )
    torch_conv.append(json_lines([TORCH_PY, "benchmarks/torch_conv_vae.py"], round_index=r)[0])
  default = best([next(x for x in rows if x["case"] == "default") for rows in conv])
  dispatch = [x for x in conv[0] if x["case"] != "default"]
  return [default, *dispatch, best(torch_conv), profile_row("configs/fashion_mnist_conv.py")]


def profile_row(config):
  return json_lines([PY, CASES, "--config", config, "--cases", "profile"])[0]


def profile_lines(row, what):
  """What limits a step, from `cases.py --cases profile`: time by kind, the heaviest ops."""
  kinds = sorted(row["ms_per_step_by_kind"].items(), key=lambda kv: -kv[1])
  return [
    f"What limits the {what} step (`benchmarks/cases.py --cases profile`: XLA:CPU's thunks "
    "traced "
    f"over {row['steps']} steps, each op's self time on the thread that ran it, summed "
    f"over the {row['threads']} threads that ran ops, {row['busy_ms_per_step']:.1f} "
    f"thread-ms per step in {row['wall_ms_per_step']:.1f} ms of wall time, tracing "
    "included. Eigen's convolutions finish on the intra-op pool after their thunk returns, "
    "so `convolution` also counts the wall time no traced op covers while one may be "
    f"running, {row.get('convolution_wait_ms_per_step', 0):.1f} ms per step; the other "
    "waits have a row of their own):",
    "",
    table(
      ["kind of op", "ms per step", "share"],
      [[k, v, f"{100 * row['share_by_kind'][k]:.0f}%"] for k, v in kinds if v],
    ),
    "",
    command_line([row]),
    "",
    "Heaviest ops (a convolution's time includes the waits counted to it): "
    + "; ".join(f"`{h['op']}` {h['shape']} {h['ms_per_step']} ms" for h in row["heaviest"][:6])
    + ".",
    "",
  ]


def twin_table(flaxvae, torch, torch_label):
  """flaxvae's default bench case against a PyTorch twin, with the case's FLOP limit."""
  return table(
    ["implementation", "examples/s", "ratio", "command"],
    [
      [
        "flaxvae (bench, default case)",
        flaxvae["examples_per_s"],
        f"{flaxvae['examples_per_s'] / torch['examples_per_s']:.2f}",
        command_cell(flaxvae),
      ],
      [torch_label, torch["examples_per_s"], "1.00", command_cell(torch)],
      [
        "FLOP limit (XLA cost / matmul peak)",
        flaxvae["limit_examples_per_s"],
        f"{flaxvae['limit_examples_per_s'] / torch['examples_per_s']:.2f}",
        command_cell(flaxvae),
      ],
    ],
  )


def render_conv(rows):
  conv_default = next(r for r in rows if r.get("case") == "default")
  torch_conv = next(r for r in rows if r.get("impl") == "torch_conv")
  profile = next(r for r in rows if r.get("case") == "profile")
  per_round = {
    "conv": conv_default["round_examples_per_s"],
    "torch_conv": torch_conv["round_examples_per_s"],
  }
  return [
    "## Conv VAE (configs/fashion_mnist_conv.py) against its PyTorch twin",
    "",
    f"Examples/s per round: {json.dumps(per_round)}.",
    "",
    twin_table(conv_default, torch_conv, "torch (benchmarks/torch_conv_vae.py)"),
    "",
    *profile_lines(profile, "conv"),
    "XLA:CPU runs the convolutions in Eigen (flaxvae routes them away from YNNPACK, which ran "
    "this step slower: docs/performance.md, Process defaults; `flaxvae/runtime/xla_flags.py`); "
    "the layout transposes put "
    "activations and gradients in [C, H, W, B] order for the kernel-gradient convolutions, "
    "and the elementwise fusions (bias, ReLU, their masks) are work Eigen does not fuse into "
    "the convolutions. glibc malloc tunables (`flaxvae/runtime/malloc.py`; docs/performance.md, "
    "Process defaults) stop each dispatch from page-faulting its scratch memory in again. "
    "Inside a "
    "rolled loop XLA:CPU keeps the loop's layouts, cannot call Eigen and emits naive "
    "convolution loops (the `dispatch` row with unroll 1), so conv configs unroll their "
    "steps per dispatch.",
    "",
  ]


def measure_vdvae(rounds):
  """flaxvae's default case alternating with the PyTorch twin, then Efficient-VDVAE's
  architecture on both once. The raw rows, in this order: flaxvae's and the twin's best round,
  the Efficient-VDVAE architecture on flaxvae and on its twin, the op profile."""
  vdvae, torch_vdvae = [], []
  for r in range(rounds):
    vdvae.append(
      json_lines(
        [PY, CASES, "--config", VDVAE, "--cases", "default", "--windows", "3"], round_index=r
      )[0]
    )
    torch_vdvae.append(
      json_lines(
        [TORCH_PY, "benchmarks/torch_vdvae.py", "--config", "vdvae", "--windows", "3"],
        round_index=r,
      )[0]
    )
  effvdvae = json_lines(
    [
      PY,
      CASES,
      "--config",
      "configs/fashion_mnist_effvdvae.py",
      "--cases",
      "default",
      "--steps",
      "3",
      "--windows",
      "3",
    ]
  )[0]
  torch_effvdvae = json_lines(
    [
      TORCH_PY,
      "benchmarks/torch_vdvae.py",
      "--config",
      "effvdvae",
      "--steps",
      "3",
      "--windows",
      "3",
    ]
  )[0]
  return [best(vdvae), best(torch_vdvae), effvdvae, torch_effvdvae, profile_row(VDVAE)]


ANCHOR_RECORD = os.path.join("benchmarks", "records", "anchor", "efficient_vdvae_torch.json")


def anchor_line():
  """The one-run comparison with Efficient-VDVAE's own PyTorch code: a record, since that code
  is fetched and run by hand (its protocol is in the record), never committed here."""
  with open(os.path.join(ROOT, ANCHOR_RECORD)) as f:
    rec = json.load(f)
  secs = {k: min(v) for k, v in rec["seconds_per_step"].items()}
  params = rec["parameters"]
  return (
    f"- Beside Efficient-VDVAE's own PyTorch code on the same config ({ANCHOR_RECORD}, "
    f"measured {rec['measured']} on {rec['cpu']} ({rec['cores']} cores), best of "
    f"{len(rec['seconds_per_step']['anchor'])} alternating rounds, run by hand: the record's "
    "`protocol` gives its commands): flaxvae "
    f"{secs['flaxvae']:.2f} s per step, the anchor {secs['anchor']:.2f} s, the twin "
    f"{secs['twin']:.2f} s: flaxvae / anchor = **{secs['anchor'] / secs['flaxvae']:.2f}x** "
    f"(goal >= 1.0). The two architectures do nearly the same work ({rec['flop_count']}); "
    f"the anchor's {params['anchor'] / 1e6:.1f}M parameters against "
    f"{params['flaxvae'] / 1e6:.1f}M follow from its wiring (one encoder skip per layer; the "
    "config's docstring lists the differences)."
  )


def render_vdvae(rows):
  vdvae, torch_vdvae, effvdvae, torch_effvdvae, profile = rows
  return [
    "## VDVAE (configs/fashion_mnist_vdvae.py) against its PyTorch twin",
    "",
    twin_table(vdvae, torch_vdvae, "torch (benchmarks/torch_vdvae.py, channels_last)"),
    "",
    f"- flaxvae / torch = **{vdvae['examples_per_s'] / torch_vdvae['examples_per_s']:.2f}** "
    f"(goal >= 1.5); MFU {vdvae['mfu']:.3f} of the measured matmul peak.",
    f"- Efficient-VDVAE's binarized-MNIST architecture (configs/fashion_mnist_effvdvae.py, "
    f"{effvdvae['flops_per_example'] / 1e9:.1f} GFLOP per training example, batch 32): "
    f"flaxvae {effvdvae['step_ms'] / 1000:.2f} s per step "
    f"({effvdvae['examples_per_s']:.1f} examples/s, {command_cell(effvdvae)}), its PyTorch "
    f"twin {32 / torch_effvdvae['examples_per_s']:.2f} s "
    f"({torch_effvdvae['examples_per_s']:.1f} examples/s, {command_cell(torch_effvdvae)}): "
    f"{effvdvae['examples_per_s'] / torch_effvdvae['examples_per_s']:.2f}x.",
    anchor_line(),
    "",
    *profile_lines(profile, "VDVAE"),
  ]


KLAE_CONFIG = "configs/fashion_mnist_kl_f4.py"
KLAE_TWIN = "benchmarks/torch_kl_autoencoder.py"
# Each side of the discriminator's start: the config's own start (and its discriminator's
# training, from step 50) is beyond the steps a bench times, so the config as is times the
# autoencoder's step alone; start_step=0 with train_start=0 times the two players' step (the
# adaptive weight, the adversarial term, the discriminator's update).
KLAE_PHASE_FLAGS = {
  "before": [],
  "after": ["--config.adversary.start_step=0", "--config.adversary.train_start=0"],
}
# The twin's (phase, adaptive weight): LDM's autograd.grad to the last kernel, and the same
# gradients with each network differentiated once (benchmarks/torch_kl_autoencoder.py).
KLAE_TWINS = (("before", "ldm"), ("after", "ldm"), ("after", "at_output"))


def measure_klae(rounds):
  """flaxvae's default case on each side of the discriminator's start, alternating with the
  PyTorch twin's, then the op profile of the two players' step. The raw rows: each
  implementation's best round (tagged with its phase), then the profile."""
  runs = {}
  for r in range(rounds):
    for phase, flags in KLAE_PHASE_FLAGS.items():
      cmd = [PY, CASES, "--config", KLAE_CONFIG, "--cases", "default", "--windows", "3", *flags]
      row = dict(json_lines(cmd, round_index=r)[0], impl="flaxvae_klae", phase=phase)
      runs.setdefault(("flaxvae", phase), []).append(row)
    for phase, weight in KLAE_TWINS:
      cmd = [REF_PY, KLAE_TWIN, "--phase", phase, "--adaptive_weight", weight]
      runs.setdefault((weight, phase), []).append(json_lines(cmd, round_index=r)[0])
  profile = json_lines(
    [PY, CASES, "--config", KLAE_CONFIG, "--cases", "profile"] + KLAE_PHASE_FLAGS["after"]
  )
  return [best(v) for v in runs.values()] + [dict(profile[0], phase="after")]


KLAE_TWIN_LABELS = {
  "ldm": "torch twin, LDM's adaptive weight (autograd.grad to the last kernel)",
  "at_output": "torch twin, the adaptive weight from the gradients at the decoder's output",
}


def render_klae(rows):
  flaxvae = {r["phase"]: r for r in rows if r.get("impl") == "flaxvae_klae"}
  twins = {(r["phase"], r["adaptive_weight"]): r for r in rows if r.get("impl") == "torch_klae"}
  profile = next(r for r in rows if r.get("case") == "profile")
  name = lambda r: " ".join(r[k] for k in ("impl", "phase", "adaptive_weight") if k in r)
  per_round = {name(r): r["round_examples_per_s"] for r in rows if "round_examples_per_s" in r}
  lines, ratios = [], {}
  for phase in ("before", "after"):
    ours = flaxvae[phase]
    theirs = [twins[key] for key in KLAE_TWINS if key[0] == phase]
    ratios[phase] = ours["examples_per_s"] / max(t["examples_per_s"] for t in theirs)
    for label, row in [("flaxvae (bench, default case)", ours)] + [
      (KLAE_TWIN_LABELS[t["adaptive_weight"]], t) for t in theirs
    ]:
      lines.append(
        [
          phase,
          label,
          row["examples_per_s"],
          f"{ours['examples_per_s'] / row['examples_per_s']:.2f}",
          round(row["flops_per_example"] / 1e9, 2),
          row["mfu"],
          command_cell(row),
        ]
      )
  return [
    f"## Latent KL autoencoder ({KLAE_CONFIG}) against its PyTorch twin",
    "",
    "LDM's two-player step at batch 32: before the discriminator's start the autoencoder's "
    "alone (L1 + LPIPS + KL), after it (flaxvae: "
    f"`{' '.join(KLAE_PHASE_FLAGS['after'])}`) also the adaptive weight, the generator's "
    f"adversarial term and the discriminator's update. The twin ({KLAE_TWIN}) is diffusers' "
    "AutoencoderKL, the `lpips` package's LPIPS and pix2pix's PatchGAN in the same layout.",
    "",
    f"Examples/s per round: {json.dumps(per_round)}.",
    "",
    table(
      ["phase", "implementation", "examples/s", "flaxvae / it", "GFLOP/example", "MFU", "command"],
      lines,
    ),
    "",
    f"- flaxvae / torch = **{ratios['before']:.2f}** before the discriminator's start and "
    f"**{ratios['after']:.2f}** after it, against the faster twin (goal >= 1.0).",
    "- GFLOP/example: flaxvae's from XLA's cost analysis of its step (every op), the twin's "
    "from torch's FlopCounterMode over one step (convolutions, matmuls, attention). Each MFU "
    "is against its own framework's float32 matmul peak, measured in the same process.",
    "",
    *profile_lines(profile, "two-player"),
  ]


def render_eval(rows):
  (evaluation,) = rows
  return [
    "## The final evaluation at the machine's limit",
    "",
    f"The default config's final importance pass (K = {evaluation['num_importance_samples']} "
    f"over {evaluation['num_examples']} test images): "
    f"{evaluation['seconds']} s against {evaluation['flop_limit_seconds']} s at the "
    f"measured matmul peak, **{evaluation['ratio_to_limit']:.2f}x** the FLOP-limit time "
    f"(goal <= 1.3); {evaluation['iwae_seconds_per_1000']} s per 1,000 images. AIS "
    f"({evaluation['ais_steps']} steps, {evaluation['ais_chains']} chains, "
    f"{evaluation['ais_leapfrog']} leapfrog steps): {evaluation['ais_seconds_per_1000']} s "
    "per 1,000 images.",
    "",
    command_line(rows),
    "",
  ]


def render_depth(depth):
  return [
    "## Depth: compile time and memory (configs/fashion_mnist_vdvae.py, its 8x8 group)",
    "",
    table(
      ["layers in the group", "scan", "remat", "compile s", "temp GiB per device", "argument GiB"],
      [
        [
          r["depth"],
          r["scan_blocks"],
          r["remat"],
          r["compile_s"],
          r.get("per_device_temp_gib"),
          r.get("per_device_argument_gib"),
        ]
        for r in depth
      ],
    ),
    "",
    command_line(depth),
    "",
  ]


def render_aot(aot):
  # FLOPs per example depend on the config and remat, not the mesh: rows measured before
  # aot rows carried them borrow them from a row of the same config that has them.
  flops = {
    (aot_identity(r)[0], r["remat"]): r["flops_per_example"]
    for r in aot
    if "flops_per_example" in r
  }
  aot = [
    dict(r, flops_per_example=flops[key])
    if "flops_per_example" not in r and (key := (aot_identity(r)[0], r["remat"])) in flops
    else r
    for r in aot
  ]
  return [
    "## Ahead of time: the large configs (`flaxvae bench --aot`, shapes only)",
    "",
    table(
      [
        "config",
        "devices",
        "mesh",
        "remat",
        "batch",
        "parameters",
        "GFLOP/example",
        "params GiB/dev",
        "optimizer GiB/dev",
        "EMA GiB/dev",
        "temp GiB/dev",
        "largest batch in 80 GB/dev",
        "compile s",
        "measured",
        "command",
      ],
      [
        [
          aot_identity(r)[0],
          r["num_devices"],
          r["mesh"],
          r["remat"],
          r["batch_size"],
          f"{r['parameters'] / 1e6:.1f}M",
          round(r["flops_per_example"] / 1e9, 1) if "flops_per_example" in r else "",
          r["per_device_parameter_gib"],
          r["per_device_optimizer_gib"],
          r["per_device_ema_gib"],
          r.get("per_device_temp_gib"),
          r.get("largest_batch") or "",
          r["compile_s"],
          r.get("measured", ""),
          command_cell(r),
        ]
        for r in aot
      ],
    ),
    "",
    "Per-device memory from XLA's memory analysis of the compiled step on XLA:CPU (the "
    "accelerator's compiler lays memory out differently; the parameter and optimizer "
    "columns are exact either way). `largest batch` extrapolates the step's memory "
    "linearly from two compiles (batch and twice the batch). GFLOP/example: one training "
    "step (forward, backward, update) from XLA's cost analysis of the lowered one-device "
    "program with the layers unrolled. `measured` dates each row: a partial run "
    "(--aot_configs, --aot_devices) re-measures its rows and keeps the others from the "
    "earlier report.",
    "",
  ]


BENCH_CASES = ("default", "dispatch", "scaling")  # the step-timing cases of benchmarks/cases.py


def render_cases(rows):
  """The bench cases among the MLP and conv parts' raw rows."""
  return [
    "## Every bench case",
    "",
    table(
      [
        "model",
        "case",
        "devices",
        "steps/dispatch",
        "unroll",
        "compile s",
        "step ms",
        "examples/s",
        "MFLOP/example",
        "MFU",
        "all-reduce ms",
        "overhead vs 1 device",
        "command",
      ],
      [
        [
          r["model"],
          r["case"],
          r["num_devices"],
          r["steps_per_dispatch"],
          r["scan_unroll"],
          r["compile_s"],
          r["step_ms"],
          r["examples_per_s"],
          round(r["flops_per_example"] / 1e6, 2),
          r["mfu"],
          r.get("allreduce_ms", ""),
          r.get("overhead_vs_1_device", ""),
          command_cell(r),
        ]
        for r in rows
        if r.get("case") in BENCH_CASES
      ],
    ),
    "",
    "Simulated devices share the same two cores, so the scaling rows measure the cost of "
    "partitioning and collectives, not a speed-up.",
    "",
  ]


ARGS = None


def main():
  global ARGS, CACHE
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"))
  parser.add_argument("--peer_epochs", type=int, default=3)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument(
    "--parts", default=",".join(PARTS), help=f"which parts to measure and report: {','.join(PARTS)}"
  )
  parser.add_argument(
    "--cache",
    default=os.path.join(ROOT, "runs", "bench_cache.jsonl"),
    help="measurements already made are read from here, new ones appended",
  )
  parser.add_argument("--fresh", action="store_true", help="measure everything again")
  parser.add_argument("--aot_devices", default="1,8,64", help="the aot part's device counts")
  parser.add_argument(
    "--aot_configs",
    default=",".join(AOT_CONFIGS),
    help="the aot part's configs (rows not measured keep the earlier report's)",
  )
  ARGS = parser.parse_args()
  parts = [p for p in ARGS.parts.split(",") if p]
  unknown = set(parts) - set(PARTS)
  if unknown:
    parser.error(f"unknown --parts {sorted(unknown)}: choose from {','.join(PARTS)}")
  CACHE = Cache(ARGS.cache, ARGS.fresh, code=code_fingerprint())

  earlier = earlier_report(ARGS.out)  # read before this report overwrites it
  owned_elsewhere = owned_sections.kept(ARGS.out)  # their scripts write them: kept as they are
  measures = {
    "mlp": lambda: measure_mlp(ARGS.rounds),
    "conv": lambda: measure_conv(ARGS.rounds),
    "vdvae": lambda: measure_vdvae(ARGS.rounds),
    "klae": lambda: measure_klae(ARGS.rounds),
    "eval": lambda: json_lines([PY, CASES, "--config", DEFAULT_CONFIG, "--cases", "eval"]),
    "depth": lambda: json_lines([PY, CASES, "--config", VDVAE, "--cases", "depth"]),
    "aot": lambda: merge_aot(aot_rows(), earlier.get("aot", ([], []))[1]),
  }
  measured = {}  # part -> (raw rows, dates of the measurements it read)
  for part in (p for p in PARTS if p in parts):
    CACHE.used = []
    rows = measures[part]()
    # Rows kept from an earlier report (a partial aot measurement) carry their own dates.
    kept_dates = {r["measured"] for r in rows if "measured" in r}
    measured[part] = (rows, sorted(set(CACHE.dates(CACHE.used)) | kept_dates))

  def raw_rows(part):
    return measured[part][0] if part in measured else earlier.get(part, ([], []))[1]

  renders = dict(
    mlp=render_mlp,
    conv=render_conv,
    vdvae=render_vdvae,
    klae=render_klae,
    eval=render_eval,
    depth=render_depth,
    aot=render_aot,
    cases=render_cases,
  )

  def drawn_again(part, rows):
    """A kept part's section drawn again from its raw rows, or None where they cannot draw it:
    rows written before rows carried their command, or in a form this code no longer reads
    (then the section is kept as it was written)."""
    sources = ("mlp", "conv") if part == "cases" else (part,)
    if not all(raw_rows(p) and all("command" in r for r in raw_rows(p)) for p in sources):
      return None
    try:
      return renders[part](rows)
    except (KeyError, StopIteration, ValueError) as e:
      print(f"keeping the {part} section as written: its raw rows lack {e!r}", file=sys.stderr)
      return None

  sections, raw, kept, as_written, missing = [], [], [], [], []
  environment = {}
  for part in (*PARTS, "cases"):
    sources = ("mlp", "conv") if part == "cases" else (part,)
    rows = [r for p in sources for r in raw_rows(p)]
    if all(p in measured for p in sources):
      lines = renders[part](rows)
      dates = sorted({d for p in sources for d in measured[p][1]})
      when = f"{dates[0]} to {dates[-1]}" if dates else time.strftime("%Y-%m-%d %H:%M")
      cpus = sorted({r["cpu"] for r in rows if r.get("cpu")})
      on = f" on {', '.join(cpus)} ({os.cpu_count()} cores)" if cpus else ""
      if cpus and any("measured" in r and not r.get("cpu") for r in rows):
        on += " and, for rows kept from an earlier report, a CPU it did not record"
      sections += [lines[0], "", f"_Measured {when}{on}, by this report._", *lines[1:]]
    elif lines := drawn_again(part, rows):
      if part == "cases":
        when = (
          "_Drawn from the raw rows of the MLP and conv sections (each says when it was measured)._"
        )
      else:
        earlier_when = (l for l in earlier[part][0] if l.startswith("_Measured "))
        when = next(earlier_when, "_Measured by an earlier report._").replace(
          ", by this report._", ", by an earlier report._"
        )
        kept.append(part)
      sections += [lines[0], "", when, *lines[1:]]
    elif part in earlier:
      as_written.append(part)
      lines = earlier[part][0]
      sections += [
        lines[0],
        *[l.replace(", by this report._", ", by an earlier report._") for l in lines[1:]],
      ]
      kept.append(part)
    else:
      if part != "cases":  # derived from mlp and conv, which are listed themselves
        missing.append(part)
      continue
    if rows and part != "cases":  # the cases are the mlp and conv parts' raw rows
      if any("command" not in r for r in rows) and part not in as_written:
        as_written.append(part)  # rows measured before rows carried their command
      raw += [f"### {part}", "", "```json", *[json.dumps(x) for x in rows], "```", ""]
      environment = environment or next((r for r in rows if "device_kind" in r), {})
  md = [
    "# Benchmarks",
    "",
    f"Written by `make bench` (`{shown([PY, *sys.argv])}`, parts {','.join(parts)}) on "
    f"{time.strftime('%Y-%m-%d %H:%M')}, {environment.get('device_kind', 'cpu')} "
    f"x{os.cpu_count()} cores, jax {environment.get('jax', '?')}. Every table names the "
    "command that measured its rows, and every raw row carries it (`command`)"
    + (
      f", except rows measured before rows carried it (in {', '.join(as_written)})"
      if as_written
      else ""
    )
    + ". Each section "
    "says when it was measured (measurements are cached by command and code version in "
    "runs/bench_cache.jsonl; a part this "
    "report did not measure keeps its section from the earlier BENCHMARKS.md, drawn again "
    "from its raw rows where they name their commands). Compare "
    "ratios within a section, not absolute numbers across sections: the CPU model changes "
    f"between sessions. Compared runs alternate over rounds ({ARGS.rounds} in this report) "
    "and each is credited with its best round (noise only ever slows a run down)."
    + (f" Kept from an earlier report: {', '.join(kept)}." if kept else "")
    + (f" Not measured yet: {', '.join(missing)}." if missing else ""),
    "",
    *sections,
    *owned_elsewhere,
    RAW_HEADING,
    "",
    *raw,
  ]
  with open(ARGS.out, "w") as f:
    f.write("\n".join(md))
  print(f"wrote {ARGS.out}")


if __name__ == "__main__":
  main()
