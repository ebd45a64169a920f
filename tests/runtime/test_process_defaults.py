"""flaxvae's process defaults: XLA flags and glibc malloc tunables, added once, never over the user's own."""
from flaxvae.runtime import xla_flags


def test_add_appends_and_keeps_the_users_own_value():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  assert xla_flags.add("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution", env)
  assert not xla_flags.add("--xla_force_host_platform_device_count=8", env)
  assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=2",
                                      "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"]


def test_defaults_apply_before_jax_starts_and_can_be_turned_off(monkeypatch):
  monkeypatch.setattr(xla_flags, "_jax_started", lambda: False)
  env = {}
  xla_flags.apply_defaults(env)
  assert xla_flags.CPU_CONVOLUTIONS_TO_EIGEN in env.get("XLA_FLAGS", "")
  env = {"FLAXVAE_XLA_DEFAULTS": "0"}
  xla_flags.apply_defaults(env)
  assert "XLA_FLAGS" not in env
  env = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type="}
  xla_flags.apply_defaults(env)
  assert env["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type="


def test_defaults_leave_a_started_backend_alone(monkeypatch):
  monkeypatch.setattr(xla_flags, "_jax_started", lambda: True)
  env = {}
  xla_flags.apply_defaults(env)
  assert env == {}


def test_malloc_tunables_are_added_once_and_never_over_the_users(monkeypatch):
  from flaxvae.runtime import malloc
  monkeypatch.setattr(malloc.platform, "libc_ver", lambda: ("glibc", "2.36"))
  monkeypatch.setattr(malloc.platform, "system", lambda: "Linux")
  env = malloc.tuned_environment({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F", "A": "1"})
  assert env == {"A": "1", "GLIBC_TUNABLES": ":".join(("glibc.cpu.hwcaps=-AVX512F",) + malloc.TUNABLES)}
  assert malloc.tuned_environment(env) is None  # after the re-exec: no loop
  # A tunable the user set keeps the user's value; the others are still added.
  env = malloc.tuned_environment({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"})
  assert env["GLIBC_TUNABLES"] == ("glibc.malloc.trim_threshold=0:glibc.malloc.mmap_threshold="
                                   "2147483647:glibc.malloc.hugetlb=1")
  assert malloc.tuned_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})[
      "GLIBC_TUNABLES"].count("hugetlb") == 1
  assert malloc.tuned_environment({"FLAXVAE_MALLOC_DEFAULTS": "0"}) is None
