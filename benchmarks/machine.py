"""What a benchmark row records about the machine beyond JAX's devices: the CPU model (ratios
measured on different CPUs do not compare), glibc's malloc tunables and the kernel's
transparent-huge-page mode (a streaming step depends on both: flaxvae/runtime/malloc.py).
Standard library only, so the PyTorch twins' environment can import it too."""

import os
import platform


def cpu_model():
  """The host CPU's model name."""
  try:
    with open("/proc/cpuinfo") as f:
      return next(
        (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
        platform.processor(),
      )
  except OSError:
    return platform.processor() or platform.machine()


def transparent_hugepages():
  """The kernel's THP mode (`always`, `madvise`, `never`): with `madvise`, huge pages come
  only where glibc asks for them."""
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      return next((w[1:-1] for w in f.read().split() if w.startswith("[")), "")
  except OSError:
    return ""


def machine():
  """The fields every flaxvae row of BENCHMARKS.md carries after its devices and versions."""
  return dict(
    cpu=cpu_model(),
    glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""),
    transparent_hugepages=transparent_hugepages(),
  )
