"""microadam: MicroAdam (Modoranu et al., NeurIPS 2024) for PyTorch.

``import microadam`` needs only torch; optional layers are imported lazily.
"""

from microadam.kernels import PartialStepError
from microadam.memory import state_bytes
from microadam.optimizer import MicroAdam, NonFiniteGradientError

__all__ = ["MicroAdam", "NonFiniteGradientError", "PartialStepError", "state_bytes"]
__version__ = "0.1.0"
