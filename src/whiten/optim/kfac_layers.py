r"""K-FAC's layers: which modules are preconditioned layers, how their inputs and output gradients become the rows
of the Kronecker factors (im2col for convolutions), the hooks that collect those statistics during the model's
own forward and backward, and the plan of which parameter is a layer's weight, its bias or a fallback parameter.

Shared by :class:`whiten.KFAC`, :class:`whiten.EKFAC` and :class:`whiten.KBFGS` through :class:`LayerHooksMixin`;
the factors, inverses and eigenbases themselves live in :mod:`whiten.optim.kfac`, :mod:`whiten.optim.ekfac` and
:mod:`whiten.optim.kbfgs`.
"""

from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import all_reduce_flat
from .checks import check_choice, check_int
from .update import state_dtype, stored_dtype

# what the loss averages, for the number of loss terms L of the ordinary backward (see _loss_terms)
LOSS_AVERAGES = ("batch+sequence", "batch")


# ----- which modules are K-FAC layers ------------------------------------------------------------------------------

def layer_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv2d"`` or ``"embedding"`` for a module K-FAC preconditions, None otherwise.

    ``nn.MultiheadAttention``'s ``out_proj`` is a Linear whose hooks never fire (the attention calls
    ``F.multi_head_attention_forward`` with its weight; kfac-pytorch issue #267), so it is not a layer here: its
    parameters take the fallback. Grouped convolutions (``groups > 1``) and non-zero padding modes are not the
    im2col product K-FAC's conv factors describe: fallback too."""
    if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return None
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros":
        return "conv2d"
    if isinstance(module, nn.Embedding) and not module.sparse:
        return "embedding"
    return None


@dataclass(eq=False)
class Layer:
    """One preconditioned layer: its module, its weight and (when the optimizer steps it) its bias. The gradient
    matrix is (d_out, d_in): a Linear's (out, in [+1]), a conv's (out, in·kh·kw [+1]), an embedding's transposed
    weight (dim, vocabulary), since the embedding is a Linear from one-hot vectors whose A factor is diagonal."""

    name: str
    module: nn.Module
    kind: str
    weight: torch.Tensor
    bias: torch.Tensor | None

    @property
    def d_out(self) -> int:
        return self.weight.shape[1] if self.kind == "embedding" else self.weight.shape[0]

    @property
    def d_in(self) -> int:
        if self.kind == "embedding":
            return self.weight.shape[0]
        return math.prod(self.weight.shape[1:]) + (self.bias is not None)  # shapes only: no DTensor indexing

    @property
    def diagonal_a(self) -> bool:
        return self.kind == "embedding"

    def matrix(self, w_grad: torch.Tensor | None, b_grad: torch.Tensor | None, dtype) -> torch.Tensor:
        """The (d_out, d_in) gradient matrix in ``dtype``; a missing gradient counts as zeros."""
        w = torch.zeros(self.weight.shape, dtype=dtype, device=self.weight.device) if w_grad is None \
            else w_grad.to(dtype)
        if self.kind == "embedding":
            return w.T
        w = w.reshape(self.weight.shape[0], -1)
        if self.bias is None:
            return w
        b = torch.zeros(self.bias.shape, dtype=dtype, device=w.device) if b_grad is None else b_grad.to(dtype)
        return torch.cat([w, b.reshape(-1, 1)], dim=1)

    def split(self, M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Inverse of :meth:`matrix`: the weight's and the bias's parts, in their shapes."""
        if self.kind == "embedding":
            return M.T, None
        if self.bias is None:
            return M.reshape(self.weight.shape), None
        return M[:, :-1].reshape(self.weight.shape), M[:, -1].reshape(self.bias.shape)


def _conv_patches(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """im2col: (batch, positions, in·kh·kw), the order of ``weight.view(out, -1)``'s columns."""
    if x.ndim == 3:  # unbatched input
        x = x.unsqueeze(0)
    if isinstance(module.padding, str):  # "same"/"valid": the module's own (possibly asymmetric) zero padding
        x = F.pad(x, module._reversed_padding_repeated_twice)
        padding = 0
    else:
        padding = module.padding
    cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
    return cols.transpose(1, 2)


def input_rows(layer: Layer, x: torch.Tensor, dtype) -> torch.Tensor:
    """The layer's input as (examples, positions, d_in) in ``dtype``, a column of ones appended for the bias;
    for an embedding, the token indices as (examples, positions)."""
    if layer.kind == "embedding":
        return x.reshape(x.shape[0], -1) if x.ndim > 1 else x.reshape(1, -1)
    if layer.kind == "conv2d":
        X = _conv_patches(layer.module, x).to(dtype)
    else:
        X = x.reshape(x.shape[0] if x.ndim > 1 else 1, -1, x.shape[-1]).to(dtype)
    if layer.bias is not None:
        X = torch.cat([X, X.new_ones(X.shape[:-1] + (1,))], dim=-1)
    return X


def output_rows(layer: Layer, g: torch.Tensor, dtype) -> torch.Tensor:
    """The output gradient as (examples, positions, d_out) in ``dtype``."""
    if layer.kind == "conv2d":
        if g.ndim == 3:
            g = g.unsqueeze(0)
        return g.flatten(2).transpose(1, 2).to(dtype)
    return g.reshape(g.shape[0] if g.ndim > 1 else 1, -1, g.shape[-1]).to(dtype)


def a_statistic(layer: Layer, X: torch.Tensor) -> torch.Tensor:
    """E[a aᵀ] over all rows (examples × positions); the token frequencies for an embedding."""
    if layer.kind == "embedding":
        idx = X.reshape(-1)
        return torch.bincount(idx, minlength=layer.d_in).to(layer_stat_dtype(layer)) / max(idx.numel(), 1)
    rows = X.reshape(-1, X.shape[-1])
    return rows.T @ rows / max(rows.shape[0], 1)


def layer_stat_dtype(layer: Layer) -> torch.dtype:
    return state_dtype(layer.weight)


# ----- what the hooks collect ---------------------------------------------------------------------------------------

class Stats:
    """One layer's statistics since the last step, by name: sums over hook calls and how many calls. ``s.a``,
    ``s.g``, ... read a sum (None where none came)."""

    def __init__(self):
        self.sums: dict = {}
        self.calls: dict = {}

    def add(self, name: str, value: torch.Tensor) -> None:
        old = self.sums.get(name)
        self.sums[name] = value if old is None else old.add_(value)
        self.calls[name] = self.calls.get(name, 0) + 1

    def __getattr__(self, name: str):
        if name.startswith("_") or name in ("sums", "calls"):
            raise AttributeError(name)
        return self.sums.get(name)


class Ready:
    """One layer's statistics for this step (means over calls, and over ranks in a distributed run), by name:
    ``ready.a``, ``ready.g``, ... (None for a statistic that did not come)."""

    def __init__(self, **values):
        self.__dict__.update(values)

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return None


class _Hook:
    """A forward hook that reaches its optimizer through a weak reference, so a dropped optimizer neither stays
    alive through the model nor keeps working; it pickles (and deep-copies along with a model) as a no-op."""

    def __init__(self, optimizer):
        self.optimizer = weakref.ref(optimizer)

    def __call__(self, module, args, kwargs, output):
        opt = self.optimizer()
        if opt is not None:
            opt._on_forward(module, args, kwargs, output)

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.optimizer = lambda: None

    def __deepcopy__(self, memo):
        dead = _Hook.__new__(_Hook)
        dead.optimizer = lambda: None
        return dead


@dataclass(eq=False)
class _Plan:
    """Which parameter is what, for the current param groups: K-FAC layers and the fallback parameters."""

    layers: list[Layer] = field(default_factory=list)
    by_module: dict = field(default_factory=dict)  # id(module) -> Layer
    role: dict = field(default_factory=dict)  # id(param) -> ("weight" | "bias", Layer) for K-FAC parameters


def _remove_handles(handles) -> None:
    for h in handles:
        h.remove()


# ----- the hooks and the plan, for the optimizers ------------------------------------------------------------------


class LayerHooksMixin:
    """What K-FAC, EKFAC and K-BFGS share before any factor is formed: the forward hooks on ``self.model``'s layers
    and the output-gradient hooks they place, the statistics they collect (means over calls, and over ranks), the
    plan of which parameter is what, one owner per layer (weight and bias) in a distributed run, and the hooks
    rebuilt on a copy.

    The optimizer defines ``_layer_shapes(layer) -> {key: shape}``, the tensors a layer keeps in its weight's
    state. It calls :meth:`_set_model` and sets ``loss_average`` (and, for K-FAC's hooks, ``fisher`` and
    ``factor_every``) before ``WhitenOptimizer.__init__``; a subclass that also measures in an eigenbasis (EKFAC)
    overrides :meth:`_scale_step` and :meth:`_scale_basis` and defines ``_correction(layer, X, Y, basis)``, the
    statistic a scale step adds; one that collects other
    statistics (K-BFGS) overrides :meth:`_on_forward`, ``STATS`` and :meth:`_stat_shape`.
    """

    # the model travels with the optimizer, so that a copy hooks its own copy of the model
    PICKLED = {"model": None, "loss_average": "batch+sequence", "max_dim": None}
    # the layer kinds this optimizer preconditions (see layer_kind); modules of other kinds take the fallback
    LAYER_KINDS: tuple[str, ...] = ("linear", "conv2d", "embedding")

    def _layer_kind(self, module: nn.Module) -> str | None:
        kind = layer_kind(module)
        return kind if kind in self.LAYER_KINDS else None

    def _set_model(self, model: nn.Module, loss_average: str, max_dim: int | None = None) -> None:
        """Keep ``model``, ``loss_average`` and ``max_dim`` (checked) and start the hooks' bookkeeping: before
        ``WhitenOptimizer.__init__``."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"{type(self).__name__}: model must be the torch.nn.Module whose layers it "
                            f"preconditions, got {type(model).__name__}")
        check_choice("loss_average", loss_average, LOSS_AVERAGES)
        if max_dim is not None:
            check_int("max_dim", max_dim, 1)
        self.model = model
        self.loss_average = loss_average
        self.max_dim = max_dim
        self._reset_layers()

    def _check_in_model(self, group: dict) -> None:
        """Refuse a group holding a tensor that is not a parameter of the model (from ``validate_group``)."""
        outside = [i for i, p in enumerate(group["params"]) if id(p) not in self._model_params]
        if outside:
            p = group["params"][outside[0]]
            raise ValueError(f"{type(self).__name__}: parameter {outside[0]} of the group (shape {tuple(p.shape)}) "
                             "is not a parameter of model; it steps the parameters of the model it hooks "
                             "(pass model.parameters() or whiten.param_groups(model) of that model)")

    def _reset_layers(self) -> None:
        """The hooks' bookkeeping, empty: at construction and after unpickling."""
        self._model_params = {id(p) for p in self.model.parameters()}
        self._plan_key, self._plan = None, _Plan()
        self._pending: dict = {}  # layer -> Stats since the last step
        self._ready: dict = {}  # layer -> Ready for the step in progress
        self._handles: list = []
        self._warned: set = set()

    # ----- hooks ------------------------------------------------------------------------------------------------
    def register_hooks(self) -> None:
        """Attach the forward hooks to every supported module of the model (done at construction)."""
        if self._handles:
            return
        hook = _Hook(self)
        self._handles = [m.register_forward_hook(hook, with_kwargs=True)
                         for m in self.model.modules() if self._layer_kind(m) is not None]
        weakref.finalize(self, _remove_handles, list(self._handles))

    def remove_hooks(self) -> None:
        """Detach the hooks: the model runs as if no K-FAC were attached; the optimizer keeps stepping with the
        factors it has. Statistics caught since the last step are dropped."""
        _remove_handles(self._handles)
        self._handles = []
        self._pending = {}

    @property
    def hooks_registered(self) -> bool:
        return bool(self._handles)

    def _factor_step(self, step: int) -> bool:
        return step % self.factor_every == 0

    def _scale_step(self, step: int) -> bool:
        return False

    def fisher_schedule(self, step: int) -> bool:
        return self.fisher == "sampled" and (self._factor_step(step) or self._scale_step(step))

    def fisher_params(self) -> list[torch.Tensor]:
        # Asking autograd for every layer's weight makes the sampled backward reach every layer's output, where
        # the hooks are; the gradients themselves are not used.
        weights = [layer.weight for layer in self.plan().layers]
        return weights or [p for g in self.param_groups for p in g["params"]]

    def capture_fisher(self, grads: list, n: int) -> None:
        """K-FAC takes the sampled backward's output gradients in its hooks; the parameter gradients are dropped."""

    def _collects(self, step: int) -> bool:
        return self._factor_step(step) or self._scale_step(step)

    def _on_forward(self, module, args, kwargs, output) -> None:
        step = self.fisher_steps
        if self.__dict__.get("_pending_check") is not None and (self._collects(step) or self._collects(step - 1)):
            # a sync-free step read one step later: a skipped one does not advance the clock, so whether this
            # forward collects is decided after its flags are read (only next to a step that collects)
            self.resolve_pending()
            step = self.fisher_steps
        factors, scale = self._factor_step(step), self._scale_step(step)
        if not (factors or scale) or not torch.is_grad_enabled():  # most steps, and evaluation: nothing to do
            return
        layer = self._plan.by_module.get(id(module))  # the plan is rebuilt whenever the param groups change
        if (layer is None or layer.module is not module or not isinstance(output, torch.Tensor)
                or not output.requires_grad):
            return
        basis = self._scale_basis(layer) if scale else None
        if not factors and basis is None:
            return
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, torch.Tensor):
            return
        X = input_rows(layer, x.detach(), layer_stat_dtype(layer))
        if factors:
            self._pending.setdefault(layer, Stats()).add("a", a_statistic(layer, X))
        hook = weakref.ref(self)
        keep = X if basis is not None else None

        def on_grad(grad, layer=layer, factors=factors, X=keep, basis=basis):
            opt = hook()
            if opt is not None:
                opt._on_output_grad(layer, factors, X, basis, grad)

        output.register_hook(on_grad)

    def _on_output_grad(self, layer: Layer, factors: bool, X, basis, grad: torch.Tensor) -> None:
        sampled = self.fisher == "sampled"
        if bool(self.sampling_fisher) != sampled:  # the ordinary backward in sampled mode, or the reverse
            return
        Y = output_rows(layer, grad.detach(), layer_stat_dtype(layer))
        terms = self.fisher_batch_n if sampled else self._loss_terms(layer, Y)
        stats = self._pending.setdefault(layer, Stats())
        if factors:
            rows = Y.reshape(-1, Y.shape[-1])
            stats.add("g", (rows.T @ rows).mul_(terms))
        if X is not None:
            stats.add("corr", self._correction(layer, X, Y, basis).mul_(terms))

    def _loss_terms(self, layer: Layer, Y: torch.Tensor) -> int:
        """L, the number of loss terms the loss averages, for output-gradient rows Y (examples, positions, d_out)
        of the ordinary backward: ``loss_average`` says which (a conv layer's are its examples)."""
        if self.loss_average == "batch" or layer.kind == "conv2d":
            return Y.shape[0]
        return Y.shape[0] * Y.shape[1]

    def _scale_basis(self, layer: Layer):
        """The eigenbasis a scale step measures in (EKFAC); None: this optimizer keeps no inputs for one."""
        return None

    # ----- which parameter is what ----------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self.plan()

    def plan(self) -> _Plan:
        """The K-FAC layers and the roles of the parameters, rebuilt when the param groups change."""
        params = [p for g in self.param_groups for p in g["params"]]
        key = tuple(map(id, params))
        if key == self._plan_key:
            return self._plan
        ours = {id(p) for p in params}
        holders: dict = {}
        for _, m in self.model.named_modules(remove_duplicate=False):
            for p in m.parameters(recurse=False):
                holders.setdefault(id(p), {})[id(m)] = m
        plan = _Plan()
        for name, m in self.model.named_modules():
            kind = self._layer_kind(m)
            w = getattr(m, "weight", None) if kind else None
            if not isinstance(w, torch.Tensor) or id(w) not in ours or len(holders.get(id(w), ())) > 1:
                continue  # not optimized here, or tied to another module: fallback
            b = getattr(m, "bias", None) if kind != "embedding" else None
            if b is not None and (id(b) not in ours or len(holders.get(id(b), ())) > 1):
                b = None
            layer = Layer(name=name, module=m, kind=kind, weight=w, bias=b)
            if self.max_dim is not None and max(layer.d_out, 0 if layer.diagonal_a else layer.d_in) >= self.max_dim:
                continue  # max_dim: a side this long would get a d × d factor (a vocabulary head): fallback
            plan.layers.append(layer)
            plan.by_module[id(m)] = layer
            plan.role[id(w)] = ("weight", layer)
            if b is not None:
                plan.role[id(b)] = ("bias", layer)
        self._plan, self._plan_key = plan, key
        return plan

    def fallback_parameters(self) -> list[torch.Tensor]:
        """The parameters stepped by the fallback (SGD with momentum on the raw gradient)."""
        role = self.plan().role
        return [p for g in self.param_groups for p in g["params"] if id(p) not in role]

    # ----- this step's statistics -------------------------------------------------------------------------------
    # the statistics the hooks collect, by name (the order of the distributed exchange)
    STATS: tuple[str, ...] = ("a", "g", "corr")

    def _stat_shape(self, layer: Layer, name: str) -> tuple:
        """The shape of statistic ``name`` of ``layer``."""
        if name == "a":
            return (layer.d_in,) if layer.diagonal_a else (layer.d_in, layer.d_in)
        return {"g": (layer.d_out, layer.d_out), "corr": (layer.d_out, layer.d_in)}[name]

    def _collect(self, step: int) -> dict:
        """This step's statistics per layer (means over hook calls; over ranks in a distributed run)."""
        ready = self._reduce_pending()
        if self._factor_step(step):
            self._check_caught(self.plan().layers, ready)
        return ready

    def _reduce_pending(self) -> dict:
        """The statistics caught since the last call, as a :class:`Ready` per layer (means over hook calls; over
        ranks in a distributed run); the hooks start afresh."""
        pending, self._pending = self._pending, {}
        layers = self.plan().layers
        ctx = self._dist[1] if self._dist is not None else None
        if ctx is not None:
            return self._all_reduce_stats(ctx, layers, pending)
        current = {id(layer) for layer in layers}
        return {layer: Ready(**{k: v.div_(s.calls[k]) for k, v in s.sums.items()})
                for layer, s in pending.items() if id(layer) in current}

    def _all_reduce_stats(self, ctx, layers, pending) -> dict:
        """Sum every rank's per-call sums and call counts, then divide: the mean over all ranks' calls. One
        float64 vector of counts and one flat buffer per statistic dtype."""
        names = self.STATS
        k = len(names)
        counts = torch.zeros(len(layers) * k, dtype=torch.float64)
        for i, layer in enumerate(layers):
            s = pending.get(layer)
            if s is not None:
                for j, name in enumerate(names):
                    counts[k * i + j] = s.calls.get(name, 0)
        counts = all_reduce_flat([counts], ctx.group)[0].cpu().tolist()
        shapes = [(i, j, self._stat_shape(layer, names[j])) for i, layer in enumerate(layers) for j in range(k)
                  if counts[k * i + j] > 0]
        by_dtype: dict = {}
        for i, j, shape in shapes:
            by_dtype.setdefault(layer_stat_dtype(layers[i]), []).append((i, j, shape))
        ready = {layer: Ready() for i, layer in enumerate(layers) if any(counts[k * i + j] for j in range(k))}
        items = [item for _, dtype_items in sorted(by_dtype.items(), key=lambda kv: str(kv[0]))
                 for item in dtype_items]
        parts = []
        for i, j, shape in items:
            s = pending.get(layers[i])
            value = s.sums.get(names[j]) if s is not None else None
            parts.append(value if value is not None
                         else torch.zeros(shape, dtype=layer_stat_dtype(layers[i]), device=layers[i].weight.device))
        for (i, j, shape), summed in zip(items, all_reduce_flat(parts, ctx.group)):
            setattr(ready[layers[i]], names[j], summed.view(shape).to(layers[i].weight.device) / counts[k * i + j])
        return ready

    def _check_caught(self, layers, ready) -> None:
        """Warn once when a factor step caught nothing for a layer, or only half of its statistics."""
        missing = [layer.name or type(layer.module).__name__ for layer in layers
                   if layer.weight.grad is not None and (layer not in ready or ready[layer].a is None)]
        half = [layer.name for layer in layers if layer in ready and ready[layer].a is not None
                and ready[layer].g is None]
        if half and getattr(self, "fisher", None) == "sampled" and "sampled" not in self._warned:
            self._warned.add("sampled")
            warnings.warn(f"{type(self).__name__}(fisher='sampled'): no sampled backward reached {len(half)} "
                          f"layer(s) (first: {half[0]!r}) at a factor step, so their factors were not updated; "
                          "call opt.sample_fisher(logits) after the forward and before loss.backward()",
                          RuntimeWarning, stacklevel=8)
        if missing and "missing" not in self._warned:
            self._warned.add("missing")
            warnings.warn(f"{type(self).__name__}: the hooks caught no activations for {len(missing)} layer(s) "
                          f"with a gradient (first: {missing[0]!r}) at a factor step (hooks removed, the forward "
                          "run under no_grad, a gradient set by hand, or a module whose forward bypasses its own "
                          "call); such a layer keeps its current factors, and one that never caught any is "
                          "stepped with its raw gradient. This warning is shown once.", RuntimeWarning,
                          stacklevel=8)

    # ----- state -----------------------------------------------------------------------------------------------
    # a layer's integer counters, kept in its weight's state beside the tensors of _layer_shapes
    LAYER_COUNTERS: tuple[str, ...] = ()
    # the state keys the ``state_dtype`` option stores in bfloat16 (an optimizer that has the option names them)
    STATE_DTYPE_KEYS: tuple[str, ...] = ()

    def _start_layer(self, state: dict, layer: Layer) -> None:
        """Set a new layer state's tensors (created as zeros) to their starting values."""

    def _init_state(self, p: torch.Tensor, group: dict | None = None) -> dict:
        """``step`` and ``momentum`` for every parameter; for a layer's weight also the tensors of
        :meth:`_layer_shapes` and the counters ``LAYER_COUNTERS`` at 0, started by :meth:`_start_layer`. The keys
        of ``STATE_DTYPE_KEYS`` take the dtype of ``group``'s ``state_dtype`` option (the weight's group)."""
        dtype = self._key_dtypes(p, group)
        state = {"step": 0, "momentum": torch.zeros(p.shape, dtype=dtype("momentum"), device=p.device)}
        kind = self.plan().role.get(id(p))
        if kind is not None and kind[0] == "weight":
            for key, shape in self._layer_shapes(kind[1]).items():
                state[key] = torch.zeros(shape, dtype=dtype(key), device=p.device)
            state.update(dict.fromkeys(self.LAYER_COUNTERS, 0))
            self._start_layer(state, kind[1])
        return state

    def _key_dtypes(self, p: torch.Tensor, group: dict | None):
        """key -> the dtype ``p``'s state tensor of that key is stored in."""
        full = state_dtype(p)
        low = stored_dtype(p, group) if group is not None else full
        return lambda key: low if key in self.STATE_DTYPE_KEYS else full

    def stored_dtypes(self, p: torch.Tensor, group: dict) -> dict:
        dtype = self._key_dtypes(p, group)
        return {k: dtype(k) for k, shape in self.expected_state(p, group).items()
                if shape is not None and dtype(k) != state_dtype(p)}

    def expected_state(self, p: torch.Tensor, group: dict) -> dict:
        shapes = {"step": None, "momentum": tuple(p.shape)}
        kind = self.plan().role.get(id(p))
        if kind is not None and kind[0] == "weight":
            shapes.update(self._layer_shapes(kind[1]))
            shapes.update(dict.fromkeys(self.LAYER_COUNTERS))
        return shapes

    def _layer_state(self, layer: Layer, view, group: dict | None = None) -> dict:
        """The state of ``layer`` (kept under its weight, or its full stand-in ``view(weight)``), created at first
        (``group``: the weight's, for the ``state_dtype`` option)."""
        w = view(layer.weight)
        if not self.state.get(w):
            self.state[w] = self._init_state(layer.weight, group)
        return self.state[w]

    # ----- distribution and copies -----------------------------------------------------------------------------
    def stack_invariant(self, p: torch.Tensor, group: dict) -> bool:
        return True  # every layer is computed on its own (no stacks)

    def owner_unit(self, p: torch.Tensor, group: dict, gi: int, position: int):
        kind = self.plan().role.get(id(p))
        if kind is not None:  # a layer's weight and bias share one preconditioned matrix: one owner for both
            return ("layer", id(kind[1]))
        return super().owner_unit(p, group, gi, position)

    def reset_transient(self) -> None:
        super().reset_transient()
        self._reset_layers()
        self.plan()
        self.register_hooks()

    def _layer_params(self):
        for layer in self.plan().layers:
            yield layer.weight
            if layer.bias is not None:
                yield layer.bias

