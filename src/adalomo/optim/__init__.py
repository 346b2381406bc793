"""The optimizers: one file each over a shared base (``base.LowMemoryOptimizer``)."""

from .adafactor import Adafactor
from .adalomo import AdaLomo
from .base import LowMemoryOptimizer
from .lomo import Lomo

__all__ = ["AdaLomo", "Adafactor", "Lomo", "LowMemoryOptimizer"]
