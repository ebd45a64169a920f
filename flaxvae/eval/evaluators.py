"""The optional diagnostics of an evaluation, by name: evaluation.diagnose runs them after the
importance pass, in the order they are registered here (AIS before what uses its log p(x)).

Each is one function called with these keyword arguments, of which it names those it needs:
  run, evaluator, params, rng   the run, its evaluator.Evaluator, the parameters, the key
  num_examples                  the evaluated examples (None: all)
  num_importance_samples        the importance pass's K
  final                         whether this is the final evaluation (the eval settings keep
                                the costly diagnostics for it)
  eval_settings                 the eval section (settings.EvalSettings): what to run, how
  label                         label(what): the progress label, None when quiet
  values                        the per-example figures so far; values["log_px"] is the best
                                estimate of log p(x) yet
It returns the fields it adds ({} when this evaluation does not ask for it): numpy arrays are
per-example figures, summarized with standard errors and seen by the diagnostics after it (they
replace figures of the same name); anything else goes into the row as it is. A str instead is
why the model cannot give it: the row names it under `skipped`, as it does the entries of a
"skipped" dict among the fields (the parts of a diagnostic that could not run). A new
diagnostic is one function here under @EVALUATORS.register(NAME). (evaluator.Evaluator is
something else: it runs one per-example function over the devices.)
"""

import math

import numpy as np

from flaxvae.eval import diagnostics, reconstruction
from flaxvae.models import contract
from flaxvae.registry import Registry

EVALUATORS = Registry("evaluator")


def _lacks(capability):
  return f"needs the {capability} capability"


@EVALUATORS.register("elbo_surgery")
def elbo_surgery(run, evaluator, params, rng, num_examples, **_):
  """rate = mutual_info + marginal_kl (diagnostics.aggregate_fn)."""
  if not contract.has(run.model, contract.AGGREGATE_POSTERIOR):
    return _lacks(contract.AGGREGATE_POSTERIOR)
  q = evaluator.per_example(
    "posterior", diagnostics.posterior_fn(run.graphdef, run.protocol), params, rng, num_examples
  )
  found = evaluator.per_example(
    "aggregate",
    diagnostics.aggregate_fn(),
    (q["mean"], q["logvar"]),
    rng,
    rows=np.stack([q["mean"], q["logvar"]], axis=1),
  )
  return {**found, "mutual_info_max": math.log(len(q["mean"]))}


@EVALUATORS.register("ais")
def ais(run, evaluator, params, rng, values, final, label, eval_settings, **_):
  """log p(x) by AIS on the first eval.ais_examples, in place of IWAE's (kept as *_iwae)."""
  c = eval_settings
  if not final or c.log_px_estimator != "ais":
    return {}
  m = min(c.ais_examples or len(values["elbo"]), len(values["elbo"]))
  found = evaluator.per_example(
    f"ais_{c.ais_steps}",
    diagnostics.ais_fn(
      run.graphdef, run.protocol, c.ais_steps, c.ais_chains, c.ais_leapfrog, c.ais_init
    ),
    params,
    rng,
    m,
    progress=label(f"log p(x) by AIS, {c.ais_steps} steps"),
  )
  return {
    "log_px_iwae": values["log_px"],
    "inference_gap_iwae": values["inference_gap"],
    "log_px": found["log_px_ais"],
    "inference_gap": found["log_px_ais"] - values["elbo"][:m],
    "log_px_estimator": "ais",
    "ais_examples": m,
    "ais_steps": c.ais_steps,
    "ais_chains": c.ais_chains,
    "ais_accept_rate": float(found["ais_accept_rate"].mean()),
  }


@EVALUATORS.register("bdmc")
def bdmc(run, evaluator, params, rng, final, label, eval_settings, **_):
  """The BDMC sandwich of log p(x) on eval.bdmc_examples simulated from the model."""
  c = eval_settings
  if not final or not c.bdmc_examples:
    return {}
  found = evaluator.per_example(
    "bdmc",
    diagnostics.bdmc_fn(run.graphdef, c.ais_steps, c.ais_leapfrog, c.ais_init),
    params,
    rng,
    rows=np.zeros((c.bdmc_examples, 1), np.float32),
    progress=label(f"BDMC on {c.bdmc_examples} simulated examples"),
  )
  return {**found, "bdmc_examples": c.bdmc_examples}


@EVALUATORS.register("amortization_gap")
def amortization_gap(
  run, evaluator, params, rng, values, num_importance_samples, final, label, eval_settings, **_
):
  """The amortization and approximation gaps (Cremer et al. 2018) on eval.amortization_examples."""
  c = eval_settings
  examples = min(c.amortization_examples, len(values["log_px"])) if final else 0
  if not examples or not c.amortization_steps:
    return {}
  if not contract.has(run.model, contract.LOCAL_POSTERIOR):
    return _lacks(contract.LOCAL_POSTERIOR)
  fn = diagnostics.amortization_fn(
    run.graphdef,
    run.protocol,
    c.amortization_steps,
    c.amortization_learning_rate,
    num_eval_samples=min(num_importance_samples, 1000),
  )
  gaps = evaluator.per_example(
    f"amortization_{c.amortization_steps}",
    fn,
    params,
    rng,
    examples,
    progress=label(f"amortization gap, {c.amortization_steps} steps"),
  )
  m = len(gaps["elbo_optimized"])
  return {
    "elbo_optimized": gaps["elbo_optimized"],
    "amortization_gap": gaps["elbo_optimized"] - gaps["elbo_encoder"],
    "approximation_gap": values["log_px"][:m] - gaps["elbo_optimized"],
    "amortization_examples": m,
  }


@EVALUATORS.register("reconstruction")
def reconstruction_metrics(
  run, evaluator, params, rng, num_examples, final, label, eval_settings, **_
):
  """PSNR, SSIM, LPIPS, rFID and latent statistics of the posterior mean's reconstructions
  (reconstruction.py), for models with the reconstruction capability; nothing for the others."""
  if not reconstruction.applies(run.model, eval_settings):
    return {}
  return reconstruction.reconstruction_metrics(
    run, evaluator, params, rng, num_examples, final, label, eval_settings
  )
