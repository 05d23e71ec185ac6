"""whiten's optimizers, one algorithm per file."""

from .conda import Conda
from .ekfac import EKFAC
from .kbfgs import KBFGS
from .kfac import KFAC
from .mfac import MFAC
from .muon import Muon
from .prodigy import Prodigy
from .psgd_kron import PSGDKron
from .schedule_free import ScheduleFreeAdamW
from .scion import Scion
from .shampoo import Shampoo
from .soap import SOAP
from .sophia import Sophia
from .specgd import SpecGD
from .splus import SPlus
from .tnt import TNT

__all__ = ["SPlus", "SOAP", "Shampoo", "PSGDKron", "Muon", "Scion", "SpecGD", "Conda", "Prodigy", "TNT", "KFAC",
           "EKFAC", "KBFGS", "MFAC", "Sophia", "ScheduleFreeAdamW"]
