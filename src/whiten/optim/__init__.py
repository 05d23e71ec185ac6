"""whiten's optimizers, one algorithm per file."""

from .splus import SPlus

__all__ = ["SPlus"]
