"""Weights of other frameworks in and out of flaxvae runs (issue 35): diffusers' AutoencoderKL
(safetensors + config.json) and LDM's original checkpoints for the latent autoencoder.

Why a package of its own: the conversions are pure numpy over name -> array dicts, so they need
neither torch nor a device, and the run-directory side (interop.runs) is the one place that
turns them into a flaxvae workdir and back.
"""
