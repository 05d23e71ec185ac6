"""whiten's optimizers, one algorithm per file."""

from .muon import Muon
from .psgd_kron import PSGDKron
from .schedule_free import ScheduleFreeAdamW
from .shampoo import Shampoo
from .soap import SOAP
from .splus import SPlus

__all__ = ["SPlus", "Muon", "ScheduleFreeAdamW", "SOAP", "Shampoo", "PSGDKron"]

from .conda import Conda  # noqa: E402  (the norm-based and Fisher families, appended)
from .mfac import MFAC  # noqa: E402
from .prodigy import Prodigy  # noqa: E402

__all__ += ["Conda", "Prodigy", "MFAC"]
