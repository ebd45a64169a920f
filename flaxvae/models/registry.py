"""The model registry (`config.model.name`), kept apart so model files can register
themselves without importing the package that imports them. A model class is checked against
the model contract when it registers."""

from flaxvae.models import contract
from flaxvae.registry import Registry

MODELS = Registry("model.name", check=contract.check_model_class)
