"""glibc malloc settings for XLA:CPU, applied by the CLI re-executing itself once at start-up.

XLA:CPU allocates each execution's scratch buffers with malloc (65 MB for the conv VAE
step) and frees them when it ends. glibc serves blocks that large with mmap and hands them
back with munmap, so every dispatch page-faults its scratch memory in anew: a fifth of a
one-step conv dispatch here. Raising glibc's mmap and trim thresholds keeps freed memory
in the heap for the next dispatch (the process keeps its peak RSS instead of shrinking).
glibc reads these only when a process starts (GLIBC_TUNABLES), hence the re-exec; it keeps
the PID, so launchers and signals are unaffected. FLAXVAE_MALLOC_DEFAULTS=0 turns it off,
and a GLIBC_TUNABLES that already sets either threshold is left as it is.
"""
import os
import platform
import sys

TUNABLES = "glibc.malloc.mmap_threshold=2147483647:glibc.malloc.trim_threshold=4294967295"


def tuned_environment(environ):
  """The environment to re-execute with, or None when nothing needs to change."""
  if environ.get("FLAXVAE_MALLOC_DEFAULTS", "1") == "0":
    return None
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return None
  current = environ.get("GLIBC_TUNABLES", "")
  if "glibc.malloc.mmap_threshold" in current or "glibc.malloc.trim_threshold" in current:
    return None
  return dict(environ, GLIBC_TUNABLES=":".join(t for t in (current, TUNABLES) if t))


def reexec_with_tuned_malloc(argv):
  """Replaces this process by `python -m flaxvae.cli argv[1:]` with the tunables set, if needed."""
  env = tuned_environment(os.environ)
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, "-m", "flaxvae.cli", *argv[1:]], env)
