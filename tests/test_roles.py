"""Role detection and param_groups()."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import whiten
from whiten.bench.models import build_model


def roles_of(model, **kw):
    return {e.name: e.role for e in whiten.plan_roles(model, **kw).entries}


def assert_partition(model, groups):
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen)), "a parameter is in two groups"
    assert set(seen) == {id(p) for p in model.parameters() if p.requires_grad}


def test_gpt_like_model():
    model = build_model("lm", "tiny", vocab_size=50)
    roles = roles_of(model)
    assert roles["tok_emb.weight"] == "embedding"
    assert roles["pos_emb"] == "embedding"
    assert roles["head.weight"] == "head"
    assert roles["ln_f.weight"] == "vector" and roles["blocks.0.ln1.weight"] == "vector"
    for name in ("q", "k", "v", "o", "fc1", "fc2"):
        assert roles[f"blocks.0.{name}.weight"] == "hidden"
    groups = whiten.param_groups(model, lr=0.1)
    assert_partition(model, groups)
    assert [g["role"] for g in groups] == ["hidden", "embedding", "head", "vector"]
    assert all(g["lr"] == 0.1 for g in groups)
    by_role = {g["role"]: g for g in groups}
    assert by_role["vector"]["weight_decay"] == 0.0 and by_role["embedding"]["weight_decay"] == 0.0
    assert "weight_decay" not in by_role["hidden"]


def test_vit_like_model_with_conv_patch_embedding():
    roles = roles_of(build_model("vit", "tiny"))
    assert roles["patch_embed.weight"] == "conv"
    assert roles["cls_token"] == "embedding" and roles["pos_embed"] == "embedding"
    assert roles["head.weight"] == "head"
    assert roles["blocks.0.fc1.weight"] == "hidden"


def test_dit_timestep_and_class_embeddings():
    roles = roles_of(build_model("dit", "tiny"))
    assert roles["t_embedder.0.weight"] == "embedding" and roles["t_embedder.2.weight"] == "embedding"
    assert roles["y_embedder.weight"] == "embedding"
    assert roles["blocks.0.ada.weight"] == "hidden"
    assert roles["head.weight"] == "head"


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(30, 8)
        self.mlp = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
        self.lm_head = nn.Linear(8, 30, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        return self.lm_head(self.mlp(self.wte(idx)))


def test_tied_head():
    model = TiedLM()
    plan = whiten.plan_roles(model)
    assert plan.role_of("wte.weight") == "head"
    assert "tied" in plan.entries[0].reason
    assert plan.role_of("mlp.0.weight") == "hidden" and plan.role_of("mlp.2.weight") == "hidden"
    groups = whiten.param_groups(model)
    assert_partition(model, groups)
    opt = whiten.SPlus(groups)
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    opt.step()


def test_last_linear_of_a_plain_mlp_is_the_head():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    assert roles_of(model) == {"0.weight": "hidden", "0.bias": "vector", "2.weight": "head", "2.bias": "vector"}


def test_overrides_and_their_errors():
    model = build_model("lm", "tiny", vocab_size=50)
    roles = roles_of(model, overrides={"blocks.*.fc2.weight": "head", "pos_emb": "vector"})
    assert roles["blocks.0.fc2.weight"] == "head" and roles["pos_emb"] == "vector"
    with pytest.raises(ValueError, match="role must be one of"):
        whiten.plan_roles(model, overrides={"head.weight": "output"})
    with pytest.raises(ValueError, match="matched no trainable parameter"):
        whiten.plan_roles(model, overrides={"nope.*": "hidden"})
    with pytest.raises(ValueError, match="role_options key"):
        whiten.param_groups(model, role_options={"bias": {"lr": 1}})
    with pytest.raises(TypeError, match="nn.Module"):
        whiten.param_groups([nn.Parameter(torch.zeros(2))])


def test_role_options_and_decay_switch():
    model = build_model("lm", "tiny", vocab_size=50)
    groups = whiten.param_groups(model, weight_decay=0.1, role_options={"embedding": {"lr": 1e-3}},
                                 decay_embeddings_and_vectors=True)
    by_role = {g["role"]: g for g in groups}
    assert by_role["embedding"]["lr"] == 1e-3 and by_role["embedding"]["weight_decay"] == 0.1
    assert by_role["vector"]["weight_decay"] == 0.1


def test_frozen_parameters_are_left_out_and_listed():
    model = build_model("lm", "tiny", vocab_size=50)
    model.tok_emb.weight.requires_grad_(False)
    groups, plan = whiten.param_groups(model, return_plan=True)
    assert_partition(model, groups)
    assert plan.frozen == ["tok_emb.weight"]
    assert "frozen" in str(plan)


def test_plan_prints_a_readable_table(capsys):
    whiten.param_groups(build_model("vit", "tiny"), verbose=True)
    out = capsys.readouterr().out
    assert "patch_embed.weight" in out and "weight of Conv2d" in out and "32x1x7x7" in out
    assert out.splitlines()[0].split()[:4] == ["parameter", "shape", "role", "why"]


def test_groups_work_with_torch_adamw():
    model = build_model("lm", "tiny", vocab_size=50)
    opt = torch.optim.AdamW(whiten.param_groups(model), lr=1e-3)
    model(torch.randint(0, 50, (2, 8))).sum().backward()
    opt.step()


# ----- the models people use, built from small configs ------------------------------------------------------------

def _hidden_matrices_are_hidden(roles, names):
    for n in names:
        assert roles[n] == "hidden", n


def test_hf_gpt2_conv1d_weights_are_hidden_and_transposed():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2))
    groups, plan = whiten.param_groups(model, return_plan=True)
    roles = {e.name: e.role for e in plan.entries}
    assert roles["transformer.wte.weight"] == "head"  # tied to lm_head
    assert roles["transformer.wpe.weight"] == "embedding"
    _hidden_matrices_are_hidden(roles, [f"transformer.h.{i}.{m}.weight" for i in range(2)
                                        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")])
    assert roles["transformer.h.0.attn.c_attn.bias"] == "vector" and roles["transformer.ln_f.weight"] == "vector"
    assert_partition(model, groups)
    transposed = [g for g in groups if g.get("transposed")]
    assert len(transposed) == 1 and transposed[0]["role"] == "hidden"
    assert {id(p) for p in transposed[0]["params"]} == {
        id(e.param) for e in plan.entries if e.reason == "weight of Conv1D, stored (in, out)"}
    # SPlus's shape scale uses the real (out, in): c_fc is stored (16, 64) and maps 16 -> 64
    from whiten.optim.splus import _layout
    c_fc = model.transformer.h[0].mlp.c_fc.weight
    opt = whiten.SPlus(groups)
    lay = _layout(c_fc, next(g for g in opt.param_groups if any(p is c_fc for p in g["params"])))
    assert lay.scale == 2.0 / (64 + 16) and lay.left and lay.right


def test_muon_scales_conv1d_weights_by_their_real_shape():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    c_fc = model.transformer.h[0].mlp.c_fc.weight  # stored (16, 64): out = 64, in = 16
    linear = nn.Linear(16, 64, bias=False)  # the same map stored (out, in)
    with torch.no_grad():
        linear.weight.copy_(c_fc.T)
    grad = torch.randn(16, 64)
    c_fc.grad, linear.weight.grad = grad.clone(), grad.T.clone()
    opt_a = whiten.Muon([g for g in whiten.param_groups(model) if g.get("transposed")], lr=0.02)
    opt_b = whiten.Muon([{"params": [linear.weight], "role": "hidden"}], lr=0.02)
    opt_a.step()
    opt_b.step()
    torch.testing.assert_close(c_fc.detach().T, linear.weight.detach(), rtol=1e-5, atol=1e-6)


def test_hf_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg)
    roles = roles_of(model)
    assert roles["model.embed_tokens.weight"] == "embedding" and roles["lm_head.weight"] == "head"
    assert roles["model.norm.weight"] == "vector" and roles["model.layers.0.input_layernorm.weight"] == "vector"
    _hidden_matrices_are_hidden(roles, [f"model.layers.{i}.{m}.weight" for i in range(2) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")])
    assert_partition(model, whiten.param_groups(model))


def test_hf_bert_masked_lm():
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32)
    model = BertForMaskedLM(cfg)
    roles = roles_of(model)
    for e in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        assert roles[f"bert.embeddings.{e}.weight"] in ("embedding", "head"), e
    assert roles["bert.embeddings.word_embeddings.weight"] == "head"  # tied to the MLM decoder
    assert roles["bert.embeddings.LayerNorm.weight"] == "vector"
    _hidden_matrices_are_hidden(roles, [f"bert.encoder.layer.0.{m}.weight" for m in (
        "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
        "intermediate.dense", "output.dense")])
    # the MLM head's transform is a hidden matrix, not an embedding ("cls" names the module, not a token)
    assert roles["cls.predictions.transform.dense.weight"] == "hidden"
    assert roles["cls.predictions.bias"] == "vector"
    assert_partition(model, whiten.param_groups(model))


def test_hf_vit_classifier():
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1,
                    num_attention_heads=2, intermediate_size=32, num_labels=3)
    model = ViTForImageClassification(cfg)
    roles = roles_of(model)
    assert roles["vit.embeddings.cls_token"] == "embedding"
    assert roles["vit.embeddings.position_embeddings"] == "embedding"
    assert roles["vit.embeddings.patch_embeddings.projection.weight"] == "conv"
    assert roles["classifier.weight"] == "head"
    # every matrix of the encoder blocks (their module names changed across transformers versions)
    block_matrices = [e.name for e in whiten.plan_roles(model).entries
                      if len(e.shape) == 2 and any(part.isdigit() for part in e.name.split("."))]
    assert len(block_matrices) == 6
    _hidden_matrices_are_hidden(roles, block_matrices)
    assert_partition(model, whiten.param_groups(model))


class _TimmAttention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)


class _TimmMlp(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)


class _TimmBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = nn.LayerNorm(d), _TimmAttention(d), nn.LayerNorm(d), _TimmMlp(d)


class _TimmPatchEmbed(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.proj = nn.Conv2d(3, d, 4, 4)


class TimmStyleViT(nn.Module):
    """The parameter layout of timm's VisionTransformer (names and module types)."""

    def __init__(self, d=16, depth=2, classes=5):
        super().__init__()
        self.patch_embed = _TimmPatchEmbed(d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, d))
        self.blocks = nn.Sequential(*[_TimmBlock(d) for _ in range(depth)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)


class _TimmBasicBlock(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)
        self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))


class TimmStyleResNet(nn.Module):
    """The parameter layout of timm's / torchvision's ResNet."""

    def __init__(self, classes=5):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 7, 2, 3, bias=False), nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(_TimmBasicBlock(8, 8), _TimmBasicBlock(8, 8))
        self.layer2 = nn.Sequential(_TimmBasicBlock(8, 16))
        self.fc = nn.Linear(16, classes)


def test_timm_style_vit():
    roles = roles_of(TimmStyleViT())
    assert roles["patch_embed.proj.weight"] == "conv" and roles["patch_embed.proj.bias"] == "vector"
    assert roles["cls_token"] == "embedding" and roles["pos_embed"] == "embedding"
    assert roles["head.weight"] == "head" and roles["norm.weight"] == "vector"
    _hidden_matrices_are_hidden(roles, [f"blocks.{i}.{m}.weight" for i in range(2)
                                        for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")])


def test_timm_style_resnet():
    model = TimmStyleResNet()
    roles = roles_of(model)
    assert roles["fc.weight"] == "head" and roles["fc.bias"] == "vector"
    assert roles["conv1.weight"] == "conv" and roles["layer2.0.downsample.0.weight"] == "conv"
    assert all(r == "vector" for n, r in roles.items() if ".bn" in n or n.startswith("bn1")
               or n.endswith("downsample.1.weight") or n.endswith("downsample.1.bias"))
    assert_partition(model, whiten.param_groups(model))


def test_nanogpt_gpt_with_tied_head():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import nanogpt_style as mod
    model = mod.GPT(mod.GPTConfig(vocab_size=30, block_size=8, n_layer=2, n_head=2, n_embd=16))
    roles = roles_of(model)
    # named_parameters lists the tied weight once, under its first name
    assert roles["transformer.wte.weight"] == "head"
    assert "lm_head.weight" not in roles
    assert roles["transformer.wpe.weight"] == "embedding"
    _hidden_matrices_are_hidden(roles, [f"transformer.h.{i}.{m}.weight" for i in range(2)
                                        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")])
    assert roles["transformer.h.0.attn.c_attn.bias"] == "vector" and roles["transformer.ln_f.bias"] == "vector"
    assert_partition(model, whiten.param_groups(model))
