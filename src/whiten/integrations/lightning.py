"""Lightning: validation on the averaged weights (``pip install whiten[lightning]``)."""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback

__all__ = ["AveragedValidation"]


def _optimizers(trainer):
    return [opt for opt in trainer.optimizers if callable(getattr(opt, "eval", None))]


class AveragedValidation(Callback):
    """Validate with the optimizer's averaged weights (whiten's averaging optimizers, ScheduleFreeAdamW).

    Lightning never calls ``optimizer.eval()``. This callback does, when validation starts, and calls
    ``optimizer.train()`` only when the next training batch starts. In between, ``ModelCheckpoint`` (which saves at
    the end of validation) writes the averaged weights that were scored, and the optimizer's state carries the
    live ones, so a run resumed from that checkpoint continues exactly. After ``fit`` the model keeps the weights
    the last validation scored. Optimizers that do not average are left alone.
    """

    def on_validation_start(self, trainer, pl_module):
        for opt in _optimizers(trainer):
            opt.eval()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        for opt in _optimizers(trainer):
            opt.train()
