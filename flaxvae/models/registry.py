"""The model registry (`config.model.name`), kept apart so model files can register
themselves without importing the package that imports them."""
from flaxvae.registry import Registry

MODELS = Registry("model.name")
