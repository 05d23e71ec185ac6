"""Schedule-Free AdamW: parity with the authors' package (schedulefree), eval()/train(), checkpoints in either
mode."""

from __future__ import annotations

import copy
import pytest
import torch

import schedulefree  # the authors' package, from the test extra
import whiten

SHAPES = [(6, 4), (5,), (3, 2, 2)]


def _grads(steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES] for _ in range(steps)]


def _init(seed=0):
    torch.manual_seed(seed)
    return [torch.randn(s, dtype=torch.float64) for s in SHAPES]


def test_parity_with_schedulefree_package():
    init = _init()
    ours = [w.clone().requires_grad_() for w in init]
    theirs = [w.clone().requires_grad_() for w in init]
    # roles "hidden": the package decays every parameter
    opt = whiten.ScheduleFreeAdamW([{"params": ours, "role": "hidden"}], lr=0.02, weight_decay=0.1,
                                   warmup_steps=4, r=0.5, betas=(0.9, 0.99))
    peer = schedulefree.AdamWScheduleFree(theirs, lr=0.02, weight_decay=0.1, warmup_steps=4, r=0.5,
                                          betas=(0.9, 0.99))
    peer.train()
    for t, gs in enumerate(_grads(12)):
        for a, b, g in zip(ours, theirs, gs):
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        peer.step()
        if t in (3, 9):  # the evaluation point agrees too
            opt.eval()
            peer.eval()
            for a, b in zip(ours, theirs):
                assert torch.allclose(a, b, atol=1e-14, rtol=0)
            opt.train()
            peer.train()
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-13, rtol=0)
    assert opt.param_groups[0]["k"] == 12 and opt.param_groups[0]["scheduled_lr"] == 0.02


def test_eval_train_round_trip_is_bit_exact_and_grad_untouched():
    params = [w.requires_grad_() for w in _init()]
    opt = whiten.ScheduleFreeAdamW(params, lr=0.05)
    grads = _grads(3)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    for p, g in zip(params, grads[-1]):
        assert torch.equal(p.grad, g)
    live = [p.detach().clone() for p in params]
    opt.eval()
    assert not torch.equal(params[0], live[0])
    with pytest.raises(RuntimeError, match="eval mode"):
        opt.step()
    opt.train()
    for p, w in zip(params, live):
        assert torch.equal(p, w)


@pytest.mark.parametrize("save_in_eval", [False, True])
def test_checkpoint_in_either_mode_resumes(save_in_eval):
    grads = _grads(10)
    params = [w.requires_grad_() for w in _init()]
    opt = whiten.ScheduleFreeAdamW(params, lr=0.05, weight_decay=0.1)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    expected = [p.detach().clone() for p in params]

    params2 = [w.requires_grad_() for w in _init()]
    opt2 = whiten.ScheduleFreeAdamW(params2, lr=0.05, weight_decay=0.1)
    for gs in grads[:5]:
        for p, g in zip(params2, gs):
            p.grad = g.clone()
        opt2.step()
    if save_in_eval:
        opt2.eval()
    model_sd = [p.detach().clone() for p in params2]
    opt_sd = opt2.state_dict()

    params3 = [w.requires_grad_() for w in _init(seed=9)]
    with torch.no_grad():
        for p, w in zip(params3, model_sd):
            p.copy_(w)
    opt3 = whiten.ScheduleFreeAdamW(params3, lr=0.05, weight_decay=0.1)
    opt3.load_state_dict(opt_sd)
    assert opt3.in_eval_mode == save_in_eval
    opt3.train()
    for gs in grads[5:]:
        for p, g in zip(params3, gs):
            p.grad = g.clone()
        opt3.step()
    for p, w in zip(params3, expected):
        tol = 1e-14 if save_in_eval else 0.0  # y recomputed from x and z in eval mode: exact up to rounding
        assert torch.allclose(p, w, atol=tol, rtol=0)


def test_no_decay_for_vectors_and_embeddings():
    w = torch.ones(4, 4, dtype=torch.float64)
    a, b = w.clone().requires_grad_(), w.clone().requires_grad_()
    opt = whiten.ScheduleFreeAdamW([{"params": [a], "role": "embedding"}, {"params": [b], "role": "hidden"}],
                                   lr=0.1, weight_decay=0.5)
    a.grad, b.grad = torch.ones_like(w), torch.ones_like(w)
    opt.step()
    assert not torch.equal(a, b)
    assert torch.allclose(a, w - 0.1, atol=1e-12)  # no decay: plain normalised step of lr (c = 1 at step 0)


@pytest.mark.parametrize("kwargs, name", [
    (dict(lr=-1.0), "lr"), (dict(betas=(0.0, 0.9)), "betas"), (dict(betas=(0.9, 1.0)), "betas"),
    (dict(warmup_steps=-1), "warmup_steps"), (dict(weight_lr_power=-1.0), "weight_lr_power"),
    (dict(eps=-1e-8), "eps"), (dict(r=-1.0), "r"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        whiten.ScheduleFreeAdamW([torch.zeros(3, requires_grad=True)], **kwargs)


@pytest.mark.parametrize("saved_in_eval", [False, True])
def test_load_while_in_eval_mode_takes_the_checkpoints_mode_and_resumes(saved_in_eval):
    """An optimizer in eval mode (its parameters hold x, y kept aside) loads a checkpoint: the checkpoint's mode and
    y win, this optimizer's own y is dropped, and with the checkpoint's weights loaded (before or after) the run
    resumes as if uninterrupted."""
    grads = _grads(10)
    params = [w.requires_grad_() for w in _init()]
    opt = whiten.ScheduleFreeAdamW(params, lr=0.05, weight_decay=0.1)
    for t, gs in enumerate(grads):
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        if t == 4:
            if saved_in_eval:
                opt.eval()
            model_sd = [p.detach().clone() for p in params]
            opt_sd = copy.deepcopy(opt.state_dict())
            if saved_in_eval:
                opt.train()
    expected = [p.detach().clone() for p in params]

    params2 = [w.requires_grad_() for w in _init(seed=9)]
    opt2 = whiten.ScheduleFreeAdamW(params2, lr=0.05, weight_decay=0.1)
    for p, g in zip(params2, grads[0]):
        p.grad = g.clone()
    opt2.step()
    opt2.eval()  # the state being replaced is in eval mode, with its own y aside
    with torch.no_grad():
        for p, w in zip(params2, model_sd):
            p.copy_(w)
    opt2.load_state_dict(opt_sd)
    assert opt2.in_eval_mode == saved_in_eval
    assert all(("live" in s) == saved_in_eval for s in opt2.state.values())
    opt2.train()
    for gs in grads[5:]:
        for p, g in zip(params2, gs):
            p.grad = g.clone()
        opt2.step()
    for p, w in zip(params2, expected):
        assert torch.equal(p, w)
