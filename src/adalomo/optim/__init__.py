"""The optimizers: one file each over a shared base (``base.LowMemoryOptimizer``), the fused engine
(``engine``) and the backend dispatch (``dispatch``)."""

from .adafactor import Adafactor
from .adalomo import AdaLomo
from .adapm import AdaPM
from .base import LowMemoryOptimizer
from .lomo import Lomo

__all__ = ["AdaLomo", "Adafactor", "Lomo", "AdaPM", "LowMemoryOptimizer"]
