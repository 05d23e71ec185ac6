"""whiten's optimizers, one algorithm per file."""

from .kfac import EKFAC, KFAC
from .muon import Muon
from .psgd_kron import PSGDKron
from .schedule_free import ScheduleFreeAdamW
from .shampoo import Shampoo
from .soap import SOAP
from .splus import SPlus
from .sophia import Sophia
from .tnt import TNT

__all__ = ["SPlus", "Muon", "ScheduleFreeAdamW", "SOAP", "Shampoo", "PSGDKron", "TNT", "Sophia"]
__all__ += ["KFAC", "EKFAC"]
