"""whiten's optimizers, one algorithm per file."""

from .muon import Muon
from .psgd_kron import PSGDKron
from .schedule_free import ScheduleFreeAdamW
from .scion import Scion
from .shampoo import Shampoo
from .soap import SOAP
from .specgd import SpecGD
from .splus import SPlus

__all__ = ["SPlus", "Muon", "ScheduleFreeAdamW", "SOAP", "Shampoo", "PSGDKron", "Scion", "SpecGD"]
