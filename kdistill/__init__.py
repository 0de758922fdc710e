"""kdistill: knowledge distillation for PyTorch.

The losses are importable from the top level; the training loop, data and command line live in
their own modules (``kdistill.trainer``, ``kdistill.data``, ``kdistill.cli``).
"""

from kdistill.fused_linear import fused_linear_kd_loss
from kdistill.losses import (
    DistillationLoss,
    KDLoss,
    divergence_loss,
    hard_label_loss,
    jsd_loss,
    kd_loss,
    reverse_kd_loss,
)
from kdistill.prototxt import PrototxtError, from_prototxt
from kdistill.sparse import sparse_kd_loss

__version__ = "0.1.0"

__all__ = [
    "DistillationLoss",
    "KDLoss",
    "PrototxtError",
    "divergence_loss",
    "from_prototxt",
    "fused_linear_kd_loss",
    "hard_label_loss",
    "jsd_loss",
    "kd_loss",
    "reverse_kd_loss",
    "sparse_kd_loss",
]
