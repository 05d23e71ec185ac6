"""whiten: whitening optimizers for PyTorch.

    opt = whiten.SPlus(whiten.param_groups(model), lr=0.2)
"""

from .averaging import averaged_value
from .optim import SOAP, Muon, PSGDKron, ScheduleFreeAdamW, Scion, Shampoo, SpecGD, SPlus
from .roles import ROLES, RolePlan, param_groups, plan_roles

__version__ = "0.1.0"

__all__ = ["SPlus", "Muon", "ScheduleFreeAdamW", "SOAP", "Shampoo", "PSGDKron", "Scion", "SpecGD", "param_groups", "plan_roles", "RolePlan", "ROLES", "averaged_value", "__version__"]
