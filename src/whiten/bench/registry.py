"""The benchmark's optimizers: one registry, each entry's learning-rate grid and defaults are data.

Names: ``adamw`` (torch.optim.AdamW, the baseline); whiten's ``splus``, ``soap``, ``shampoo`` (``shampoo-nograft``
without grafting), ``psgd-kron``, ``muon``, ``schedule-free-adamw`` and ``schedule-free-adamw-b0.999``, ``scion``, ``specgd``;
``splus-bf16`` and ``soap-bf16`` (the same with bfloat16 rotations); ``splus-state-bf16``, ``splus-basis8``,
``splus-basis4`` and the same for ``soap`` (issue 23's state options: bfloat16 momenta and bases, 8- and 4-bit bases);
``shampoo-state-bf16``, ``psgd-kron-state-bf16``, ``kfac-state-bf16``, ``ekfac-state-bf16``; ``tnt`` and ``sophia``
(sampled-label
curvature: the harness calls their ``sample_fisher``); ``kfac``, ``ekfac`` and their ``-sampled`` variants;
``kbfgs`` and ``kbfgs-l`` (K-BFGS and K-BFGS(L): the harness calls ``step(closure)``);
``torch:Muon`` (torch.optim.Muon on hidden matrices, AdamW on the rest); and ``pytorch_optimizer:<Class>`` for any
optimizer of the ``pytorch-optimizer``
package (``pytorch_optimizer:SPlus``, ``pytorch_optimizer:SOAP``, ...). Every optimizer gets the param groups of
``whiten.param_groups(model)``, so weight decay is masked the same way for all of them.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Callable

import torch

import whiten


def lr_grid(low_exp: int, high_exp: int) -> tuple[float, ...]:
    """The ×10^(1/3) grid ``10**(k/3)`` for k in [low_exp, high_exp], rounded to 3 significant digits."""
    return tuple(float(f"{10 ** (k / 3):.3g}") for k in range(low_exp, high_exp + 1))


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    build: Callable  # (model, lr, options, width, steps) -> optimizer
    default_lr: float
    lr_grid: tuple[float, ...]
    options: dict = field(default_factory=dict)
    averages: bool = False  # has eval()/train() that swap in averaged parameters
    source: str = ""
    refresh_option: str | None = None  # the option that sets how often the preconditioner is refreshed (--refresh)
    # The entry this one varies by a speed or memory option (soap-state-bf16 -> soap): it runs at that entry's tuned
    # setting on each task, so compare measures the option at the same lr, not the option plus another lr.
    variant_of: str | None = None


def _resolve(options: dict, width: int, steps: int) -> dict:
    """Options may depend on the model or the budget: ``"<k>/width"`` becomes k/width of the model being trained,
    ``"1-<k>/steps"`` becomes max(0, 1 - k/steps) for a run of that many steps."""
    out = {}
    for k, v in options.items():
        if isinstance(v, str) and v.endswith("/width"):
            v = float(v[: -len("/width")]) / width
        elif isinstance(v, str) and v.startswith("1-") and v.endswith("/steps"):
            v = max(0.0, 1.0 - float(v[2: -len("/steps")]) / steps)  # runs this short do not average
        out[k] = v
    return out


class Chain:
    """Several optimizers stepped as one (Muon for hidden matrices + AdamW for the rest). ``param_groups`` lists
    the inner groups themselves, so setting a group's lr reaches the optimizer that owns it."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)


def _adamw(model, lr, options, width, steps):
    return torch.optim.AdamW(whiten.param_groups(model), lr=lr, **options)


def _splus(model, lr, options, width, steps):
    return whiten.SPlus(whiten.param_groups(model), lr=lr, **_resolve(options, width, steps))


def _whiten(class_name: str):
    def build(model, lr, options, width, steps):
        return getattr(whiten, class_name)(whiten.param_groups(model), lr=lr, **_resolve(options, width, steps))

    build.whiten = True
    build.target = ("whiten", class_name)
    return build


def _whiten_hooked(class_name: str):
    """Optimizers that hook the model's layers themselves (K-FAC, EKFAC, K-BFGS): they take ``model=`` too."""
    def build(model, lr, options, width, steps):
        return getattr(whiten, class_name)(whiten.param_groups(model), model=model, lr=lr,
                                           **_resolve(options, width, steps))

    build.whiten = True
    build.target = ("whiten", class_name)
    return build


def _whiten_muon(model, lr, options, width, steps):
    options = _resolve(options, width, steps)
    # one knob for the sweep: the AdamW part (embeddings, head, vectors) moves with Muon's lr
    adam_lr = lr * options.pop("adam_lr_ratio")
    return whiten.Muon(whiten.param_groups(model), lr=lr, adam_lr=adam_lr, **options)


_splus.whiten = _whiten_muon.whiten = True  # builders of whiten's optimizers: they take process_group
_splus.target, _whiten_muon.target = ("whiten", "SPlus"), ("whiten", "Muon")


def _whiten_specgd(model, lr, options, width, steps):
    options = _resolve(options, width, steps)
    adam_lr = lr * options.pop("adam_lr_ratio")  # as muon's entry: the AdamW part moves with the lr
    return whiten.SpecGD(whiten.param_groups(model), lr=lr, adam_lr=adam_lr, **options)


def _whiten_scion(model, lr, options, width, steps):
    options = _resolve(options, width, steps)
    role_norms = options.pop("role_norms", {})  # {role: norm}: a group option, so it goes through param_groups
    groups = whiten.param_groups(model, role_options={r: {"norm": n} for r, n in role_norms.items()})
    return whiten.Scion(groups, lr=lr, **options)


_whiten_specgd.whiten = _whiten_scion.whiten = True
_whiten_specgd.target, _whiten_scion.target = ("whiten", "SpecGD"), ("whiten", "Scion")
_adamw.target = ("torch.optim", "AdamW")


def _torch_muon(model, lr, options, width, steps):
    options = dict(options)
    adam_ratio = options.pop("adam_lr_ratio")
    adam_betas = options.pop("adam_betas")
    groups = whiten.param_groups(model)
    hidden = [g for g in groups if g["role"] == "hidden"]
    rest = [g for g in groups if g["role"] != "hidden"]
    muon = torch.optim.Muon(hidden, lr=lr, **options)
    adam = torch.optim.AdamW(rest, lr=lr * adam_ratio, betas=adam_betas, weight_decay=options.get("weight_decay", 0.1))
    return Chain(muon, adam)


def _pytorch_optimizer(class_name: str):
    def build(model, lr, options, width, steps):
        try:
            module = importlib.import_module("pytorch_optimizer")
        except ImportError as e:
            raise RuntimeError("pytorch_optimizer:<Class> needs the pytorch-optimizer package: "
                               "pip install pytorch-optimizer") from e
        cls = getattr(module, class_name, None)
        if cls is None:
            raise ValueError(f"pytorch_optimizer has no optimizer named {class_name!r}")
        return cls(whiten.param_groups(model), lr=lr, **_resolve(options, width, steps))

    build.target = ("pytorch_optimizer", class_name)
    return build


REGISTRY: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec(
        "adamw", _adamw, default_lr=4.64e-3, lr_grid=lr_grid(-10, -5),
        options=dict(betas=(0.9, 0.95), weight_decay=0.1), source="torch.optim.AdamW"),
    # nonstandard_constant: whiten.SPlus's default, 1e-3 x 768 / width, the paper's value at its width 768 (these
    # entries used 1/width before that became the default; docs/results/width-defaults).
    # default lr: best of the lm/cpu sweep in docs/results (0.0464-1.0 tried).
    # ema_rate: the paper averages with 0.999 over 10k-step runs, a time constant of 10% of the run; keep that
    # ratio at other budgets (0.98 at 500 steps, 0.999 at 10k). With the fixed 0.999 a 500-step run evaluates an
    # almost uniform average of all its iterates (see docs/results).
    "splus": OptimizerSpec(
        "splus", _splus, default_lr=0.1, lr_grid=lr_grid(-4, 1),
        options=dict(ema_rate="1-10/steps"), averages=True,
        source="whiten.SPlus, ema_rate = 1 - 10/steps", refresh_option="inverse_every"),
    "splus-ema0.999": OptimizerSpec(
        "splus-ema0.999", _splus, default_lr=0.1, lr_grid=lr_grid(-4, 1),
        options=dict(ema_rate=0.999), averages=True,
        source="whiten.SPlus, ema_rate 0.999 (the paper's value at any budget)",
        refresh_option="inverse_every"),
    # The Shampoo family and the paper's other baselines. Defaults are the authors' unless a comment says why not;
    # weight decay is AdamW's 0.1 where the authors leave it to the user.
    "soap": OptimizerSpec(
        "soap", _whiten("SOAP"), default_lr=4.64e-3, lr_grid=lr_grid(-10, -5),
        options=dict(betas=(0.95, 0.95), weight_decay=0.01, precondition_frequency=10),
        source="whiten.SOAP (authors' defaults)", refresh_option="precondition_frequency"),
    # The SPlus paper's ablation: SOAP with iterate averaging was about as good as SPlus.
    "soap-ema": OptimizerSpec(
        "soap-ema", _whiten("SOAP"), default_lr=4.64e-3, lr_grid=lr_grid(-10, -5),
        options=dict(betas=(0.95, 0.95), weight_decay=0.01, precondition_frequency=10, ema_rate="1-10/steps"),
        averages=True, source="whiten.SOAP with iterate averaging, ema_rate = 1 - 10/steps",
        refresh_option="precondition_frequency"),
    # Shampoo: Adam grafting with AdamW's betas and eps so its lr lives on AdamW's scale; refreshed every 10 steps
    # (the paper saw Shampoo diverge at every 100).
    "shampoo": OptimizerSpec(
        "shampoo", _whiten("Shampoo"), default_lr=4.64e-3, lr_grid=lr_grid(-10, -5),
        options=dict(betas=(0.9, 0.95), weight_decay=0.1, grafting="adam", grafting_beta2=0.95,
                     grafting_epsilon=1e-8, precondition_frequency=10),
        source="whiten.Shampoo, Adam grafting, precondition_frequency 10", refresh_option="precondition_frequency"),
    # Shampoo without grafting (Distributed Shampoo's constructor default): the step is the preconditioned gradient
    # itself, its size no longer Adam's, so its lr grid reaches lower. The SPlus paper's claim 1 (long-cached
    # inverses make Shampoo diverge) is about this form; `whiten-bench stability` runs both.
    "shampoo-nograft": OptimizerSpec(
        "shampoo-nograft", _whiten("Shampoo"), default_lr=1e-3, lr_grid=lr_grid(-13, -5),
        options=dict(betas=(0.9, 0.95), weight_decay=0.1, grafting=None, precondition_frequency=10),
        source="whiten.Shampoo, no grafting, precondition_frequency 10", refresh_option="precondition_frequency"),
    # PSGD-Kron: kron_torch's defaults; its README: lr about 3x below Adam's
    "psgd-kron": OptimizerSpec(
        "psgd-kron", _whiten("PSGDKron"), default_lr=1e-3, lr_grid=lr_grid(-11, -6),
        options=dict(b1=0.9, weight_decay=0.1), source="whiten.PSGDKron (kron_torch defaults)"),
    # Default lrs of muon, torch:Muon and schedule-free-adamw(-b0.999): the best of the lm/cpu sweep in docs/results
    # (as splus's), so `compare` and the README's "which optimizer, which lr" table agree.
    "muon": OptimizerSpec(
        "muon", _whiten_muon, default_lr=0.01, lr_grid=lr_grid(-7, -2),
        options=dict(momentum=0.95, weight_decay=0.1, adam_lr_ratio=0.15, adam_betas=(0.9, 0.95)),
        source="whiten.Muon (hidden) with its AdamW (rest) at 0.15 x lr"),
    # The harness's warm-up replaces schedulefree's own; eval() evaluates the averaged point.
    "schedule-free-adamw": OptimizerSpec(
        "schedule-free-adamw", _whiten("ScheduleFreeAdamW"), default_lr=4.64e-3, lr_grid=lr_grid(-9, -4),
        options=dict(betas=(0.9, 0.95), weight_decay=0.1), averages=True,
        source="whiten.ScheduleFreeAdamW, betas (0.9, 0.95) as AdamW's"),
    # The reference's own β2 (0.999), to tell its β2 apart from its averaging as the cause of a gap to AdamW.
    "schedule-free-adamw-b0.999": OptimizerSpec(
        "schedule-free-adamw-b0.999", _whiten("ScheduleFreeAdamW"), default_lr=2.15e-3, lr_grid=lr_grid(-9, -4),
        options=dict(betas=(0.9, 0.999), weight_decay=0.1), averages=True,
        source="whiten.ScheduleFreeAdamW, betas (0.9, 0.999) as the reference's"),
    # The Fisher family: the harness calls opt.sample_fisher(logits) on the steps they ask for it (run.py), inside
    # the timed step. TNT: the authors' CIFAR-10 settings (damping 0.01, weight decay 10, T1 10, T2 100) but not
    # their lr 1e-4, which diverged on the tiny vit and lm smoke runs (1e-5 trained): its step is
    # lr·(F/N + ε)⁻¹·m with N the labels per batch (momentum without dampening), far from AdamW's scale.
    # Default lr until a sweep gives the best one: 1e-5.
    "tnt": OptimizerSpec(
        "tnt", _whiten("TNT"), default_lr=1e-5, lr_grid=lr_grid(-21, -12),
        options=dict(momentum=0.9, damping=0.01, weight_decay=10.0, update_freq=10, inverse_freq=100),
        source="whiten.TNT (the authors' CIFAR-10 settings), sampled-label Fisher every 10 steps"),
    # Sophia: SophiaG's class defaults (betas, rho 0.04, weight decay 0.1) and the script's k = 10; its clipped
    # step is at most lr per coordinate, so its lr lives on AdamW's scale (the authors use the same lr for both on
    # GPT-2); default = AdamW's until a sweep gives the best one.
    "sophia": OptimizerSpec(
        "sophia", _whiten("Sophia"), default_lr=4.64e-3, lr_grid=lr_grid(-12, -5),
        options=dict(betas=(0.965, 0.99), rho=0.04, weight_decay=0.1, k=10),
        source="whiten.Sophia (SophiaG defaults), Gauss-Newton-Bartlett Hessian every 10 steps"),
    # Scion: the reference's modded-nanogpt configuration (LIONS-EPFL/scion, examples/modded-nanogpt): constrained,
    # momentum 0.9 (its 0.1, the README's default, in the reference's 1 - beta convention), hidden Spectral radius
    # 50, head Sign radius 3000 (50 x 60, the README's nanoGPT example). Its embedding is the head's tied weight,
    # so the untied embeddings here get what that weight got: Sign with radius 3000. Vectors (LayerNorm gains,
    # which the reference's models do not have) BiasRMS radius 1. lr: 0.00036 there and 2^-12 in the README;
    # the grid spans 2^-13.3 ... 2^-7.8 around them (the lm/cpu sweep decides).
    "scion": OptimizerSpec(
        "scion", _whiten_scion, default_lr=2.15e-4, lr_grid=lr_grid(-12, -7),
        options=dict(momentum=0.9, scale={"hidden": 50.0, "conv": 50.0, "head": 3000.0, "embedding": 3000.0,
                                          "vector": 1.0}, role_norms={"embedding": "Sign"}),
        source="whiten.Scion, modded-nanogpt radii (hidden 50, head and embeddings Sign 3000), momentum 0.9"),
    # SpecGD: muon's entry with the exact U Vᵀ (scale "muon" = Muon's sqrt(max(1, m/n))), so the two compare at
    # the same lr grid and the gap measures Newton–Schulz's inexactness.
    "specgd": OptimizerSpec(
        "specgd", _whiten_specgd, default_lr=0.01, lr_grid=lr_grid(-7, -2),
        options=dict(momentum=0.95, weight_decay=0.1, adam_lr_ratio=0.15, adam_betas=(0.9, 0.95)),
        source="whiten.SpecGD (hidden, exact SVD) with its AdamW (rest) at 0.15 x lr, as muon"),
    "torch:Muon": OptimizerSpec(
        "torch:Muon", _torch_muon, default_lr=0.01, lr_grid=lr_grid(-7, -2),
        options=dict(momentum=0.95, weight_decay=0.1, adam_lr_ratio=0.15, adam_betas=(0.9, 0.95)),
        source="torch.optim.Muon (hidden) + torch.optim.AdamW (rest)"),
    # bfloat16 rotations (rotation_dtype): the same settings as splus / soap otherwise, to measure what the speed
    # knob costs in loss (docs/performance.md). A string, so config.json records it as written.
    "splus-bf16": OptimizerSpec(
        "splus-bf16", _splus, default_lr=0.1, lr_grid=lr_grid(-4, 1),
        options=dict(ema_rate="1-10/steps", rotation_dtype="bf16"), averages=True,
        source="whiten.SPlus as splus, rotations in bfloat16", variant_of="splus"),
    "soap-bf16": OptimizerSpec(
        "soap-bf16", _whiten("SOAP"), default_lr=4.64e-3, lr_grid=lr_grid(-10, -5),
        options=dict(betas=(0.95, 0.95), weight_decay=0.01, precondition_frequency=10, rotation_dtype="bf16"),
        source="whiten.SOAP as soap, rotations in bfloat16", variant_of="soap"),
    # Issue 23's state options, the same settings as splus / soap otherwise, to measure what each reduction of the
    # state costs in loss (docs/memory.md): bfloat16 momenta and bases (-state-bf16), 8- or 4-bit bases (-basis8,
    # -basis4).
    **{f"{base}{suffix}": OptimizerSpec(
        f"{base}{suffix}", builder, default_lr=lr, lr_grid=grid, options={**options, **extra},
        averages=base == "splus", source=f"whiten.{cls} as {base}, {what}", variant_of=base)
       for base, cls, builder, lr, grid, options in (
           ("splus", "SPlus", _splus, 0.1, lr_grid(-4, 1), dict(ema_rate="1-10/steps")),
           ("soap", "SOAP", _whiten("SOAP"), 4.64e-3, lr_grid(-10, -5),
            dict(betas=(0.95, 0.95), weight_decay=0.01, precondition_frequency=10)))
       for suffix, extra, what in (("-state-bf16", dict(state_dtype="bf16"), "momenta and bases stored in bfloat16"),
                                   ("-basis8", dict(basis_bits=8), "8-bit bases"),
                                   ("-basis4", dict(basis_bits=4), "4-bit bases"))},
    "pytorch_optimizer:SPlus": OptimizerSpec(
        "pytorch_optimizer:SPlus", _pytorch_optimizer("SPlus"), default_lr=0.1, lr_grid=lr_grid(-4, 1),
        # Same settings as whiten's splus entry, so the two implementations are compared like for like (its
        # nonstandard_constant is the paper's 1e-3 by default: whiten's derived value is given explicitly).
        options=dict(betas=(0.9, 0.95), weight_decay=0.1, nonstandard_constant="0.768/width", ema_rate="1-10/steps"),
        averages=True, source="pytorch_optimizer.SPlus, ema_rate = 1 - 10/steps", refresh_option="inverse_steps"),
    "pytorch_optimizer:SOAP": OptimizerSpec(
        "pytorch_optimizer:SOAP", _pytorch_optimizer("SOAP"), default_lr=4.64e-3, lr_grid=lr_grid(-10, -5),
        options=dict(betas=(0.95, 0.95), weight_decay=0.01), source="pytorch_optimizer.SOAP",
        refresh_option="precondition_frequency"),
    # K-FAC and EKFAC (whiten.KFAC/EKFAC, with model=): the references' settings (alecwangcq/KFAC-Pytorch: factors
    # every 10 steps, inversions every 100, damping 1e-3, factor decay 0.95, KL clip 1e-3, momentum 0.9). Weight
    # decay is L2 on the natural-gradient direction inside SGD's momentum, so 0.01 decays about as AdamW's 0.1.
    # Empirical Fisher: AdamW's loop. "-sampled": the true Fisher, the harness calling sample_fisher every 10 steps.
    # loss_average "batch" on vit (a classifier of token sequences) is only needed for the empirical Fisher: the
    # default treats every token as a loss term, right for lm; sampled labels count themselves.
    "kfac": OptimizerSpec(
        "kfac", _whiten_hooked("KFAC"), default_lr=0.01, lr_grid=lr_grid(-9, -1),
        options=dict(momentum=0.9, damping=1e-3, weight_decay=0.01, factor_every=10, inverse_every=100),
        source="whiten.KFAC (alecwangcq/KFAC-Pytorch settings), empirical Fisher"),
    "ekfac": OptimizerSpec(
        "ekfac", _whiten_hooked("EKFAC"), default_lr=0.01, lr_grid=lr_grid(-9, -1),
        options=dict(momentum=0.9, damping=1e-3, weight_decay=0.01, factor_every=10, inverse_every=100,
                     scale_every=10),
        source="whiten.EKFAC (alecwangcq/KFAC-Pytorch settings), empirical Fisher"),
    "kfac-sampled": OptimizerSpec(
        "kfac-sampled", _whiten_hooked("KFAC"), default_lr=0.01, lr_grid=lr_grid(-9, -1),
        options=dict(momentum=0.9, damping=1e-3, weight_decay=0.01, factor_every=10, inverse_every=100,
                     fisher="sampled"),
        source="whiten.KFAC (alecwangcq/KFAC-Pytorch settings), sampled-label (true) Fisher every 10 steps"),
    "ekfac-sampled": OptimizerSpec(
        "ekfac-sampled", _whiten_hooked("EKFAC"), default_lr=0.01, lr_grid=lr_grid(-9, -1),
        options=dict(momentum=0.9, damping=1e-3, weight_decay=0.01, factor_every=10, inverse_every=100,
                     scale_every=10, fisher="sampled"),
        source="whiten.EKFAC (alecwangcq/KFAC-Pytorch settings), sampled-label (true) Fisher every 10 steps"),
    # K-BFGS and K-BFGS(L) (whiten.KBFGS, with model=): the official train_model's settings (damping 0.3, momentum
    # 0.9, A and pair decay 0.9, L2 1e-5, 100 L-BFGS pairs) except its lr 0.3 (an MNIST autoencoder's). The damping
    # bounds H_g's and H_a's eigenvalues near 1/sqrt(0.3) along the pairs, so |H_g m H_a| is about |m|: the lr lives
    # on SGD's scale. Default lr: the best of the lm and vit cpu sweeps (4.64 on both, 10 diverged on both;
    # docs/results/fisher-family), kbfgs-l's too until it has its own. The harness passes step() a closure that recomputes the same batch's loss (needs_closure,
    # run.py): the second forward and backward is inside the timed step, as the rest of its cost.
    "kbfgs": OptimizerSpec(
        "kbfgs", _whiten_hooked("KBFGS"), default_lr=4.64, lr_grid=lr_grid(-6, 3),
        options=dict(momentum=0.9, damping=0.3, weight_decay=1e-5),
        source="whiten.KBFGS (renyiryry/kbfgs_neurips2020_public settings), a second pass per step"),
    "kbfgs-l": OptimizerSpec(
        "kbfgs-l", _whiten_hooked("KBFGS"), default_lr=4.64, lr_grid=lr_grid(-6, 3),
        options=dict(momentum=0.9, damping=0.3, weight_decay=1e-5, variant="K-BFGS(L)", memory=100),
        source="whiten.KBFGS K-BFGS(L), 100 pairs (renyiryry/kbfgs_neurips2020_public settings)"),
}

# The norm-based and Fisher families (issues 12 and 13), appended.


def _prodigyopt(model, lr, options, width, steps):
    try:
        import prodigyopt
    except ImportError as e:
        raise RuntimeError("prodigyopt:Prodigy needs the prodigyopt package: pip install prodigyopt") from e
    return prodigyopt.Prodigy(whiten.param_groups(model), lr=lr, **options)


REGISTRY.update({
    # Conda: the authors' scripts' settings (betas (0.9, 0.99), scale 0.25; weight decay GPT-2's 0.01); lr 0.01 is
    # their LLaMA lr (6e-3 for GPT-2), and the projected matrices step with 0.25 x lr. update_proj_gap: the scripts
    # refresh every 2000 steps of 10k-20k-step runs (5-10 refreshes); 200 keeps about that count in the sweeps'
    # 1000 steps, where 2000 would take the basis once, from the first gradient.
    "conda": OptimizerSpec(
        "conda", _whiten("Conda"), default_lr=0.01, lr_grid=lr_grid(-9, -4),
        options=dict(betas=(0.9, 0.99), weight_decay=0.01, update_proj_gap=200, scale=0.25),
        source="whiten.Conda (authors' script settings), update_proj_gap 200"),
    # The same settings in pytorch-optimizer's Conda (which projects every 2-D parameter, embeddings and head too).
    "pytorch_optimizer:Conda": OptimizerSpec(
        "pytorch_optimizer:Conda", _pytorch_optimizer("Conda"), default_lr=0.01, lr_grid=lr_grid(-9, -4),
        options=dict(betas=(0.9, 0.99), weight_decay=0.01, update_proj_gap=200, scale=0.25),
        source="pytorch_optimizer.Conda, the conda entry's settings"),
    # Prodigy: lr multiplies the estimated step D (the authors: leave it at 1); the grid spans 0.1x to 4.6x.
    # safeguard_warmup: the authors' advice with a linear warm-up, which the harness uses. Weight decay is
    # decoupled and scaled by D x lr, as AdamW's by its lr: AdamW's 0.1.
    "prodigy": OptimizerSpec(
        "prodigy", _whiten("Prodigy"), default_lr=1.0, lr_grid=lr_grid(-3, 2),
        options=dict(weight_decay=0.1, safeguard_warmup=True), source="whiten.Prodigy, safeguard_warmup"),
    "prodigyopt:Prodigy": OptimizerSpec(
        "prodigyopt:Prodigy", _prodigyopt, default_lr=1.0, lr_grid=lr_grid(-3, 2),
        options=dict(weight_decay=0.1, safeguard_warmup=True), source="prodigyopt.Prodigy (the authors' package)"),
    # M-FAC: the window is m x the model (0.8M parameters at the cpu profile: 128 gradients = 0.4 GB); the
    # authors use 512-1024 on ImageNet-sized runs. damp and momentum are the reference's defaults. The step is
    # about m g / |g|^2 along g (a Newton-like scale, not Adam's), so the grid is wide; on the tiny profile 1e-3
    # was best of 1e-4..0.1 and 0.01 diverged.
    "mfac": OptimizerSpec(
        "mfac", _whiten("MFAC"), default_lr=1e-3, lr_grid=lr_grid(-12, -6),
        options=dict(ngrads=128, damp=1e-5), source="whiten.MFAC, ngrads 128, damp 1e-5"),
})

# Issue 23's state_dtype on Shampoo, PSGD-Kron, K-FAC and EKFAC: each entry's settings with the state the option
# covers stored in bfloat16 (Shampoo's roots; PSGD-Kron's momentum and Q; K-FAC's momenta and inverses; EKFAC's
# momenta, bases and scale), to measure what it costs in loss (docs/memory.md).
REGISTRY.update({
    f"{base}-state-bf16": dataclasses.replace(
        REGISTRY[base], name=f"{base}-state-bf16", options={**REGISTRY[base].options, "state_dtype": "bf16"},
        source=f"{REGISTRY[base].source}, state_dtype bfloat16", variant_of=base)
    for base in ("shampoo", "psgd-kron", "kfac", "ekfac")})


def get_spec(name: str) -> OptimizerSpec:
    """The registry entry for ``name``; ``pytorch_optimizer:<Class>`` works for any class of that package."""
    if name in REGISTRY:
        return REGISTRY[name]
    if name.startswith("pytorch_optimizer:"):
        class_name = name.split(":", 1)[1]
        if not class_name:
            raise ValueError("pytorch_optimizer: needs a class name, e.g. pytorch_optimizer:Lion")
        return OptimizerSpec(name, _pytorch_optimizer(class_name), default_lr=1e-3, lr_grid=lr_grid(-11, -6),
                             source=f"pytorch_optimizer.{class_name}")
    known = ", ".join(sorted(REGISTRY))
    raise ValueError(f"unknown optimizer {name!r}; known: {known}, or pytorch_optimizer:<Class>")


def with_options(spec: OptimizerSpec, refresh: int | None = None, options: dict | None = None) -> OptimizerSpec:
    """``spec`` with its refresh interval set to ``refresh`` (through its ``refresh_option``) and ``options``
    (``--opt key=value``) laid over its options. Raises ValueError naming the optimizer when it has no refresh
    interval."""
    extra = dict(options or {})
    if refresh is not None:
        if spec.refresh_option is None:
            having = ", ".join(name for name, s in REGISTRY.items() if s.refresh_option)
            raise ValueError(f"{spec.name} has no refresh interval (those that do: {having})")
        extra[spec.refresh_option] = refresh
    if not extra:
        return spec
    return dataclasses.replace(spec, options={**spec.options, **extra})


def build_optimizer(spec: OptimizerSpec, model, lr: float, width: int, steps: int = 10_000, process_group=None):
    """The optimizer of ``spec`` for ``model``. ``process_group`` (a DDP run) reaches whiten's optimizers, which
    split their work over it; others run replicated."""
    options = dict(spec.options)
    if process_group is not None and getattr(spec.build, "whiten", False):
        options["process_group"] = process_group
    opt = spec.build(model, lr, options, width, steps)
    if spec.averages and not (hasattr(opt, "eval") and hasattr(opt, "train")):
        raise TypeError(f"{spec.name} is registered as averaging but has no eval()/train()")
    return opt


# ---------------------------------------------------------------------------------------------------------------
# Defaults per task: what `compare` runs
# ---------------------------------------------------------------------------------------------------------------

# Best lrs measured on each task (docs/results). An optimizer missing here for a task runs at its registry default
# (its lm setting where LM_TUNED lists it), and `compare` says that default was not tuned on the task.
# vit: docs/results/vit-dit-seeds and fisher-family/vit-report.md (2 seeds; soap ran one lr only, kbfgs 4.64 was
# best of its vit grid). dit: vit-dit-seeds/dit-report (2 seeds) and cpu-protocol.
TASK_DEFAULTS: dict[str, dict[str, dict]] = {
    "vit": {
        "adamw": dict(lr=4.64e-4, source="docs/results/vit-dit-seeds (2 seeds, interior best)"),
        "splus": dict(lr=0.0215, source="docs/results/vit-dit-seeds (2 seeds, interior best)"),
        "soap": dict(lr=2.15e-3, source="docs/results/fisher-family/vit-report.md (one lr run: not a sweep)"),
        "tnt": dict(lr=1e-6, source="docs/results/fisher-family/vit-report.md"),
        "kfac-sampled": dict(lr=0.0215, source="docs/results/fisher-family/vit-report.md"),
        "ekfac-sampled": dict(lr=0.0215, source="docs/results/fisher-family/vit-report.md"),
        "mfac": dict(lr=0.01, source="docs/results/fisher-family/vit-report.md"),
        "sophia": dict(lr=1e-4, source="docs/results/fisher-family/vit-report.md"),
        "kbfgs": dict(lr=4.64, source="docs/results/fisher-family (kbfgs-vit-report.md)"),
    },
    "dit": {
        "adamw": dict(lr=4.64e-3, source="docs/results/vit-dit-seeds (2 seeds)"),
        "splus": dict(lr=0.215, source="docs/results/vit-dit-seeds (2 seeds, interior best)"),
    },
}
# Registry defaults that are the best of an lm sweep at the cpu profile (docs/results/cpu-protocol and the family
# pages): on lm they are tuned, elsewhere they are lm's.
LM_TUNED = frozenset({"adamw", "splus", "muon", "torch:Muon", "psgd-kron", "soap", "shampoo", "pytorch_optimizer:SOAP",
                      "schedule-free-adamw", "schedule-free-adamw-b0.999", "kbfgs", "scion", "specgd", "conda",
                      "prodigy"})


def task_default(name: str, task: str) -> tuple[float, dict, str | None]:
    """(lr, options, note) for ``compare`` on ``task``: the setting tuned on that task where the project has one;
    else the registry default, with a note saying it was not tuned on ``task`` (None when it was)."""
    spec = get_spec(name)
    if spec.variant_of is not None and name not in TASK_DEFAULTS.get(task, {}):
        lr, options, note = task_default(spec.variant_of, task)
        return lr, options, note and f"{name}: runs at {spec.variant_of}'s setting; {note}"
    tuned = TASK_DEFAULTS.get(task, {}).get(name)
    if tuned is not None:
        return tuned["lr"], dict(tuned.get("options", {})), None
    if task == "lm" and name in LM_TUNED:
        return spec.default_lr, {}, None
    where = "tuned on lm" if name in LM_TUNED else "not from a sweep"
    return spec.default_lr, {}, f"{name}: lr {spec.default_lr:.3g} is the registry default ({where}), not tuned on {task}"


# ---------------------------------------------------------------------------------------------------------------
# Search spaces: what `whiten-bench tune` varies
# ---------------------------------------------------------------------------------------------------------------

# Each entry: hyperparameter -> grid. "lr" is the peak lr (the registry grid by default), "warmup" the warm-up as a
# fraction of the run (0.05 is the harness default); any other key is an optimizer option, and "name[i]" sets one
# element of a tuple option (betas[1] is β2). The start of the search is the registry's setting (its options, else
# the constructor's default); every grid holds it. Values follow the references' common ranges, kept to 3-4 points
# so a coordinate sweep costs a few runs.
_WARMUP = (0.02, 0.05, 0.1)
SEARCH_SPACES: dict[str, dict[str, tuple]] = {
    "adamw": {"lr": (), "weight_decay": (0.0, 0.05, 0.1, 0.2), "betas[0]": (0.8, 0.9, 0.95),
              "betas[1]": (0.95, 0.98, 0.99), "warmup": _WARMUP},
    "splus": {"lr": (), "weight_decay": (0.0, 0.05, 0.1, 0.2), "betas[0]": (0.8, 0.9, 0.95),
              "betas[1]": (0.95, 0.98, 0.99), "ema_rate": ("1-5/steps", "1-10/steps", "1-20/steps"),
              "inverse_every": (30, 100, 300), "warmup": _WARMUP},
    "soap": {"lr": (), "weight_decay": (0.0, 0.01, 0.1), "betas[0]": (0.9, 0.95), "betas[1]": (0.95, 0.99),
             "precondition_frequency": (5, 10, 30), "warmup": _WARMUP},
    "muon": {"lr": (), "weight_decay": (0.0, 0.05, 0.1, 0.2), "momentum": (0.9, 0.95, 0.98),
             "adam_lr_ratio": (0.05, 0.15, 0.5), "warmup": _WARMUP},
    "psgd-kron": {"lr": (), "weight_decay": (0.0, 0.05, 0.1, 0.2), "b1": (0.9, 0.95),
                  "precond_lr": (0.05, 0.1, 0.2), "warmup": _WARMUP},
    "kfac": {"lr": (), "damping": (1e-4, 1e-3, 1e-2), "kl_clip": (1e-4, 1e-3, 1e-2), "momentum": (0.8, 0.9, 0.95),
             "weight_decay": (0.0, 0.01, 0.1), "warmup": _WARMUP},
    "sophia": {"lr": (), "rho": (0.01, 0.04, 0.1), "betas[1]": (0.99, 0.995), "weight_decay": (0.0, 0.1, 0.2),
               "warmup": _WARMUP},
}


def search_space(name: str) -> dict[str, tuple]:
    """The registry's search space for ``name``: its own entry, else lr, weight decay (where the optimizer has it)
    and warm-up. An empty "lr" grid means the registry's lr grid."""
    spec = get_spec(name)
    space = SEARCH_SPACES.get(name)
    if space is None:
        space = {"lr": ()}
        if "weight_decay" in spec.options:
            wd = spec.options["weight_decay"]
            space["weight_decay"] = tuple(sorted({0.0, wd / 10, wd, wd * 2}))
        space["warmup"] = _WARMUP
    return {k: (tuple(v) if v else tuple(spec.lr_grid) if k == "lr" else ()) for k, v in space.items()}


def _constructor(spec: OptimizerSpec):
    """The optimizer class a registry builder makes (for the defaults of options the registry does not set)."""
    target = getattr(spec.build, "target", None)
    if target is None:
        return None
    module, cls = target
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError):
        return None


_MISSING = object()


def option_default(spec: OptimizerSpec, key: str):
    """The value a run of ``spec`` uses for option ``key`` when nothing overrides it: the registry's, else the
    constructor's default. ValueError naming the key when it cannot be told."""
    if key in spec.options:
        return spec.options[key]
    cls = _constructor(spec)
    if cls is not None:
        import inspect

        param = inspect.signature(cls.__init__).parameters.get(key)
        if param is not None and param.default is not inspect.Parameter.empty:
            return param.default
    raise ValueError(f"{spec.name} has no option {key!r} with a known default (registry options: "
                     f"{', '.join(sorted(spec.options)) or 'none'}); give its start in the space, "
                     f'e.g. {{"{key}": {{"grid": [...], "start": VALUE}}}}')
