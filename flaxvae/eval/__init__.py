"""Evaluation: per-example functions spread over devices (evaluator.py), the diagnostics of
the ELBO's two readings (diagnostics.py), the optional ones by name (evaluators.py), the
evaluation rows and their files (evaluation.py), images from a model (sampling.py) and the
report plots (report.py)."""
