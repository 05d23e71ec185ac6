"""whiten in the training code people already run.

- Hugging Face ``Trainer`` (``optimizers=(opt, None)``) and ``accelerate``: nothing to add. The Trainer calls
  ``optimizer.eval()`` before evaluating and ``optimizer.train()`` before each training step, so evaluation scores
  the averaged weights; a checkpoint saved right after an evaluation holds those weights (the ones scored, so
  ``load_best_model_at_end`` keeps them) and the optimizer's state holds the live ones, so
  ``resume_from_checkpoint`` continues bit for bit.
- Lightning: :class:`whiten.integrations.lightning.AveragedValidation` (a callback) makes validation score the
  averaged weights and keeps them in place until training resumes, so ``ModelCheckpoint`` saves what was scored.
- A plain loop (nanoGPT): ``opt.eval()`` before evaluating; save the checkpoint before ``opt.train()`` (the model's
  weights are then the averaged ones that were scored); after loading one, call ``opt.train()`` before training.
  :func:`averaged` does the eval/train pair as a ``with`` block.

BatchNorm running statistics are buffers, not parameters: the optimizer does not average them, so after ``eval()``
they are the statistics of the live weights. :func:`averaged` with ``batchnorm_batches`` recomputes them for the
averaged weights and restores the live ones on exit.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch
from torch import nn

__all__ = ["averaged", "recompute_batchnorm"]


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, batches: Iterable, forward=None) -> None:
    """Reset the running statistics of every BatchNorm layer of ``model`` and recompute them as the plain average
    over ``batches`` (``momentum=None``), as ``torch.optim.swa_utils.update_bn`` does. ``forward(model, batch)``
    runs one batch (default: ``model(batch)``, or ``model(batch[0])`` for a tuple/list)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = {m: m.momentum for m in norms}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training
    model.train()
    try:
        for batch in batches:
            if forward is not None:
                forward(model, batch)
            else:
                model(batch[0] if isinstance(batch, (tuple, list)) else batch)
    finally:
        model.train(was_training)
        for m, momentum in momenta.items():
            m.momentum = momentum


@contextlib.contextmanager
def averaged(optimizer, model: nn.Module | None = None, batchnorm_batches: Iterable | None = None, forward=None):
    """``optimizer.eval()`` for the duration of the block and ``optimizer.train()`` after it.

    With ``model`` and ``batchnorm_batches``, the BatchNorm running statistics are recomputed for the averaged
    weights inside the block (:func:`recompute_batchnorm`) and the live ones are put back on exit, so training
    continues exactly as without the block. ``model.eval()`` is the caller's, as usual.
    """
    saved = None
    optimizer.eval()
    try:
        if batchnorm_batches is not None:
            if model is None:
                raise ValueError("averaged(): batchnorm_batches needs the model")
            saved = {name: b.detach().clone() for name, b in model.named_buffers()}
            recompute_batchnorm(model, batchnorm_batches, forward)
        yield optimizer
    finally:
        if saved is not None:
            with torch.no_grad():
                for name, b in model.named_buffers():
                    b.copy_(saved[name])
        optimizer.train()
