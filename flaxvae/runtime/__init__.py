"""How flaxvae runs on devices and processes: placement and wrapping (parallel), waiting on
device work (dispatch), multi-process start-up (distributed), and process defaults (XLA flags,
malloc tunables)."""
