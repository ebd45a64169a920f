"""flaxvae's XLA defaults: added once, never over a flag the user set, and can be turned off."""
from flaxvae import xla_flags


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
