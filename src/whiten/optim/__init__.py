"""whiten's optimizers, one algorithm per file."""

from .muon import Muon
from .schedule_free import ScheduleFreeAdamW
from .soap import SOAP
from .splus import SPlus

__all__ = ["SPlus", "Muon", "ScheduleFreeAdamW", "SOAP"]
