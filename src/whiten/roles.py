"""Parameter roles: which parameters are hidden matrices, embeddings, output heads, vectors or conv kernels.

Whitening optimizers treat these differently (SPlus scales non-hidden roles by a small constant; Muon sends them
to AdamW; weight decay is usually off for vectors and embeddings). ``param_groups(model)`` finds the roles from the
model's structure and returns param-group dicts that every whiten optimizer (and every torch optimizer) accepts.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["ROLES", "RoleEntry", "RolePlan", "param_groups", "plan_roles", "role_from_shape"]

ROLES = ("hidden", "embedding", "head", "vector", "conv", "experts")
# ``experts``: a tensor of >= 3 dims whose leading dim indexes independent matrices, a mixture-of-experts layer's
# (E, out, in) weights: whiten's optimizers step each expert's matrix exactly as they would step it alone.
# Roles whose weight decay is off by default: the SPlus paper's mask (biases, norm gains, embeddings).
NO_DECAY_ROLES = ("vector", "embedding")

_HEAD_NAMES = re.compile(r"(^|[._])(lm_head|head|heads|classifier|fc_out|output|out_head|logits)$")
_EMBED_NAMES = re.compile(r"(emb|embed|embedding|token|tok|wpe|wte|cls)", re.IGNORECASE)
# Modules whose Linear layers belong to an embedder (DiT's t_embedder.mlp). Not "cls": BERT's MLM head lives
# under ``cls.predictions`` and its transform is a hidden matrix.
_EMBEDDER_NAMES = re.compile(r"(emb|embed|embedding|token|tok|wpe|wte)", re.IGNORECASE)
_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)
_CONV_TYPES = (nn.modules.conv._ConvNd,)
# a path component naming the experts of a mixture-of-experts layer (moe.experts.w1, experts_w1, ...)
_EXPERT_NAMES = re.compile(r"(^|[._])(experts?|expert_\w*|experts_\w*|\w*_experts)($|[._])", re.IGNORECASE)


def role_from_shape(p: torch.Tensor) -> str:
    """The role a bare tensor gets when nothing but its shape is known."""
    if p.ndim < 2:
        return "vector"
    if p.ndim == 2:
        return "hidden"
    return "conv"


@dataclass
class RoleEntry:
    name: str
    shape: tuple[int, ...]
    role: str
    reason: str
    param: torch.Tensor = field(repr=False)
    # True for a matrix stored as (in, out), as Hugging Face's Conv1D (GPT-2) stores its weight; whiten's
    # optimizers read the group key ``transposed`` where the orientation matters (Muon's scale).
    transposed: bool = False


@dataclass
class RolePlan:
    """The role of every trainable parameter and why. ``str(plan)`` is a readable table."""

    entries: list[RoleEntry]
    frozen: list[str]

    def by_role(self) -> dict[str, list[RoleEntry]]:
        out: dict[str, list[RoleEntry]] = {}
        for e in self.entries:
            out.setdefault(e.role, []).append(e)
        return out

    def role_of(self, name: str) -> str:
        for e in self.entries:
            if e.name == name:
                return e.role
        raise KeyError(f"no trainable parameter named {name!r}")

    def __str__(self) -> str:
        rows = [(e.name, "x".join(map(str, e.shape)) or "scalar", e.role, e.reason) for e in self.entries]
        head = ("parameter", "shape", "role", "why")
        widths = [max(len(r[i]) for r in rows + [head]) for i in range(3)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)) + "  " + head[3]]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[3] for r in rows]
        counts = {role: sum(1 for e in self.entries if e.role == role) for role in ROLES}
        lines.append("roles: " + ", ".join(f"{k} {v}" for k, v in counts.items() if v))
        if self.frozen:
            lines.append(f"frozen (requires_grad=False, left out): {', '.join(self.frozen)}")
        return "\n".join(lines)


def _owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """Every (module name, module, attribute) that holds each parameter; more than one means the weight is tied."""
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for attr, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((mod_name, module, attr))
    return owners


def _is_transposed_linear(module: nn.Module, attr: str, p: torch.Tensor) -> bool:
    """Hugging Face's Conv1D (GPT-2, GPT-Neo's ancestors): a Linear whose weight is stored (in, out)."""
    return (type(module).__name__ == "Conv1D" and attr == "weight" and p.ndim == 2
            and getattr(module, "nf", None) == p.shape[1])


def _in_repeated_block(mod_name: str) -> bool:
    # ModuleList/Sequential children show up as a numeric path component (blocks.3.mlp.fc1).
    return any(part.isdigit() for part in mod_name.split(".")[:-1])


def _find_head(model: nn.Module) -> str | None:
    """Name of the Linear module that most likely produces the model's output."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for n, _ in reversed(linears):
        if _HEAD_NAMES.search(n):
            return n
    outside = [n for n, _ in linears if not _in_repeated_block(n)]
    if outside:
        return outside[-1]
    return linears[-1][0] if linears else None


def _check_overrides(overrides: dict[str, str] | None) -> dict[str, str]:
    overrides = dict(overrides or {})
    for pattern, role in overrides.items():
        if role not in ROLES:
            raise ValueError(f"overrides[{pattern!r}] = {role!r}: role must be one of {', '.join(ROLES)}")
    return overrides


def plan_roles(model: nn.Module, overrides: dict[str, str] | None = None) -> RolePlan:
    """Assign a role to every trainable parameter of ``model``.

    Rules, first match wins:
      1. ``overrides``: ``{pattern: role}``, a glob (``"blocks.*.attn.*"``) or exact name matched on the
         parameter's qualified name.
      2. A weight shared by an ``nn.Embedding`` and a ``nn.Linear`` (a tied LM head) is ``head``.
      3. Weights of ``nn.Embedding``/``nn.EmbeddingBag`` are ``embedding``.
      4. Parameters of norm layers and every tensor with fewer than 2 dims are ``vector``.
      5. Weights of conv layers are ``conv``; other tensors of >= 3 dims whose name has a component like
         ``experts`` (``moe.experts.w1``, ``experts_w1``) are ``experts``: (E, out, in), E matrices stepped alone.
      6. The output Linear (named like ``head``/``lm_head``/``classifier``, or else the last Linear outside repeated
         blocks) is ``head``.
      7. Parameters held directly by a module (not a layer) whose name says embedding (``pos_embed``,
         ``cls_token``, ``wpe``) and Linear layers inside an embedder module (``t_embedder.mlp.0``) are
         ``embedding``.
      8. Other 2-D weights are ``hidden``; other ≥3-D tensors are ``conv``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    overrides = _check_overrides(overrides)
    owners = _owners(model)
    head_module = _find_head(model)
    entries: list[RoleEntry] = []
    frozen: list[str] = []
    used_patterns: set[str] = set()

    for name, p in model.named_parameters():
        if not p.requires_grad:
            frozen.append(name)
            continue
        own = owners[id(p)]
        mod_name, module, attr = own[0]
        role, reason = None, ""
        for pattern, r in overrides.items():
            if name == pattern or fnmatch.fnmatchcase(name, pattern):
                role, reason = r, f"override {pattern!r}"
                used_patterns.add(pattern)
                break
        if role is None:
            kinds = {type(m) for _, m, _ in own}
            embeds = [m for _, m, _ in own if isinstance(m, (nn.Embedding, nn.EmbeddingBag))]
            if embeds and any(issubclass(k, nn.Linear) for k in kinds):
                role, reason = "head", "Linear weight tied to an Embedding"
            elif embeds:
                role, reason = "embedding", f"weight of {type(embeds[0]).__name__}"
            elif isinstance(module, _NORM_TYPES):
                role, reason = "vector", f"parameter of {type(module).__name__}"
            elif p.ndim < 2:
                role, reason = "vector", "fewer than 2 dims (bias, gain or scalar)"
            elif isinstance(module, _CONV_TYPES):
                role, reason = "conv", f"weight of {type(module).__name__}"
            elif p.ndim >= 3 and _EXPERT_NAMES.search(name):
                role, reason = "experts", f"{p.ndim}-D weight named like experts: {p.shape[0]} matrices"
            elif isinstance(module, nn.Linear) and mod_name == head_module:
                role, reason = "head", "output Linear of the model"
            elif isinstance(module, nn.Linear) and _EMBEDDER_NAMES.search(mod_name.rsplit(".", 1)[0] if "." in mod_name else ""):
                role, reason = "embedding", "Linear inside an embedder module"
            elif not isinstance(module, (nn.Linear, nn.Bilinear)) and _EMBED_NAMES.search(attr):
                role, reason = "embedding", "free tensor named like an embedding"
            elif _is_transposed_linear(module, attr, p):
                role, reason = "hidden", "weight of Conv1D, stored (in, out)"
            else:
                role = role_from_shape(p)
                reason = {"hidden": "2-D weight", "conv": f"{p.ndim}-D weight"}[role]
        transposed = role != "vector" and _is_transposed_linear(module, attr, p)
        entries.append(RoleEntry(name=name, shape=tuple(p.shape), role=role, reason=reason, param=p,
                                 transposed=transposed))

    unused = set(overrides) - used_patterns
    if unused:
        raise ValueError(f"overrides matched no trainable parameter: {sorted(unused)}")
    return RolePlan(entries=entries, frozen=frozen)


def param_groups(
    model: nn.Module,
    *,
    overrides: dict[str, str] | None = None,
    role_options: dict[str, dict] | None = None,
    decay_embeddings_and_vectors: bool = False,
    verbose: bool = False,
    return_plan: bool = False,
    **options,
):
    """Param-group dicts for ``model``, one group per role present, each with a ``"role"`` key.

    Args:
        model: the module whose trainable parameters are grouped (``requires_grad=False`` ones are left out).
        overrides: ``{name pattern: role}`` that takes precedence over detection (see :func:`plan_roles`).
        role_options: extra group options per role, e.g. ``{"embedding": {"lr": 1e-3}}``.
        decay_embeddings_and_vectors: if False (default), the ``vector`` and ``embedding`` groups get
            ``weight_decay=0.0`` so any optimizer, ``torch.optim.AdamW`` included, applies the usual mask.
        verbose: print the plan (name, shape, role, why).
        return_plan: return ``(groups, plan)`` instead of ``groups``.
        **options: group options for every group (``lr=...``, ``weight_decay=...``).

    Every trainable parameter lands in exactly one group. Matrices stored as (in, out) (Hugging Face's Conv1D)
    get a group of their own with ``"transposed": True``.
    """
    role_options = dict(role_options or {})
    for role in role_options:
        if role not in ROLES:
            raise ValueError(f"role_options key {role!r}: role must be one of {', '.join(ROLES)}")
    plan = plan_roles(model, overrides)
    if verbose:
        print(plan)
    groups = []
    for role, entries in plan.by_role().items():
        for transposed in (False, True):
            params = [e.param for e in entries if e.transposed == transposed]
            if not params:
                continue
            group = {"params": params, "role": role, **options}
            if transposed:
                group["transposed"] = True
            if role in NO_DECAY_ROLES and not decay_embeddings_and_vectors:
                group["weight_decay"] = 0.0
            group.update(role_options.get(role, {}))
            groups.append(group)
    groups.sort(key=lambda g: (ROLES.index(g["role"]), g.get("transposed", False)))
    return (groups, plan) if return_plan else groups
