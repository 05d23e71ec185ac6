"""whiten inside training code nobody here wrote: Hugging Face Trainer, Lightning, accelerate and a nanoGPT-style
loop. Each trains a tiny model, evaluates (with the averaged weights when averaging is on), checkpoints, resumes
bit for bit, and keeps as its saved model the weights that were scored."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import whiten

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import nanogpt_style  # noqa: E402

VOCAB, CTX = 32, 12

# every whiten optimizer; Muon and SOAP with averaging switched on so the eval-mode paths of AveragingMixin run
OPTIMIZERS = {
    "SPlus": lambda ps: whiten.SPlus(ps, lr=0.05, inverse_every=2),  # averages by default ("auto")
    "SOAP": lambda ps: whiten.SOAP(ps, lr=3e-3, precondition_frequency=2, ema_rate="auto"),
    "Shampoo": lambda ps: whiten.Shampoo(ps, lr=3e-3, precondition_frequency=2, epsilon=1e-6),
    "PSGDKron": lambda ps: whiten.PSGDKron(ps, lr=1e-3),
    "Muon": lambda ps: whiten.Muon(ps, lr=0.02, ema_rate=0.9),
    "ScheduleFreeAdamW": lambda ps: whiten.ScheduleFreeAdamW(ps, lr=3e-3),
}


def tokens(n, seed):
    return torch.randint(0, VOCAB, (n, CTX), generator=torch.Generator().manual_seed(seed))


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----- Hugging Face Trainer ---------------------------------------------------------------------------------------

class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {"input_ids": self.data[i], "labels": self.data[i]}


def hf_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=CTX, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def hf_trainer(name, out, **extra):
    from transformers import Trainer, TrainingArguments

    model = hf_model()
    opt = OPTIMIZERS[name](whiten.param_groups(model))
    args = TrainingArguments(output_dir=str(out), max_steps=6, per_device_train_batch_size=4,
                             per_device_eval_batch_size=8, eval_strategy="steps", eval_steps=3, save_strategy="steps",
                             save_steps=3, logging_steps=3, report_to="none", use_cpu=True, seed=0,
                             dataloader_num_workers=0, disable_tqdm=True, **extra)
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(tokens(16, 1)),
                      eval_dataset=TokenDataset(tokens(8, 2)), optimizers=(opt, None))
    return trainer, model, opt


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_hf_trainer_eval_save_resume_bit_exact(name, tmp_path):
    trainer, model, opt = hf_trainer(name, tmp_path / "a")
    trainer.train()
    evals = {r["step"]: r["eval_loss"] for r in trainer.state.log_history if "eval_loss" in r}
    assert sorted(evals) == [3, 6]
    # the model in memory after training is the one the last evaluation scored
    assert trainer.evaluate()["eval_loss"] == evals[6]
    final = params_of(model)

    resumed, model2, opt2 = hf_trainer(name, tmp_path / "b")
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert_same(params_of(model2), final)
    opt.train()
    opt2.train()
    assert_same(params_of(model2), params_of(model))  # the live weights too


def test_hf_trainer_best_model_is_the_one_scored(tmp_path):
    trainer, model, opt = hf_trainer("SPlus", tmp_path / "a", load_best_model_at_end=True,
                                     metric_for_best_model="eval_loss")
    trainer.train()
    evals = {r["step"]: r["eval_loss"] for r in trainer.state.log_history if "eval_loss" in r}
    best_step = trainer.state.best_model_checkpoint.rsplit("-", 1)[1]
    assert trainer.state.best_metric == min(evals.values()) == evals[int(best_step)]
    # the saved weights of every checkpoint, evaluated afresh, give the loss that was logged for them
    for step, loss in evals.items():
        fresh = hf_model().from_pretrained(tmp_path / "a" / f"checkpoint-{step}")
        check, _, _ = hf_trainer("SPlus", tmp_path / "check")
        check.model = fresh
        assert check.evaluate()["eval_loss"] == pytest.approx(loss, abs=1e-6), step
    # and the model left in memory is the best one
    assert trainer.evaluate()["eval_loss"] == pytest.approx(trainer.state.best_metric, abs=1e-6)


# ----- Lightning --------------------------------------------------------------------------------------------------

def lightning_module(name):
    import lightning.pytorch as pl

    class LitLM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Embedding(VOCAB, 16), nn.Linear(16, 16), nn.GELU(), nn.LayerNorm(16),
                                     nn.Linear(16, VOCAB))

        def loss(self, batch):
            return F.cross_entropy(self.net(batch[:, :-1]).reshape(-1, VOCAB), batch[:, 1:].reshape(-1))

        def training_step(self, batch, batch_idx):
            return self.loss(batch)

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", self.loss(batch))

        def configure_optimizers(self):
            return OPTIMIZERS[name](whiten.param_groups(self.net))

        def train_dataloader(self):
            return torch.utils.data.DataLoader(tokens(16, 1), batch_size=4)

        def val_dataloader(self):
            return torch.utils.data.DataLoader(tokens(8, 2), batch_size=8)

    return LitLM()


def lightning_fit(name, out, ckpt_path=None):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from whiten.integrations.lightning import AveragedValidation

    module = lightning_module(name)
    checkpoint = ModelCheckpoint(dirpath=out, filename="{epoch}", save_top_k=-1, monitor="val_loss")
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[AveragedValidation(), checkpoint])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on dataloader workers
        trainer.fit(module, ckpt_path=ckpt_path)
    return trainer, module


@pytest.mark.parametrize("name", ["SPlus", "ScheduleFreeAdamW"])
def test_lightning_validates_averaged_weights_and_resumes_bit_exact(name, tmp_path):
    trainer, module = lightning_fit(name, tmp_path / "a")
    opt = trainer.optimizers[0]
    assert opt.in_eval_mode  # the last validation's weights stay in place after fit
    final = params_of(module)
    logged = float(trainer.callback_metrics["val_loss"])
    with torch.no_grad():
        assert module.loss(tokens(8, 2)).item() == pytest.approx(logged, abs=1e-6)
    # the epoch-0 checkpoint holds the weights its validation scored
    ckpt = torch.load(tmp_path / "a" / "epoch=0.ckpt", weights_only=False)
    scored = ckpt["callbacks"][next(k for k in ckpt["callbacks"] if "ModelCheckpoint" in k)]["current_score"]
    fresh = lightning_module(name)
    fresh.load_state_dict(ckpt["state_dict"])
    with torch.no_grad():
        assert fresh.loss(tokens(8, 2)).item() == pytest.approx(float(scored), abs=1e-6)

    trainer2, module2 = lightning_fit(name, tmp_path / "b", ckpt_path=str(tmp_path / "a" / "epoch=0.ckpt"))
    assert_same(params_of(module2), final)
    opt.train()
    trainer2.optimizers[0].train()
    assert_same(params_of(module2), params_of(module))


# ----- accelerate -------------------------------------------------------------------------------------------------

def accelerate_run(state_dir, load=False):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(VOCAB, 16), nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, VOCAB))
    opt = whiten.SPlus(whiten.param_groups(model), lr=0.05)
    model, opt = accelerator.prepare(model, opt)

    def loss_of(batch):
        return F.cross_entropy(model(batch[:, :-1]).reshape(-1, VOCAB), batch[:, 1:].reshape(-1))

    def steps(start, stop):
        for t in range(start, stop):
            loss = loss_of(tokens(4, 100 + t))
            opt.zero_grad()
            accelerator.backward(loss)
            opt.step()

    if load:
        accelerator.load_state(state_dir)
        opt.train()  # the state was saved in eval mode
    else:
        steps(0, 20)
        opt.eval()  # AcceleratedOptimizer forwards eval()/train()
        with torch.no_grad():
            scored = loss_of(tokens(8, 2)).item()
        accelerator.save_state(state_dir)
        opt.train()
        from safetensors.torch import load_file
        saved = load_file(Path(state_dir) / "model.safetensors")
        check = nn.Sequential(nn.Embedding(VOCAB, 16), nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, VOCAB))
        check.load_state_dict(saved)
        with torch.no_grad():  # the saved model is the one that was scored
            assert F.cross_entropy(check(tokens(8, 2)[:, :-1]).reshape(-1, VOCAB),
                                   tokens(8, 2)[:, 1:].reshape(-1)).item() == pytest.approx(scored, abs=1e-6)
    steps(20, 26)
    return params_of(model)


def test_accelerate_save_state_in_eval_mode_resumes_bit_exact(tmp_path):
    assert_same(accelerate_run(tmp_path / "state"), accelerate_run(tmp_path / "state", load=True))


# ----- a nanoGPT-style loop ---------------------------------------------------------------------------------------

def nanogpt_run(out: Path, resume=False, iters=12, eval_interval=6):
    """nanoGPT's train.py in miniature: lr written into every group, grad clipping, evaluation with the averaged
    weights, 'always save' checkpoints written while the scored weights are in place."""
    torch.manual_seed(0)
    cfg = nanogpt_style.GPTConfig(vocab_size=VOCAB, block_size=CTX, n_layer=1, n_head=2, n_embd=16, dropout=0.0)
    model = nanogpt_style.GPT(cfg)
    opt = whiten.Muon(whiten.param_groups(model), lr=0.02, adam_lr=3e-3, ema_rate="auto")
    val = [(tokens(8, 2)[:, :-1], tokens(8, 2)[:, 1:])]
    start, best, history = 0, float("inf"), {}
    if resume:
        ckpt = torch.load(out / "ckpt.pt", weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        start, best = ckpt["iter_num"], ckpt["best_val_loss"]
    for it in range(start, iters + 1):
        if it % eval_interval == 0 and it > start:
            opt.eval()
            loss = nanogpt_style.estimate_loss(model, val)
            history[it] = loss
            best = min(best, loss)
            if not resume:
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "iter_num": it,
                            "best_val_loss": best}, out / f"ckpt-{it}.pt")
        if it == iters:
            break
        opt.train()  # a no-op unless evaluation (or a checkpoint) left the averaged weights in place
        lr = nanogpt_style.get_lr(it, 0.02, 2, iters, 0.002)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = tokens(4, 100 + it)
        _, loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return model, opt, history


def test_nanogpt_style_loop_checkpoint_scores_and_resumes(tmp_path):
    model, opt, history = nanogpt_run(tmp_path)
    final = params_of(model)
    ckpt = torch.load(tmp_path / "ckpt-6.pt", weights_only=False)
    fresh = nanogpt_style.GPT(model.config)
    fresh.load_state_dict(ckpt["model"])
    val = [(tokens(8, 2)[:, :-1], tokens(8, 2)[:, 1:])]
    assert nanogpt_style.estimate_loss(fresh, val) == history[6]  # the saved weights are the scored ones
    # the groups kept Muon's ratio through the schedule: AdamW groups step at lr × adam_lr / lr
    assert {g["lr"] for g in opt.param_groups} == {nanogpt_style.get_lr(11, 0.02, 2, 12, 0.002)}
    assert {g["lr_scale"] for g in opt.param_groups} == {1.0, 3e-3 / 0.02}

    (tmp_path / "ckpt.pt").write_bytes((tmp_path / "ckpt-6.pt").read_bytes())
    model2, _, history2 = nanogpt_run(tmp_path, resume=True)
    assert_same(params_of(model2), final)
    assert history2[12] == history[12]
