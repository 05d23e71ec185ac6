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
