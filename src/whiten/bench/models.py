"""The benchmark's model family: one pre-LayerNorm Transformer used three ways.

Following the SPlus paper, the same block (no biases, GELU MLP x4, multi-head
attention) serves a character GPT, a ViT classifier and a class-conditional DiT
trained with flow matching. Keeping one family means the optimizers see the
same kinds of matrices on every task.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "Block",
    "GPT",
    "ViT",
    "DiT",
    "flow_matching_loss",
    "sample",
    "class_dropout",
    "PROFILES",
    "IMAGE_TOKENS",
    "build_model",
    "choose_patch",
]

INIT_STD = 0.02


def _init_linear(module: nn.Module, std: float = INIT_STD) -> None:
    nn.init.normal_(module.weight, mean=0.0, std=std)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)


class Block(nn.Module):
    """Pre-LayerNorm Transformer block: x + Attn(LN(x)), then x + MLP(LN(x)).

    With ``adaptive=True`` (DiT) the LayerNorms have no affine parameters and a
    zero-initialised ``ada`` projection of the conditioning vector supplies
    shift, scale and gate for both branches (adaLN-Zero), so the block starts as
    the identity.
    """

    def __init__(self, width: int, heads: int, causal: bool, adaptive: bool = False):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.causal = causal
        self.adaptive = adaptive
        if adaptive:
            self.ln1 = nn.LayerNorm(width, elementwise_affine=False)
            self.ln2 = nn.LayerNorm(width, elementwise_affine=False)
            self.ada = nn.Linear(width, 6 * width, bias=False)
        else:
            self.ln1 = nn.LayerNorm(width, bias=False)
            self.ln2 = nn.LayerNorm(width, bias=False)
        self.q = nn.Linear(width, width, bias=False)
        self.k = nn.Linear(width, width, bias=False)
        self.v = nn.Linear(width, width, bias=False)
        self.o = nn.Linear(width, width, bias=False)
        self.fc1 = nn.Linear(width, 4 * width, bias=False)
        self.fc2 = nn.Linear(4 * width, width, bias=False)

    def attention(self, h: torch.Tensor) -> torch.Tensor:
        b, t, w = h.shape
        # -1 heads: under tensor parallel (whiten-bench --parallel tp) q, k, v give this rank's heads only
        split = lambda z: z.view(b, t, -1, w // self.heads).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)),
                                             is_causal=self.causal)
        return self.o(out.transpose(1, 2).reshape(b, t, -1))

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(h)))

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        if not self.adaptive:
            x = x + self.attention(self.ln1(x))
            return x + self.mlp(self.ln2(x))
        # c: (B, width) conditioning; one modulation per sample, broadcast over tokens.
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(F.silu(c)).unsqueeze(1).chunk(6, dim=-1)
        x = x + gate1 * self.attention(self.ln1(x) * (1 + scale1) + shift1)
        return x + gate2 * self.mlp(self.ln2(x) * (1 + scale2) + shift2)


def _init_blocks(blocks: nn.ModuleList, depth: int) -> None:
    # GPT-2 style: residual-branch output projections are shrunk by 1/sqrt(2*depth)
    # so the residual stream's variance does not grow with depth at init.
    out_std = INIT_STD / math.sqrt(2 * depth)
    for block in blocks:
        for name in ("q", "k", "v", "fc1"):
            _init_linear(getattr(block, name))
        _init_linear(block.o, out_std)
        _init_linear(block.fc2, out_std)


class GPT(nn.Module):
    """Causal character/token language model. forward(idx (B,T) int64) -> logits (B,T,vocab)."""

    def __init__(self, vocab_size: int, ctx: int, width: int, depth: int, heads: int):
        super().__init__()
        self.vocab_size, self.ctx = vocab_size, ctx
        self.tok_emb = nn.Embedding(vocab_size, width)
        self.pos_emb = nn.Parameter(torch.zeros(ctx, width))
        self.blocks = nn.ModuleList(Block(width, heads, causal=True) for _ in range(depth))
        self.ln_f = nn.LayerNorm(width, bias=False)
        self.head = nn.Linear(width, vocab_size, bias=False)
        nn.init.normal_(self.tok_emb.weight, std=INIT_STD)
        nn.init.normal_(self.pos_emb, std=INIT_STD)
        _init_blocks(self.blocks, depth)
        _init_linear(self.head)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.ctx:
            raise ValueError(f"sequence length {t} exceeds the model's context {self.ctx}")
        x = self.tok_emb(idx) + self.pos_emb[:t]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def _size(image_size) -> tuple[int, int]:
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if h < 1 or w < 1:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    return int(h), int(w)


def _pad(images: torch.Tensor, patch: int) -> torch.Tensor:
    # Zero-pad the bottom and right edges up to a multiple of the patch (nothing when it already divides).
    pad_h, pad_w = -images.shape[-2] % patch, -images.shape[-1] % patch
    return F.pad(images, (0, pad_w, 0, pad_h)) if pad_h or pad_w else images


class ViT(nn.Module):
    """Vision Transformer classifier. forward(images (B,C,H,W) float) -> logits (B,classes).

    ``image_size``: an int (square) or (height, width). A patch that does not divide the size gets the image
    zero-padded at the bottom and right to the next multiple."""

    def __init__(self, image_size: int | tuple[int, int] = 28, patch: int = 4, channels: int = 1,
                 classes: int = 10, width: int = 128, depth: int = 4, heads: int = 4):
        super().__init__()
        h, w = _size(image_size)
        self.image_size, self.patch, self.channels = (h, w) if h != w else h, patch, channels
        n_patches = math.ceil(h / patch) * math.ceil(w / patch)
        self.patch_embed = nn.Conv2d(channels, width, patch, stride=patch, bias=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_patches + 1, width))
        self.blocks = nn.ModuleList(Block(width, heads, causal=False) for _ in range(depth))
        self.ln_f = nn.LayerNorm(width, bias=False)
        self.head = nn.Linear(width, classes, bias=False)
        nn.init.normal_(self.patch_embed.weight, std=INIT_STD)
        nn.init.normal_(self.cls_token, std=INIT_STD)
        nn.init.normal_(self.pos_embed, std=INIT_STD)
        _init_blocks(self.blocks, depth)
        _init_linear(self.head)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(_pad(images, self.patch)).flatten(2).transpose(1, 2)  # (B, N, width), row-major patches
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x[:, 0]))


def _timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    # Flow-matching time lives in [0, 1]; scaling by 1000 puts it on the range the
    # usual sinusoidal frequencies (built for diffusion steps 0..1000) resolve well.
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _sincos_2d(width: int, rows: int, cols: int) -> torch.Tensor:
    # Fixed 2-D sin-cos features, used as the starting value of DiT's learnable
    # position embedding: the zero-initialised DiT has nothing else that tells
    # patches apart at the start of training.
    if width % 4:
        return torch.randn(rows * cols, width) * INIT_STD
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    gy, gx = torch.meshgrid(torch.arange(rows, dtype=torch.float32), torch.arange(cols, dtype=torch.float32),
                            indexing="ij")
    feats = []
    for g in (gy.reshape(-1), gx.reshape(-1)):
        a = g[:, None] * omega[None, :]
        feats += [torch.sin(a), torch.cos(a)]
    return torch.cat(feats, dim=1)


class DiT(nn.Module):
    """Class-conditional diffusion Transformer with adaLN-Zero, predicting flow-matching velocity.

    forward(x_t (B,C,H,W), t (B,) in [0,1], y (B,) int64 with ``classes`` as the
    null class) -> velocity (B,C,H,W). At initialisation the output is exactly zero.
    ``image_size``: an int (square) or (height, width); a patch that does not divide it gets the input zero-padded
    at the bottom and right and the output cropped back.
    """

    def __init__(self, image_size: int | tuple[int, int] = 28, patch: int = 4, channels: int = 1,
                 classes: int = 10, width: int = 128, depth: int = 4, heads: int = 4):
        super().__init__()
        h, w = _size(image_size)
        self.image_size, self.patch, self.channels, self.classes = (h, w) if h != w else h, patch, channels, classes
        self.height, self.width = h, w
        self.null_class = classes
        self.rows, self.cols = math.ceil(h / patch), math.ceil(w / patch)
        self.patch_embed = nn.Conv2d(channels, width, patch, stride=patch, bias=False)
        self.pos_embed = nn.Parameter(_sincos_2d(width, self.rows, self.cols).unsqueeze(0))
        self.t_embedder = nn.Sequential(nn.Linear(256, width, bias=False), nn.SiLU(),
                                        nn.Linear(width, width, bias=False))
        self.y_embedder = nn.Embedding(classes + 1, width)
        self.blocks = nn.ModuleList(Block(width, heads, causal=False, adaptive=True) for _ in range(depth))
        self.ln_f = nn.LayerNorm(width, elementwise_affine=False)
        self.final_ada = nn.Linear(width, 2 * width, bias=False)
        self.head = nn.Linear(width, patch * patch * channels, bias=False)

        nn.init.normal_(self.patch_embed.weight, std=INIT_STD)
        for layer in (self.t_embedder[0], self.t_embedder[2]):
            _init_linear(layer)
        nn.init.normal_(self.y_embedder.weight, std=INIT_STD)
        _init_blocks(self.blocks, depth)
        # adaLN-Zero: every modulation and the output head start at zero, so each
        # block is the identity and the model predicts zero velocity at step 0.
        for block in self.blocks:
            nn.init.zeros_(block.ada.weight)
        nn.init.zeros_(self.final_ada.weight)
        nn.init.zeros_(self.head.weight)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) patch predictions -> (B, C, H, W), inverse of the row-major patch order (the padding of a
        size the patch does not divide cropped off)."""
        b, r, q, p, c = x.shape[0], self.rows, self.cols, self.patch, self.channels
        x = x.reshape(b, r, q, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, r * p, q * p)[:, :, :self.height, :self.width]

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(_pad(x_t, self.patch)).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.t_embedder(_timestep_features(t).to(x.dtype)) + self.y_embedder(y)
        for block in self.blocks:
            x = block(x, c)
        shift, scale = self.final_ada(F.silu(c)).unsqueeze(1).chunk(2, dim=-1)
        x = self.head(self.ln_f(x) * (1 + scale) + shift)
        return self.unpatchify(x)


# ---------------------------------------------------------------------------
# Flow matching
# ---------------------------------------------------------------------------

def flow_matching_loss(model: nn.Module, x1: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
                       noise: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the model's velocity and the straight-path target.

    x_t = (1 - t) * noise + t * x1 and the target is v = x1 - noise, with t (B,)
    in [0, 1] (t = 0 is pure noise, t = 1 is data).
    """
    tb = t.view(-1, *([1] * (x1.dim() - 1))).to(x1.dtype)
    x_t = (1 - tb) * noise + tb * x1
    return F.mse_loss(model(x_t, t, y), x1 - noise)


def class_dropout(y: torch.Tensor, p: float, null_class: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each label by ``null_class`` with probability ``p`` (for classifier-free guidance)."""
    if p <= 0:
        return y
    device = generator.device if generator is not None else y.device
    drop = torch.rand(y.shape, generator=generator, device=device).to(y.device) < p
    return torch.where(drop, torch.full_like(y, null_class), y)


@torch.no_grad()
def sample(model: DiT, y: torch.Tensor, steps: int, generator: torch.Generator | None = None,
           cfg_scale: float = 1.0) -> torch.Tensor:
    """Generate images for labels ``y`` by Euler-integrating the velocity from noise (t=0) to data (t=1).

    With ``cfg_scale != 1`` classifier-free guidance mixes the conditional and the
    null-class velocities: v = v_null + cfg_scale * (v_cond - v_null).
    """
    param = next(model.parameters())
    shape = (y.shape[0], model.channels, *_size(model.image_size))
    gen_device = generator.device if generator is not None else param.device
    x = torch.randn(shape, generator=generator, device=gen_device).to(param.device, param.dtype)
    y = y.to(param.device)
    null = torch.full_like(y, model.null_class)
    dt = 1.0 / steps
    for i in range(steps):
        t = torch.full((y.shape[0],), i * dt, device=param.device)
        if cfg_scale == 1.0:
            v = model(x, t, y)
        else:
            both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
            v_cond, v_null = both.chunk(2)
            v = v_null + cfg_scale * (v_cond - v_null)
        x = x + dt * v
    return x


# ---------------------------------------------------------------------------
# Size profiles
# ---------------------------------------------------------------------------

# tiny: unit tests and smoke runs. cpu: the 2-core developer machine (~0.1-0.2 s
# per training step). gpu: close to the SPlus paper (width 768, depth 12, 12
# heads, ~256 tokens); patch 2 on 28x28 images gives 196 tokens.
PROFILES: dict[str, dict[str, dict[str, int]]] = {
    "tiny": {
        "lm": dict(width=32, depth=1, heads=2, ctx=32, batch_size=8),
        "vit": dict(width=32, depth=1, heads=2, patch=7, batch_size=8),
        "dit": dict(width=32, depth=1, heads=2, patch=7, batch_size=8),
    },
    "cpu": {
        "lm": dict(width=128, depth=4, heads=4, ctx=128, batch_size=32),
        "vit": dict(width=128, depth=4, heads=4, patch=4, batch_size=64),
        "dit": dict(width=128, depth=4, heads=4, patch=4, batch_size=64),
    },
    "gpu": {
        "lm": dict(width=768, depth=12, heads=12, ctx=256, batch_size=256),
        "vit": dict(width=768, depth=12, heads=12, patch=2, batch_size=256),
        "dit": dict(width=768, depth=12, heads=12, patch=2, batch_size=256),
    },
}

TASKS = ("lm", "vit", "dit")

# Image tokens per profile: what the profile's patch gives on 28x28 Fashion-MNIST (tiny 7 -> 16, cpu 4 -> 49,
# gpu 2 -> 196). Images of another size get the patch whose token count comes closest (choose_patch).
IMAGE_TOKENS = {"tiny": 16, "cpu": 49, "gpu": 196}


def choose_patch(height: int, width: int, tokens: int) -> int:
    """The patch side for a ``height`` x ``width`` image that gives about ``tokens`` patches: the divisor of both
    sides whose token count is closest (in ratio) to ``tokens``, if one is within a factor 2; otherwise (a prime
    side, say) the closest patch of any size, the image then zero-padded to a multiple of it. Ties go to the larger
    patch (fewer tokens, cheaper)."""
    if min(height, width, tokens) < 1:
        raise ValueError(f"need positive sizes and tokens, got {height}x{width}, {tokens} tokens")

    def score(p):
        return abs(math.log(math.ceil(height / p) * math.ceil(width / p) / tokens)), -p

    candidates = range(1, max(height, width) + 1)
    exact = [p for p in candidates if height % p == 0 and width % p == 0]
    best = min(exact, key=score)
    if score(best)[0] <= math.log(2):
        return best
    return min(candidates, key=score)


def build_model(task: str, profile: str | dict = "cpu", vocab_size: int | None = None,
                image_shape: tuple[int, int, int] = (1, 28, 28), classes: int = 10) -> nn.Module:
    """Build the model for ``task`` ("lm", "vit" or "dit") at a size profile.

    ``profile`` is a name in :data:`PROFILES` or a dict with the same keys.
    ``vocab_size`` is required for "lm"; ``image_shape`` (channels, height, width) and ``classes`` are the image
    tasks' data (default: Fashion-MNIST's). The batch size in the profile is for the training loop and does not
    affect the model.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if isinstance(profile, str):
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}; expected one of {tuple(PROFILES)}")
        cfg = PROFILES[profile][task]
    else:
        cfg = profile
    common = dict(width=cfg["width"], depth=cfg["depth"], heads=cfg["heads"])
    if task == "lm":
        if vocab_size is None:
            raise ValueError("build_model('lm', ...) needs vocab_size")
        return GPT(vocab_size=vocab_size, ctx=cfg["ctx"], **common)
    channels, height, width = image_shape
    image = dict(image_size=(height, width), channels=channels, classes=classes, patch=cfg["patch"])
    if task == "vit":
        return ViT(**image, **common)
    return DiT(**image, **common)
