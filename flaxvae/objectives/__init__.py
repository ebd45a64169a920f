"""The objective and its estimators as pure functions of arrays: no Flax, no state, no config.

gaussian.py (densities and KLs), likelihoods.py (p(x|z) families by name), bounds.py (ELBO,
k-sample ELBO, IWAE, beta, KL warm-up, free bits, from the model contract's per-layer terms),
estimators.py (AIS, BDMC, Pareto k-hat), elementwise.py (softplus and log_sigmoid in
forms XLA:CPU runs fast).
"""
