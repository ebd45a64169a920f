"""flaxvae's process defaults: XLA flags and glibc malloc tunables, added once, never over the
user's own, by the `flaxvae` command or an explicit call, never by `import flaxvae`."""

import os
import platform
import subprocess
import sys

from flaxvae.runtime import jax_private, malloc, xla_flags


def test_add_appends_and_keeps_the_users_own_value():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  assert xla_flags.add("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution", env)
  assert not xla_flags.add("--xla_force_host_platform_device_count=8", env)
  assert env["XLA_FLAGS"].split() == [
    "--xla_force_host_platform_device_count=2",
    "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
  ]


def test_defaults_apply_before_jax_starts_and_can_be_turned_off(monkeypatch):
  monkeypatch.setattr(jax_private, "backends_started", lambda: False)
  env = {}
  assert xla_flags.apply_defaults(env)
  assert xla_flags.CPU_CONVOLUTIONS_TO_EIGEN in env.get("XLA_FLAGS", "")
  env = {"FLAXVAE_XLA_DEFAULTS": "0"}
  assert not xla_flags.apply_defaults(env)
  assert "XLA_FLAGS" not in env
  env = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type="}
  xla_flags.apply_defaults(env)
  assert env["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type="


def test_defaults_leave_a_started_backend_alone(monkeypatch):
  monkeypatch.setattr(jax_private, "backends_started", lambda: True)
  env = {}
  assert not xla_flags.apply_defaults(env)
  assert env == {}


def run_python(code, **env):
  """`code` in a fresh interpreter (nothing imported, no flaxvae test set-up); its stdout."""
  environ = {
    k: v
    for k, v in os.environ.items()
    if k not in ("XLA_FLAGS", "GLIBC_TUNABLES", "FLAXVAE_XLA_DEFAULTS")
  }
  return subprocess.run(
    [sys.executable, "-c", code],
    env=dict(environ, **env),
    check=True,
    capture_output=True,
    text=True,
    timeout=120,
  ).stdout


def test_import_flaxvae_changes_no_environment_variable_and_starts_nothing():
  out = run_python(
    "import os, sys; before = dict(os.environ); pid = os.getpid()\n"
    "import flaxvae, flaxvae.api, flaxvae.cli, flaxvae.bench\n"
    "from flaxvae.runtime import jax_private\n"
    "print(dict(os.environ) == before, os.getpid() == pid, jax_private.backends_started())"
  )
  assert out.split() == ["True", "True", "False"]


def test_apply_process_defaults_sets_the_xla_flags_the_command_runs_with():
  out = run_python(
    "import os, flaxvae\nprint(flaxvae.apply_process_defaults(), os.environ.get('XLA_FLAGS'))"
  )
  assert out.split() == ["True", xla_flags.CPU_CONVOLUTIONS_TO_EIGEN]
  out = run_python(
    "import os, jax, flaxvae; jax.devices()\n"  # too late: JAX has started
    "print(flaxvae.apply_process_defaults(), os.environ.get('XLA_FLAGS'))"
  )
  assert out.split() == ["False", "None"]


def test_apply_process_defaults_with_malloc_reexecutes_once_with_the_tunables(tmp_path):
  script = tmp_path / "program.py"
  script.write_text(
    "import os, flaxvae\n"
    "flaxvae.apply_process_defaults(malloc=True)\n"
    "print(os.getpid(), os.environ.get('GLIBC_TUNABLES', ''))\n"
  )
  environ = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  out = subprocess.run(
    [sys.executable, str(script)],
    env=environ,
    check=True,
    capture_output=True,
    text=True,
    timeout=120,
  ).stdout
  lines = out.splitlines()
  assert len(lines) == 1  # the program ran once, in the re-executed interpreter
  if platform.libc_ver()[0] == "glibc":
    assert lines[0].split()[1] == ":".join(malloc.TUNABLES)


def test_the_private_jax_calls_still_answer_what_they_must():
  """runtime/jax_private.py: a JAX release that moves one fails here, not silently."""
  out = run_python(
    "import jax, jax.numpy as jnp\n"
    "from flaxvae.runtime import jax_private\n"
    "before = jax_private.backends_started()\n"
    "f = jax.jit(lambda x: x + 1)\n"
    "counts = [jax_private.compilations(f)]\n"
    "f(jnp.ones(2)); counts.append(jax_private.compilations(f))\n"
    "f(jnp.ones(2)); counts.append(jax_private.compilations(f))\n"
    "f(jnp.ones(3)); counts.append(jax_private.compilations(f))\n"
    "print(before, jax_private.backends_started(), counts,\n"
    "      jax_private.compilations(jax.pmap(lambda x: x)))"
  )
  assert out.strip() == "False True [0, 1, 1, 2] None"


def test_malloc_tunables_are_added_once_and_never_over_the_users(monkeypatch):
  monkeypatch.setattr(malloc.platform, "libc_ver", lambda: ("glibc", "2.36"))
  monkeypatch.setattr(malloc.platform, "system", lambda: "Linux")
  env = malloc.tuned_environment({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F", "A": "1"})
  assert env == {
    "A": "1",
    "GLIBC_TUNABLES": ":".join(("glibc.cpu.hwcaps=-AVX512F",) + malloc.TUNABLES),
  }
  assert malloc.tuned_environment(env) is None  # after the re-exec: no loop
  # A tunable the user set keeps the user's value; the others are still added.
  env = malloc.tuned_environment({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"})
  assert env["GLIBC_TUNABLES"] == (
    "glibc.malloc.trim_threshold=0:glibc.malloc.mmap_threshold=2147483647:glibc.malloc.hugetlb=1"
  )
  assert (
    malloc.tuned_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})["GLIBC_TUNABLES"].count(
      "hugetlb"
    )
    == 1
  )
  assert malloc.tuned_environment({"FLAXVAE_MALLOC_DEFAULTS": "0"}) is None
