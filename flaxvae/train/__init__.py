"""Training: the per-device step and its one builder (step.py), the optimizer, gradient guards,
Orbax checkpoints, preemption, the run's outputs, and the trainer that dispatches it all
(trainer.py, which reads in one sitting)."""
