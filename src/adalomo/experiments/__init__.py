"""``adalomo experiment TASK``: compare optimizers on lstm-lm, seq2seq (eng-fra) and gpt-lm.

Programmatic use::

    from adalomo.experiments import ExperimentConfig, run_experiment
    results = run_experiment(ExperimentConfig(task="lstm-lm", optimizers="adalomo,adam,sgd", max_steps=200))

Extend the optimizer registry with :func:`register_optimizer`.
"""

from .data import ExperimentError
from .train import (
    OPTIMIZERS,
    TASKS,
    ExperimentConfig,
    OptimizerSpec,
    register_optimizer,
    run_experiment,
)

__all__ = ["OPTIMIZERS", "TASKS", "ExperimentConfig", "ExperimentError", "OptimizerSpec", "register_optimizer",
           "run_experiment"]
