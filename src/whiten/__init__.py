"""whiten: whitening optimizers for PyTorch.

    opt = whiten.SPlus(whiten.param_groups(model), lr=0.2)
"""

from .averaging import averaged_value
from .optim import (EKFAC, KBFGS, KFAC, MFAC, SOAP, TNT, Conda, Muon, Prodigy, PSGDKron, ScheduleFreeAdamW, Scion,
                    Shampoo, Sophia, SpecGD, SPlus)
from .roles import ROLES, RolePlan, param_groups, plan_roles

__version__ = "0.1.0"

__all__ = [
    # the Shampoo family and SPlus
    "SPlus", "SOAP", "Shampoo", "PSGDKron",
    # the norm-based family
    "Muon", "Scion", "SpecGD", "Conda", "Prodigy",
    # the Fisher family
    "TNT", "KFAC", "EKFAC", "KBFGS", "MFAC", "Sophia",
    # Adam-like
    "ScheduleFreeAdamW",
    "param_groups", "plan_roles", "RolePlan", "ROLES", "averaged_value", "__version__",
]
