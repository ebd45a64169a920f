"""Errors a user can fix. str() is one line saying what to change; the CLI prints it and exits 2."""


class ConfigError(ValueError):
  """A configuration problem (a bad key value, a batch that cannot be split, ...)."""
