"""glibc malloc settings for XLA:CPU, applied by a program re-executing itself once at start-up
(the `flaxvae` command does; `flaxvae.apply_process_defaults(malloc=True)` for other programs).

XLA:CPU allocates each execution's scratch buffers with malloc and frees them when it ends.
Three settings, each measured on a training step:

- `mmap_threshold`, `trim_threshold`: glibc serves large blocks with mmap and hands them back
  with munmap, so every dispatch page-faults its scratch memory in anew. Raised thresholds
  keep freed memory in the heap for the next dispatch (the process keeps its peak RSS instead
  of shrinking).
- `hugetlb=1`: glibc asks for transparent huge pages (madvise) on the memory it maps, where the
  kernel's THP mode is `madvise` (Debian's default). A VDVAE step streams hundreds of MB of
  activations; with 4 KiB pages it spends its time in TLB misses, costly in a virtual machine
  (two-level page walks), and its worker threads' blocks above a thread arena's 64 MiB are mapped
  anew per dispatch whatever the thresholds say. The docs' performance notes have the A/B.

glibc reads these only when a process starts (GLIBC_TUNABLES), hence the re-exec; it keeps the
PID, so launchers and signals are unaffected. FLAXVAE_MALLOC_DEFAULTS=0 turns it off; a tunable
the user already set in GLIBC_TUNABLES keeps the user's value. A glibc older than 2.35 ignores
`hugetlb`.
"""

import os
import platform
import sys

from flaxvae.runtime import xla_flags

TUNABLES = (
  "glibc.malloc.mmap_threshold=2147483647",
  "glibc.malloc.trim_threshold=4294967295",
  "glibc.malloc.hugetlb=1",
)


def tuned_environment(environ):
  """The environment to re-execute with, or None when nothing needs to change."""
  if environ.get("FLAXVAE_MALLOC_DEFAULTS", "1") == "0":
    return None
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return None
  tuned = dict(environ)
  added = [xla_flags.add(t, tuned, "GLIBC_TUNABLES", ":") for t in TUNABLES]
  return tuned if any(added) else None


def reexec_with_tuned_malloc(argv=None):
  """Replaces this process, if the tunables are missing, by the same program with them set:
  `python -m flaxvae.cli argv[1:]` for the command, the interpreter's own command line
  (sys.orig_argv) when `argv` is None."""
  env = tuned_environment(os.environ)
  if env is None:
    return
  command = (
    [sys.executable, "-m", "flaxvae.cli", *argv[1:]]
    if argv is not None
    else [sys.executable, *sys.orig_argv[1:]]
  )
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, command, env)
