"""Integrations with the Hugging Face training stack.

``adalomo.integrations.transformers``
    :class:`AdaLomoTrainer` (a ``transformers.Trainer`` that trains with our optimizers, fused by
    default) and the factory :func:`create_optimizer` for ``Trainer(optimizers=(opt, None))``.
``adalomo.integrations.accelerate``
    :func:`check_accelerator` and :func:`backward` for a plain ``accelerate`` loop in fused mode.

The submodules import ``transformers`` / ``accelerate`` only when they are imported themselves, so
``import adalomo`` never needs them (``pip install adalomo[hf]`` installs both).
"""

__all__ = ["accelerate", "transformers"]
