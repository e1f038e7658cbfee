"""The shared training loop: learning, exact resume, checkpoints, configs, safetensors export."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from dfm_core.checkpoints import EXPORTED_MODEL, export_safetensors, load_safetensors
from dfm_core.config import load_config
from dfm_core.nn import DiT
from dfm_core.runtime import resolve_device
from dfm_core.training import (
    EMA,
    TrainConfig,
    WarmupSchedule,
    best_weights_metadata,
    fit_steps_to_budget,
    load_checkpoint,
    train,
)

V, L = 8, 6


def tiny_model(seed: int = 0, hidden: int = 16, dropout: float = 0.1) -> DiT:
    torch.manual_seed(seed)
    return DiT(V, hidden=hidden, depth=1, heads=2, max_len=L, dropout=dropout)


def batches(generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, V, (16, L), generator=generator)


def denoise_loss(model, x1, generator):
    """A toy masked-denoising loss: keep each token with prob t, replace the rest by token 0."""
    t = torch.rand(x1.shape[0], generator=generator, device=x1.device)
    keep = torch.rand(x1.shape, generator=generator, device=x1.device) < t[:, None]
    xt = torch.where(keep, x1, torch.zeros_like(x1))
    return F.cross_entropy(model(xt, t).reshape(-1, V), x1.reshape(-1))


def val_loss(model, generator):
    return denoise_loss(model, batches(generator), generator)


def config(**kw) -> TrainConfig:
    base = dict(
        steps=12,
        batch_size=16,
        lr=1e-2,
        warmup_steps=2,
        ema_decay=0.9,
        eval_every=6,
        eval_batches=2,
        ckpt_every=4,
        log_every=3,
        device="cpu",
        seed=3,
    )
    return TrainConfig(**{**base, **kw})


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_on_a_toy_task(tmp_path):
    result = train(
        tiny_model(dropout=0.0),
        denoise_loss,
        batches,
        config(steps=60, log_every=10, eval_every=30),
        tmp_path,
        val_loss_fn=val_loss,
        progress=False,
    )
    losses = [r["loss"] for r in read_metrics(tmp_path) if "loss" in r]
    assert result.step == 60 and len(losses) == 6
    assert losses[-1] < 0.8 * losses[0]
    assert losses[0] < math.log(V) + 0.1
    records = read_metrics(tmp_path)
    assert {"step", "loss", "lr", "grad_norm", "items_per_s"} <= set(records[0])
    assert [r["step"] for r in records if "val_loss" in r] == [30, 60]
    assert result.best_checkpoint == tmp_path / "best.pt"
    assert math.isfinite(result.best_val_loss)


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    full = tiny_model()
    train(full, denoise_loss, batches, config(), tmp_path / "full", val_loss_fn=val_loss, progress=False)

    calls = {"n": 0}

    def dying_loss(model, batch, generator):
        calls["n"] += 1
        if calls["n"] == 7:  # dies in step 7; the last checkpoint is at step 4
            raise RuntimeError("killed")
        return denoise_loss(model, batch, generator)

    run = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="killed"):
        train(tiny_model(), dying_loss, batches, config(), run, val_loss_fn=val_loss, progress=False)
    assert load_checkpoint(run / "last.pt")["step"] == 4

    resumed = tiny_model(seed=123)  # a different init: everything must come from the checkpoint
    result = train(resumed, denoise_loss, batches, config(), run, val_loss_fn=val_loss, progress=False)
    assert result.resumed_from == 4 and result.step == 12

    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    ema_full = load_checkpoint(tmp_path / "full" / "last.pt")["ema"]["shadow"]
    for name, value in result.ema.shadow.items():
        assert torch.equal(value, ema_full[name]), name

    def strip(records):
        return [{k: v for k, v in r.items() if k not in ("time_s", "items_per_s")} for r in records]

    # the killed run's records past step 4 were dropped, so the log reads like one run
    assert strip(read_metrics(run)) == strip(read_metrics(tmp_path / "full"))


def test_checkpoint_contents_and_atomicity(tmp_path):
    model = tiny_model()
    cfg = config(steps=5, ckpt_every=2)
    train(
        model,
        denoise_loss,
        batches,
        cfg,
        tmp_path,
        extra_metadata={"model_config": {"hidden": 16}},
        progress=False,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "last.pt", "metrics.jsonl"]
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert {"model", "optimizer", "scheduler", "ema", "step", "rng", "config", "metadata"} <= set(ckpt)
    assert ckpt["step"] == 5
    assert TrainConfig.from_dict(ckpt["config"]) == cfg
    assert ckpt["metadata"] == {"model_config": {"hidden": 16}}
    fresh = tiny_model(seed=9)
    load_checkpoint(tmp_path / "last.pt", fresh, use_ema=True)
    for name, p in fresh.named_parameters():
        assert torch.equal(p, ckpt["ema"]["shadow"][name])
    load_checkpoint(tmp_path / "last.pt", fresh, use_ema=False)
    assert all(
        torch.equal(a, b)
        for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True)
    )
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable training checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")


def test_resume_refuses_a_different_architecture(tmp_path):
    train(
        tiny_model(hidden=16),
        denoise_loss,
        batches,
        config(steps=2),
        tmp_path,
        progress=False,
        extra_metadata={"model_config": {"hidden": 16, "causal": False}},
    )
    with pytest.raises(ValueError, match="architecture differs"):
        train(tiny_model(hidden=8), denoise_loss, batches, config(steps=4), tmp_path, progress=False)
    with pytest.raises(ValueError, match="model_config"):
        train(
            tiny_model(hidden=16),
            denoise_loss,
            batches,
            config(steps=4),
            tmp_path,
            progress=False,
            extra_metadata={"model_config": {"hidden": 16, "causal": True}},
        )
    with pytest.warns(UserWarning, match="changed TrainConfig"):
        result = train(
            tiny_model(hidden=16), denoise_loss, batches, config(steps=4), tmp_path, progress=False
        )
    assert result.resumed_from == 2 and result.step == 4
    # resume=False starts over
    assert (
        train(
            tiny_model(hidden=8),
            denoise_loss,
            batches,
            config(steps=1),
            tmp_path,
            resume=False,
            progress=False,
        ).resumed_from
        is None
    )


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_started_afresh_drops_the_old_exported_model_before_it_can_be_mistaken_for_its_own(
    tmp_path, resume
):
    """With resume=False (--no-resume) a run killed before its end must not leave the previous run's
    model.safetensors beside its new config.json; a run that merely finds no last.pt keeps the file."""
    old = tmp_path / EXPORTED_MODEL
    old.write_bytes(b"the previous run's export")

    def dies_at_once(model, x1, generator):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        train(tiny_model(), dies_at_once, batches, config(steps=2), tmp_path, resume=resume, progress=False)
    assert (tmp_path / "config.json").exists()
    assert old.exists() == resume
    other = tmp_path / "vqvae.safetensors"  # an app exporting under its own name says so
    other.write_bytes(b"the previous run's export")
    with pytest.raises(RuntimeError, match="killed"):
        train(tiny_model(), dies_at_once, batches, config(steps=2), tmp_path, resume=False, progress=False,
              exported=other.name)  # fmt: skip
    assert not other.exists()


def test_iterable_batches_and_nan_detection(tmp_path):
    data = [batches(torch.Generator().manual_seed(i)) for i in range(3)]
    result = train(
        tiny_model(), denoise_loss, data, config(steps=3, eval_every=0), tmp_path / "a", progress=False
    )
    assert result.step == 3

    def nan_loss(model, batch, generator):
        return denoise_loss(model, batch, generator) * float("nan")

    with pytest.raises(FloatingPointError, match="non-finite"):
        train(tiny_model(), nan_loss, batches, config(steps=3), tmp_path / "b", progress=False)


def test_warmup_cosine_schedule():
    s = WarmupSchedule(warmup=4, total=14, kind="cosine", min_ratio=0.1)
    assert [s(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s(4) == pytest.approx(1.0) and s(9) == pytest.approx(0.55) and s(14) == pytest.approx(0.1)
    assert WarmupSchedule(0, 10, "constant")(7) == 1.0
    wsd = WarmupSchedule(warmup=4, total=24, kind="cosine", min_ratio=0.1, decay_start=14)  # hold, then decay
    assert [wsd(i) for i in (4, 10, 14)] == [1.0, 1.0, 1.0]
    assert wsd(19) == pytest.approx(0.55) and wsd(24) == pytest.approx(0.1)
    state = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.zeros(1)], lr=1.0), wsd).state_dict()
    restored = WarmupSchedule(0, 1)
    restored.__dict__.update(state["lr_lambdas"][0])  # what LambdaLR.load_state_dict does
    assert restored(19) == wsd(19)
    with pytest.raises(ValueError, match="decay_start"):
        TrainConfig(steps=10, decay_start=11)


def test_ema_update_and_swap():
    model = torch.nn.Linear(2, 1)
    ema = EMA(model, decay=0.5, warmup=False)
    before = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert torch.allclose(ema.shadow["weight"], before + 0.5)
    with ema.average_parameters(model):
        assert torch.allclose(model.weight, before + 0.5)
    assert torch.allclose(model.weight, before + 1.0)
    assert EMA(model, decay=0.999).current_decay() == pytest.approx(0.1)  # warmup (1 + n) / (10 + n)


def test_config_files(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("[train]\nsteps = 5\nlr = 1e-3\nbetas = [0.9, 0.95]\n\n[model]\nhidden = 8\n")
    cfg = load_config(toml, TrainConfig, section="train")
    assert cfg.steps == 5 and cfg.betas == (0.9, 0.95)
    js = tmp_path / "run.json"
    js.write_text(json.dumps(cfg.to_dict()))
    assert load_config(js, TrainConfig) == cfg
    js.write_text(json.dumps({"steps": 5, "learning_rate": 1.0}))
    with pytest.raises(ValueError, match="unknown TrainConfig key\\(s\\): learning_rate"):
        load_config(js, TrainConfig)
    with pytest.raises(ValueError, match="no \\[optim\\] section"):
        load_config(toml, TrainConfig, section="optim")
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.toml", TrainConfig)
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="linear")


def test_safetensors_round_trip(tmp_path):
    model = tiny_model()
    meta = {"model_config": {"hidden": 16, "depth": 1}, "step": 7, "note": "ema weights", "tags": [1, 2]}
    path = export_safetensors(model, tmp_path / "w.safetensors", meta)
    state, loaded_meta = load_safetensors(path)
    assert {k: loaded_meta[k] for k in meta} == meta
    for name, value in model.state_dict().items():
        assert torch.equal(state[name], value), name
    table = torch.rand(5, dtype=torch.float64) / 3  # a probability table, not a weight
    export_safetensors(
        {**model.state_dict(), "pmf": table}, tmp_path / "w16.safetensors", meta, dtype=torch.bfloat16
    )
    state16, _ = load_safetensors(tmp_path / "w16.safetensors")
    assert all(v.dtype == torch.bfloat16 for k, v in state16.items() if k != "pmf")
    assert state16["pmf"].dtype == torch.float64 and torch.equal(state16["pmf"], table)
    fresh = tiny_model(seed=5)
    fresh.load_state_dict(state)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_safetensors_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_safetensors(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"hello world, this is not a tensor file at all")
    with pytest.raises(ValueError, match="not a safetensors checkpoint"):
        load_safetensors(junk)
    pt = tmp_path / "model.pt"
    torch.save(tiny_model().state_dict(), pt)
    with pytest.raises(ValueError, match="torch .pt"):
        load_safetensors(pt)
    good = export_safetensors(tiny_model(), tmp_path / "good.safetensors", {})
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ValueError, match="safetensors checkpoint"):
        load_safetensors(truncated)


def test_ema_and_export_see_through_torch_compile(tmp_path):
    model = tiny_model()
    compiled = torch.compile(model)  # lazy: nothing is compiled until called
    ema = EMA(compiled, decay=0.9)
    assert set(ema.shadow) == {name for name, _ in model.named_parameters()}
    state, _ = load_safetensors(export_safetensors(compiled, tmp_path / "c.safetensors", {}))
    assert set(state) == set(model.state_dict())


def test_resolve_device_names_the_problem():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="CUDA is not available|GPU"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_resuming_with_more_steps_keeps_learning(tmp_path):
    """A finished cosine schedule ends at lr 0: asking for more steps must extend it, not replay the old one."""
    train(tiny_model(), denoise_loss, batches, config(steps=6, eval_every=0), tmp_path, progress=False)
    before = {k: v.clone() for k, v in load_checkpoint(tmp_path / "last.pt")["model"].items()}
    with pytest.warns(UserWarning, match="new settings apply from step 6"):
        train(tiny_model(), denoise_loss, batches, config(steps=12, eval_every=0), tmp_path, progress=False)
    after = load_checkpoint(tmp_path / "last.pt")["model"]
    assert max(float((after[k] - before[k]).abs().max()) for k in before) > 1e-4
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    schedule = WarmupSchedule(2, 12, "cosine")
    assert lrs[-2] == pytest.approx(1e-2 * schedule(9)) and lrs[-2] > 0  # step 9 of the new 12-step schedule


def test_a_resumed_run_says_so_when_it_starts(tmp_path, capsys):
    """A rerun into a used run dir goes on from last.pt: said at the start, where a long run is watched."""
    train(tiny_model(), denoise_loss, batches, config(steps=3, eval_every=0), tmp_path, progress=False)
    capsys.readouterr()
    with pytest.warns(UserWarning, match="new settings apply from step 3"):
        train(tiny_model(), denoise_loss, batches, config(steps=4, eval_every=0), tmp_path, progress=True)
    assert f"resuming from step 3 of {tmp_path / 'last.pt'}" in capsys.readouterr().err
    assert json.loads((tmp_path / "config.json").read_text())["train"]["steps"] == 4
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # config.json written whole


def test_a_fresh_run_removes_the_old_runs_checkpoints(tmp_path):
    train(tiny_model(), denoise_loss, batches, config(steps=6), tmp_path, val_loss, progress=False)
    assert (tmp_path / "best.pt").exists()
    train(
        tiny_model(),
        denoise_loss,
        batches,
        config(steps=2, eval_every=0),
        tmp_path,
        resume=False,
        progress=False,
    )
    assert not (tmp_path / "best.pt").exists()  # else the export would pick the old run's best weights
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 2


def test_resume_refuses_another_identity(tmp_path):
    run = dict(loss_fn=denoise_loss, train_batches=batches, run_dir=tmp_path, progress=False)
    train(tiny_model(), config=config(steps=2), identity={"data": "a"}, **run)
    with pytest.raises(ValueError, match="other data or another objective.*'data': \\('a', 'b'\\)"):
        train(tiny_model(), config=config(steps=4), identity={"data": "b"}, **run)
    assert train(tiny_model(), config=config(steps=4), identity={"data": "a"}, **run).step == 4


def test_a_checkpoint_that_predates_an_identity_key_still_resumes(tmp_path):
    """An app that starts recording a new fact of its runs (matgen: a digest of the crystals) names it in
    identity_added_later: a run started by the earlier version resumes with a warning, instead of being
    refused as "other data"; once recorded, the fact is checked like the others."""
    run = dict(loss_fn=denoise_loss, train_batches=batches, run_dir=tmp_path, progress=False)
    train(tiny_model(), config=config(steps=2), identity={"data": "a"}, **run)  # the earlier version
    newer = {"data": "a", "crystals": "x"}
    with pytest.raises(ValueError, match="'crystals': \\(None, 'x'\\)"):
        train(tiny_model(), config=config(steps=3), identity=newer, **run)
    with pytest.warns(UserWarning, match="predates the record of crystals"):
        result = train(
            tiny_model(), config=config(steps=3), identity=newer, identity_added_later=("crystals",), **run
        )
    assert result.step == 3
    with pytest.raises(ValueError, match="'crystals': \\('x', 'y'\\)"):  # recorded now: checked
        train(
            tiny_model(),
            config=config(steps=4),
            identity={**newer, "crystals": "y"},
            identity_added_later=("crystals",),
            **run,
        )
    with pytest.raises(ValueError, match="'data': \\('a', 'b'\\)"):  # the old facts are still checked
        train(
            tiny_model(),
            config=config(steps=4),
            identity={**newer, "data": "b"},
            identity_added_later=("crystals",),
            **run,
        )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('steps = "two"', "TrainConfig.steps must be a whole number, got 'two'"),
        ("steps = 2.5", "TrainConfig.steps must be a whole number"),
        ('lr = "1e-3"', "TrainConfig.lr must be a number"),
        ("device = 3", "TrainConfig.device must be text"),
        ('lr_schedule = "step"', "one of 'cosine', 'constant'"),
        ("batch_size = 0", "batch_size must be >= 1"),
        ("steps = [", "is not valid TOML"),
    ],
)
def test_config_files_with_wrong_values_name_the_key_and_file(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text + "\n")
    with pytest.raises(ValueError, match="bad.toml") as info:
        load_config(path, TrainConfig)
    assert message in str(info.value)


def test_config_values_are_mildly_converted():
    cfg = TrainConfig.from_dict({"steps": 2.0, "lr": 1, "betas": [0.9, 0.95], "decay_start": None})
    assert cfg.steps == 2 and isinstance(cfg.steps, int) and cfg.lr == 1.0 and cfg.betas == (0.9, 0.95)


def test_ctrl_c_mid_step_finishes_the_step_and_checkpoints_it(tmp_path, capsys):
    """SIGINT lands mid-step (in the loss) almost always: the step must finish and be saved, not lost."""
    import os
    import shutil
    import signal

    calls = {"n": 0}

    def interrupted_loss(model, x1, generator):
        calls["n"] += 1
        if calls["n"] == 5:  # during the forward pass of step 5
            os.kill(os.getpid(), signal.SIGINT)
        return denoise_loss(model, x1, generator)

    cfg = config(steps=12, ckpt_every=100, eval_every=0)
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a background job (nohup ... &)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_model(), interrupted_loss, batches, cfg, tmp_path / "cut", progress=False)
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["step"] == 5
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back
    assert "with steps = 5 to only export" in capsys.readouterr().err
    # as the message says: a run told to stop where it was interrupted trains nothing more
    shutil.copytree(tmp_path / "cut", tmp_path / "stop")
    before = load_checkpoint(tmp_path / "stop" / "last.pt")["model"]
    with pytest.warns(UserWarning, match="changed TrainConfig"):
        stopped = train(tiny_model(), denoise_loss, batches, config(steps=5, eval_every=0), tmp_path / "stop")
    after = load_checkpoint(tmp_path / "stop" / "last.pt")["model"]
    assert stopped.step == 5 and all(torch.equal(before[k], after[k]) for k in before)
    with (tmp_path / "cut" / "metrics.jsonl").open("a") as f:  # a foreign line and a torn append
        f.write('{"loss": 3}\n{"step": 6, "lo')
    with pytest.warns(UserWarning, match=r"dropped 2 unreadable line\(s\) of .*metrics.jsonl"):
        resumed = train(tiny_model(), denoise_loss, batches, cfg, tmp_path / "cut", progress=False)
    whole = train(tiny_model(), denoise_loss, batches, cfg, tmp_path / "whole", progress=False)
    assert resumed.step == whole.step == 12
    a, b = (load_checkpoint(p / "last.pt")["model"] for p in (tmp_path / "cut", tmp_path / "whole"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the log of a resumed run: the same losses, and time that goes on from where it stopped
    records = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in records] == [r["loss"] for r in reference]
    times = [r["time_s"] for r in records]
    assert (
        times == sorted(times) and load_checkpoint(tmp_path / "cut" / "last.pt")["log_window"]["time_s"] > 0
    )


def test_a_full_disk_names_the_checkpoint_and_keeps_the_previous_one(tmp_path, monkeypatch):
    cfg = config(steps=12, ckpt_every=6, eval_every=0)
    real_save = torch.save
    saves = [0]

    def save_until_the_disk_fills(obj, f, *args, **kwargs):
        saves[0] += 1
        if saves[0] > 1:  # what torch raises when a write runs out of space
            raise RuntimeError(
                "[enforce fail at inline_container.cc:672] . unexpected pos 1174016 vs 1173908"
            )
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_fills)
    with pytest.raises(OSError, match=r"could not write the checkpoint .*last.pt \(\[enforce fail.*MiB free"):
        train(tiny_model(), denoise_loss, batches, cfg, tmp_path, progress=False)
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 6  # the previous checkpoint survives


def test_sigterm_stops_training_like_ctrl_c(tmp_path):
    """`kill`, `timeout` and batch schedulers send SIGTERM: the step finishes and is checkpointed."""
    import os
    import signal

    calls = {"n": 0}

    def terminated_loss(model, x1, generator):
        calls["n"] += 1
        if calls["n"] == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return denoise_loss(model, x1, generator)

    with pytest.raises(KeyboardInterrupt):
        train(tiny_model(), terminated_loss, batches, config(steps=9, ckpt_every=100, eval_every=0), tmp_path)
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 4
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back


def test_an_unreadable_checkpoint_says_how_to_recover(tmp_path):
    (tmp_path / "last.pt").write_text("garbage")
    with pytest.raises(ValueError) as caught:
        load_checkpoint(tmp_path / "last.pt")
    message = str(caught.value)
    assert "not a readable training checkpoint" in message and "--no-resume" in message
    assert "\n" not in message and "weights_only" not in message.split(";")[-1]


def test_a_diverged_run_never_overwrites_last_pt(tmp_path):
    """Checkpoints fall between log records: NaN weights must not become the 'last good checkpoint'."""
    calls = {"n": 0}

    def exploding(model, x1, generator):
        calls["n"] += 1
        loss = denoise_loss(model, x1, generator)
        return loss * float("nan") if calls["n"] > 4 else loss

    cfg = config(steps=12, ckpt_every=4, log_every=100, eval_every=0)
    with pytest.raises(
        FloatingPointError, match=r"loss or gradient at step 5 \(logged loss nan\); last good checkpoint"
    ):  # the first
        train(tiny_model(), exploding, batches, cfg, tmp_path, progress=False)
    saved = load_checkpoint(tmp_path / "last.pt")
    assert saved["step"] == 4 and all(torch.isfinite(v).all() for v in saved["model"].values())


def test_a_nan_gradient_under_a_finite_loss_never_reaches_a_checkpoint(tmp_path):
    """sqrt at 0 has an infinite derivative: the loss stays finite while the weights become NaN."""
    calls = {"n": 0}

    def bad_gradient(model, x1, generator):
        calls["n"] += 1
        loss = denoise_loss(model, x1, generator)
        if calls["n"] == 6:
            w = next(model.parameters())
            loss = loss + 0.0 * (w - w.detach()).abs().sqrt().sum()  # value 0, gradient inf * 0 = NaN
        return loss

    cfg = config(steps=12, ckpt_every=4, log_every=100, eval_every=0)
    with pytest.raises(
        FloatingPointError, match="non-finite training loss or gradient at step 6 .*; last good"
    ):
        train(tiny_model(), bad_gradient, batches, cfg, tmp_path, progress=False)
    saved = load_checkpoint(tmp_path / "last.pt")
    assert saved["step"] == 4 and all(torch.isfinite(v).all() for v in saved["model"].values())
    assert all(torch.isfinite(v).all() for v in saved["ema"]["shadow"].values())


def test_fit_steps_to_budget_keeps_the_schedule_shape():
    cfg = config(steps=1000, warmup_steps=100, decay_start=500)
    fitted = fit_steps_to_budget(cfg, step=20, seconds_per_step=0.1, remaining_s=40.0)
    assert fitted.steps == 20 + int(0.92 * 40.0 / 0.1)
    ratio = fitted.steps / 1000
    assert fitted.warmup_steps == 100 and fitted.decay_start == round(500 * ratio)
    # a warmup over half the fitted run is cut to half, but never ends before the step reached
    assert fit_steps_to_budget(cfg, step=20, seconds_per_step=0.1, remaining_s=10.0).warmup_steps == 56
    assert fit_steps_to_budget(cfg, step=70, seconds_per_step=0.1, remaining_s=2.0).warmup_steps == 70
    # enough time: nothing changes; no time at all: at least one more step, never fewer than done
    assert fit_steps_to_budget(cfg, 70, 0.001, 1e6) is cfg
    assert fit_steps_to_budget(cfg, 70, 1.0, -5.0).steps == 71
    with pytest.raises(ValueError, match="time_budget_s"):
        config(time_budget_s=0.0)


def test_a_time_budget_ends_the_run_in_time_with_the_schedule_finished(tmp_path):
    import time

    def slow_loss(model, x1, generator):
        time.sleep(0.01)
        return denoise_loss(model, x1, generator)

    # validation every 6 steps makes the average step slower than the first timed ones: the run is
    # fitted again (shorter) as it goes
    cfg = config(steps=100_000, time_budget_s=2.0, lr_schedule="cosine", min_lr_ratio=0.1, log_every=1)
    result = train(tiny_model(), slow_loss, batches, cfg, tmp_path, val_loss, progress=False)
    assert 3 <= result.step < 100_000
    # ends in time (ignoring the budget would take a quarter of an hour), using most of it; on a loaded
    # machine, whose steps slow down after the fit, the run may overrun by a budget's worth
    assert 2.0 * 0.6 < result.wall_time_s < 2.0 * 3
    saved = json.loads((tmp_path / "config.json").read_text())["train"]
    assert (
        saved["steps"] == result.step
        and load_checkpoint(tmp_path / "last.pt")["config"]["steps"] == result.step
    )
    last_lr = [r["lr"] for r in read_metrics(tmp_path) if "lr" in r][-1]
    assert last_lr == pytest.approx(0.1 * cfg.lr, rel=1e-3)  # the cosine decay reached its floor


def test_a_budgeted_run_reissued_after_a_kill_keeps_its_fitted_schedule(tmp_path):
    """The same command re-issued after a kill goes on with the step count and LR decay its budget fitted;
    it neither restarts the cosine near the peak nor trains the budget twice. A new ceiling is obeyed."""
    import time

    steps_after_fit = [0]

    def loss_killed_soon_after_the_fit(model, x1, generator):
        time.sleep(0.01)
        if json.loads((tmp_path / "config.json").read_text())["train"]["steps"] < 100_000:  # fitted
            steps_after_fit[0] += 1
            if steps_after_fit[0] == 3:
                raise KeyboardInterrupt  # as a kill would, mid-step
        return denoise_loss(model, x1, generator)

    cfg = config(
        steps=100_000, time_budget_s=2.0, lr_schedule="cosine", min_lr_ratio=0.1, log_every=1, ckpt_every=1
    )
    with pytest.raises(KeyboardInterrupt):
        train(tiny_model(), loss_killed_soon_after_the_fit, batches, cfg, tmp_path, val_loss, progress=False)
    killed = load_checkpoint(tmp_path / "last.pt")
    fitted = killed["config"]["steps"]
    assert killed["step"] < fitted < 100_000 and killed["budget"] == {"requested_steps": 100_000}
    lr_at_kill = next(
        r["lr"] for r in read_metrics(tmp_path) if r.get("step") == killed["step"] and "lr" in r
    )

    result = train(
        tiny_model(),
        denoise_loss,
        batches,
        dataclasses.replace(cfg, seed=5),
        tmp_path,
        val_loss,
        progress=False,
    )
    # the fitted count, not a new fit from 100,000 (which would train about a budget's worth more); it may
    # end a step or two early when a busy machine makes the resumed steps slower than the fitted ones
    assert killed["step"] < result.step <= fitted
    lrs = [r["lr"] for r in read_metrics(tmp_path) if "lr" in r and r["step"] > killed["step"]]
    assert max(lrs) <= lr_at_kill * (1 + 1e-6) and lrs[-1] == pytest.approx(0.1 * cfg.lr, rel=1e-3)
    assert load_checkpoint(tmp_path / "last.pt")["config"]["seed"] == cfg.seed  # the run's seed, not 5

    longer = dataclasses.replace(cfg, steps=fitted + 5, time_budget_s=None)  # asked for more: trains more
    assert (
        train(tiny_model(), denoise_loss, batches, longer, tmp_path, val_loss, progress=False).step
        == fitted + 5
    )


def test_budget_clock_times_then_keeps_reporting_the_running_average(monkeypatch):
    from dfm_core import training

    now = [0.0]
    monkeypatch.setattr(training.time, "perf_counter", lambda: now[0])
    clock = training._BudgetClock(step=0, start=0.0, budget_s=1e6, skip=2, timed=3, every=5)
    rates = {}
    for step in range(1, 16):
        now[0] += 1.0 if step <= 5 else 3.0  # later steps are slower (validation, say)
        rate = clock.tick(step)
        if rate is not None:
            rates[step] = rate
    # marked at step 2 (t = 2); timed steps 3-5 at 1 s; then every 5 steps the average since the mark
    assert rates == {5: 1.0, 7: (11 - 2) / 5, 12: (26 - 2) / 10}


def test_export_metadata_records_the_config_the_checkpoint_ran_with(tmp_path):
    cfg = config(steps=100_000, time_budget_s=1.0)
    result = train(tiny_model(), denoise_loss, batches, cfg, tmp_path, val_loss, progress=False)
    started_with = {"app_config": {"train": cfg.to_dict(), "other": 1}, "kept": "yes"}
    meta = best_weights_metadata(tmp_path, tiny_model(), started_with, "app_config")
    source = load_checkpoint(
        tmp_path / meta["source_checkpoint"]
    )  # best.pt: the step count fitted when it was saved
    assert meta["app_config"]["train"] == source["config"] and source["config"]["steps"] < 100_000
    assert result.step == load_checkpoint(tmp_path / "last.pt")["config"]["steps"]  # the run ran its fit
    assert meta["app_config"]["other"] == 1 and meta["kept"] == "yes" and "train_config" not in meta
    assert started_with["app_config"]["train"]["steps"] == 100_000  # the caller's dict is not changed
    assert {"step", "best_val_loss", "source_checkpoint"} <= set(meta)


def test_a_checkpoint_with_non_finite_weights_is_refused_at_load(tmp_path):
    state = {k: v.clone() for k, v in tiny_model().state_dict().items()}
    export_safetensors(state, tmp_path / "ok.safetensors", {"kind": "toy"})
    assert load_safetensors(tmp_path / "ok.safetensors")[1]["kind"] == "toy"
    name = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[name][0] = float("nan")
    export_safetensors(state, tmp_path / "nan.safetensors", {"kind": "toy"})
    with pytest.raises(
        ValueError, match=rf"nan.safetensors holds non-finite weights .* in 1 tensor\(s\), e.g. {name}"
    ):
        load_safetensors(tmp_path / "nan.safetensors")
    train(
        tiny_model(), denoise_loss, batches, config(steps=2, eval_every=0), tmp_path / "run", progress=False
    )
    with pytest.raises(
        ValueError, match="torch .pt training checkpoint .* pass the run folder's model.safetensors"
    ):
        load_safetensors(tmp_path / "run" / "last.pt")


def test_a_checkpoints_metadata_is_read_from_its_header_alone(tmp_path):
    from dfm_core.checkpoints import read_safetensors_metadata

    meta = {"kind": "dfm", "steps": 3, "config": {"hidden": 16}, "note": "text"}
    path = export_safetensors(tiny_model(), tmp_path / "m.safetensors", meta)
    assert read_safetensors_metadata(path) == load_safetensors(path)[1]
    assert read_safetensors_metadata(path)["config"] == {"hidden": 16}
    broken = {k: torch.full_like(v, float("nan")) for k, v in tiny_model().state_dict().items()}
    nan_path = export_safetensors(broken, tmp_path / "nan.safetensors", meta)
    with pytest.raises(ValueError, match="non-finite"):
        load_safetensors(nan_path)
    assert read_safetensors_metadata(nan_path)["kind"] == "dfm"  # describing needs no weights
    torch.save({"model": {}}, tmp_path / "last.pt")
    with pytest.raises(ValueError, match="training checkpoint"):
        read_safetensors_metadata(tmp_path / "last.pt")
    (tmp_path / "short.safetensors").write_bytes(b"\x05")
    with pytest.raises(ValueError, match="too short"):
        read_safetensors_metadata(tmp_path / "short.safetensors")
