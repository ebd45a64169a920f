"""Name -> thing registries: models, likelihoods, datasets and evaluators are chosen by name.

MODELS = Registry("model.name")
@MODELS.register("mlp")
class MLPVAE: ...
MODELS.get(config.model.name)   # ConfigError naming the choices for an unknown name
"""

from flaxvae.errors import ConfigError


class Registry:
  """A dict of named entries whose lookup failure is a one-line ConfigError naming the choices."""

  def __init__(self, key, check=None):
    self.key = key  # the config key that names an entry, for the error message
    self.check = check  # check(name, entry) raises if an entry cannot serve: at registration
    self._entries = {}

  def register(self, name):
    def add(entry):
      if self.check is not None:
        self.check(name, entry)
      self._entries[name] = entry
      return entry

    return add

  def get(self, name):
    if name not in self._entries:
      raise ConfigError(f"unknown {self.key} {name!r}: choose one of {', '.join(self.names())}")
    return self._entries[name]

  def names(self):
    return sorted(self._entries)

  def items(self):
    """(name, entry) pairs in the order they were registered: for entries run in turn."""
    return list(self._entries.items())

  def __contains__(self, name):
    return name in self._entries
