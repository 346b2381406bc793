"""adalomo: full-parameter training with almost no optimizer memory.

AdaLomo, LOMO and Adafactor as ``torch.optim.Optimizer``s with a classic mode and a fused-backward
mode (each parameter updated the moment its gradient is ready, then the gradient freed).
"""

from .optim import Adafactor, AdaLomo, Lomo, LowMemoryOptimizer
from .optim.adapm import AdaPM, SplitMomentum, adapm_param_groups
from .precision import DynamicLossScaler

__version__ = "0.1.0"

__all__ = [
    "AdaLomo", "Adafactor", "Lomo", "AdaPM", "adapm_param_groups", "SplitMomentum", "LowMemoryOptimizer",
    "DynamicLossScaler", "__version__",
]
