"""Training: the recipe learns, resumes to the step, and runs under torchrun; metrics are right."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from geosat2map import metrics, teacher_maps, weights
from geosat2map.datasets import PairDataset
from geosat2map.engine import onnx_available
from geosat2map.errors import DataError, Interrupted, OutputError, TrainingError
from geosat2map.model import PatchDiscriminator, UNetGenerator, init_weights
from geosat2map.train import TrainConfig, Trainer, train
from geosat2map.weights import ModelSpec, load_generator, read_spec, save_generator
from geosat2map_cli.main import cli

from .conftest import cli_json, random_generator, synthetic_image


def write_aligned(folder: Path, n: int = 6, size: int = 64) -> Path:
    """A pix2pix aligned folder: photo-like left half, a 'map' (posterised copy) right half."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a = synthetic_image(size, size, seed=i).astype(np.uint8)
        b = (a // 64 * 64 + 32).astype(np.uint8)
        img = np.concatenate([a, b], axis=2)
        with rasterio.open(folder / f"{i}.png", "w", driver="PNG", width=2 * size, height=size, count=3,
                           dtype="uint8") as dst:
            dst.write(img)
    return folder


def set_batchnorm_statistics(generator: torch.nn.Module, mean: float, var: float = 1.0) -> None:
    """Give every BatchNorm layer running statistics no batch of the test images would give."""
    for m in generator.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.fill_(mean)
            m.running_var.fill_(var)


def data_and_start(tmp_path: Path) -> tuple[Path, Path]:
    """An aligned folder and a width-4 generator to fine-tune, with BatchNorm statistics (mean
    0.25, variance 3) that no batch of the test images would give."""
    data = write_aligned(tmp_path / "data")
    start = tmp_path / "start.safetensors"
    g = UNetGenerator(ngf=4)
    set_batchnorm_statistics(g, 0.25, 3.0)
    save_generator(g.eval(), ModelSpec(ngf=4, gsd_m=2.0), start)
    return data, start


def tiny_config(data: Path, out: Path, **kw) -> TrainConfig:
    """fp32 unless a test asks for bf16: ``auto`` would autocast on CPUs with AMX or AVX512-BF16,
    and the tests that recompute a step's losses in fp32 would then hold on some machines only."""
    base = dict(data=str(data), out=str(out), ngf=4, ndf=4, load_size=286, crop_size=256, epochs=2,
                epochs_decay=1, holdout=3, checkpoint_every=0, samples=1, device="cpu", precision="fp32")
    base.update(kw)
    return TrainConfig(**base)


def test_generator_and_discriminator_match_the_reference_sizes():
    g = UNetGenerator(ngf=64)
    d = PatchDiscriminator(ndf=64)
    assert sum(p.numel() for p in g.parameters()) == 54_413_955  # pix2pix unet_256
    assert sum(p.numel() for p in d.parameters()) == 2_768_705  # pix2pix basic (n_layers=3)
    x = torch.zeros(1, 6, 256, 256)
    assert d(x).shape == (1, 1, 30, 30)  # 30 x 30 patches of 70 x 70 pixels
    assert sum(isinstance(m, torch.nn.Dropout) for m in g.modules()) == 3


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_l1_falls_on_a_fixed_pair(tmp_path, precision):
    data = write_aligned(tmp_path / "data", n=1)
    trainer = Trainer(tiny_config(data, tmp_path / "run", holdout=0, ngf=8, lr=1e-3, load_size=256,
                                  precision=precision))
    assert trainer.amp is (precision == "bf16")
    a, b = trainer.train_set[0]
    a, b = a[None], b[None]
    # 20 steps: the last five's mean was 0.33 (fp32) and 0.35 (bf16) of the first five's here.
    losses = [trainer.train_step(a, b)["G_L1"] for _ in range(20)]
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])


def test_the_generator_step_leaves_the_discriminators_gradients_alone(tmp_path):
    """D's weights are frozen while G's loss is built: G's backward pass computes no gradients
    for them (the reference's set_requires_grad), and they train again afterwards."""
    data = write_aligned(tmp_path / "data", n=1)
    trainer = Trainer(tiny_config(data, tmp_path / "run", holdout=0, load_size=256))
    a, b = trainer.train_set[0]
    at_d_step: list[torch.Tensor] = []
    d_step = trainer.opt_D.step

    def spy(*args, **kwargs):
        at_d_step[:] = [p.grad.clone() for p in trainer.D.parameters()]
        return d_step(*args, **kwargs)

    trainer.opt_D.step = spy
    trainer.train_step(a[None], b[None])
    after = [p.grad for p in trainer.D.parameters()]
    assert all(torch.equal(x, y) for x, y in zip(at_d_step, after))
    assert all(p.requires_grad for p in trainer.D.parameters())
    assert all(p.grad is not None for p in trainer.G.parameters())


def test_resumed_run_takes_the_same_next_step(tmp_path):
    data = write_aligned(tmp_path / "data")
    # Uninterrupted: 5 steps (crossing the epoch boundary at 4).
    full = tiny_config(data, tmp_path / "full", max_steps=5)
    train(full)
    # Interrupted after 3 steps, then resumed for 2.
    part = tiny_config(data, tmp_path / "part", max_steps=3)
    train(part)
    train(tiny_config(data, tmp_path / "part", max_steps=2), resume=True)
    assert_same_checkpoint(tmp_path / "full", tmp_path / "part", step=5)


def assert_same_checkpoint(run_a: Path, run_b: Path, step: int) -> None:
    """Both runs' checkpoints are at ``step`` with the same networks and the same optimiser state."""
    a = torch.load(run_a / "checkpoint.pt", weights_only=True)
    b = torch.load(run_b / "checkpoint.pt", weights_only=True)
    assert a["global_step"] == b["global_step"] == step
    for key in ("G", "D"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)
    assert a["opt_G"]["state"][0]["exp_avg"].equal(b["opt_G"]["state"][0]["exp_avg"])


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_stops_training_between_steps_with_a_checkpoint_it_resumes_from(tmp_path, signum):
    """Ctrl-C (or SIGTERM) stopped a run wherever it landed, losing the steps since the last
    checkpoint (500 by default). It now stops before the next step with a checkpoint there, and
    resumes to the same weights as a run never stopped; a second signal stops at once."""
    # Python's own Ctrl-C handler, as in a terminal: a suite started as a background job of a
    # shell without job control inherits SIGINT ignored (see test_cli's Ctrl-C test).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _stop_and_resume(tmp_path, signum)
    finally:
        signal.signal(signal.SIGINT, previous)


def _stop_and_resume(tmp_path: Path, signum: int) -> None:
    data = write_aligned(tmp_path / "data")
    train(tiny_config(data, tmp_path / "full", max_steps=5))

    def signal_at(step: int, times: int = 1):
        def progress(record: dict) -> None:
            if record["step"] == step:
                for _ in range(times):
                    os.kill(os.getpid(), signum)
        return progress

    with pytest.raises(Interrupted, match=r"stopped at step 3 \(3 of epoch 1\), its checkpoint saved"):
        train(tiny_config(data, tmp_path / "part"), progress=signal_at(3))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are given back
    assert torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)["global_step"] == 3
    train(tiny_config(data, tmp_path / "part", max_steps=2), resume=True)
    assert_same_checkpoint(tmp_path / "full", tmp_path / "part", step=5)
    with pytest.raises(KeyboardInterrupt) as twice:  # the second signal does not wait for the step's end
        train(tiny_config(data, tmp_path / "impatient"), progress=signal_at(1, times=2))
    assert not isinstance(twice.value, Interrupted)


def test_fp32_on_the_cpu_trains_contiguous_and_resumes_a_channels_last_run_in_that_layout(tmp_path):
    data = write_aligned(tmp_path / "data")
    cfg = tiny_config(data, tmp_path / "run", max_steps=2)
    assert Trainer(tiny_config(data, tmp_path / "bf16", precision="bf16")).layout == torch.channels_last
    stored = Trainer(tiny_config(data, tmp_path / "bf16int4", precision="bf16", storage_aware="int4"))
    assert stored.layout == torch.contiguous_format  # its rounding groups the weights in contiguous order
    older = Trainer(cfg)  # as runs before session 30 trained: channels_last
    assert older.layout == torch.contiguous_format
    older.layout = torch.channels_last
    older.G.to(memory_format=torch.channels_last)
    older.D.to(memory_format=torch.channels_last)
    older.run()
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert saved["opt_G"]["state"][0]["exp_avg"].is_contiguous(memory_format=torch.channels_last)
    resumed = Trainer(cfg)
    resumed.load_checkpoint()
    for opt, model in ((resumed.opt_G, resumed.G), (resumed.opt_D, resumed.D)):
        for p in model.parameters():
            assert p.is_contiguous() and opt.state[p]["exp_avg"].stride() == p.stride()
            assert opt.state[p]["exp_avg_sq"].stride() == p.stride()
    first = next(resumed.G.parameters())
    assert torch.equal(resumed.opt_G.state[first]["exp_avg"], saved["opt_G"]["state"][0]["exp_avg"])


def test_weight_average_follows_each_step_resumes_and_is_what_the_run_saves(tmp_path):
    data = write_aligned(tmp_path / "data")
    trainer = Trainer(tiny_config(data, tmp_path / "unit", ema_decay=0.9, load_size=256))
    a, b = trainer.train_set[0]
    trainer.global_step = 100  # past the ramp: the decay is 0.9
    before = [p.detach().clone() for p in trainer.G_ema.parameters()]
    trainer.train_step(a[None], b[None])
    after = list(trainer.G_ema.parameters())
    for old, new, p in zip(before, after, trainer.G.parameters()):
        assert torch.allclose(new, 0.9 * old + 0.1 * p, atol=1e-6)
    assert any(not torch.equal(new, p) for new, p in zip(after, trainer.G.parameters()))

    # Interrupted and resumed, the average is the one an uninterrupted run reaches.
    train(tiny_config(data, tmp_path / "full", ema_decay=0.5, max_steps=5))
    train(tiny_config(data, tmp_path / "part", ema_decay=0.5, max_steps=3))
    train(tiny_config(data, tmp_path / "part", max_steps=2), resume=True)
    full = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["G_ema"]
    part = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)["G_ema"]
    assert all(torch.equal(full[k], part[k]) for k in full)

    # The finished run saves and scores the average, and records the trained weights' score too.
    record = train(tiny_config(data, tmp_path / "run", ema_decay=0.5, keep_snapshots=True))
    assert {"val", "val_online"} <= set(record)
    trainer = Trainer(tiny_config(data, tmp_path / "run", ema_decay=0.5))
    trainer.load_checkpoint()
    saved = load_file(tmp_path / "run" / "generator.safetensors")
    ema, online = trainer.G_ema.state_dict(), trainer.G.state_dict()
    assert all(torch.equal(saved[k], ema[k]) for k in saved)
    assert any(not torch.equal(saved[k], online[k]) for k in saved if saved[k].is_floating_point())

    # export-weights --which trained writes the trained weights instead, with their own score.
    out = tmp_path / "trained.safetensors"
    result = CliRunner().invoke(cli, ["export-weights", str(tmp_path / "run"), str(out), "--which", "trained"])
    assert result.exit_code == 0, result.output
    exported = load_file(out)
    assert all(torch.equal(exported[k], online[k]) for k in exported)
    assert "trained weights" in read_spec(out).provenance["weights"]
    assert read_spec(out).provenance["val"] == record["val_online"]
    # Snapshots keep each epoch's trained weights beside the average, with their own score.
    kept = load_file(tmp_path / "run" / "snapshots" / "epoch003.trained.safetensors")
    assert all(torch.allclose(kept[k].float(), online[k].float(), atol=1e-2, rtol=1e-3) for k in kept)
    assert any(not torch.allclose(kept[k].float(), ema[k].float(), atol=1e-2, rtol=1e-3)
               for k in kept if kept[k].is_floating_point())
    kept_spec = read_spec(tmp_path / "run" / "snapshots" / "epoch003.trained.safetensors")
    assert kept_spec.provenance["val"] == record["val_online"] and "trained weights" in kept_spec.provenance["weights"]
    # A run stopped 1 step into its second epoch exports its first epoch's trained weights (with
    # that epoch's BatchNorm statistics), not the checkpoint's, one step further on.
    mid = tmp_path / "mid.safetensors"
    result = CliRunner().invoke(cli, ["export-weights", str(tmp_path / "full"), str(mid), "--which", "trained"])
    assert result.exit_code == 0, result.output
    assert read_spec(mid).provenance["epoch"] == 1
    now = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["G"]
    exported = load_file(mid)
    assert any(not torch.equal(exported[k], now[k]) for k in exported if exported[k].is_floating_point())
    # A run saved before the trained weights had their own file says where else they are.
    (tmp_path / "full" / "trained_generator.safetensors").unlink()
    old = CliRunner().invoke(cli, ["export-weights", str(tmp_path / "full"), str(tmp_path / "old.safetensors"),
                                   "--which", "trained"])
    assert old.exit_code != 0 and "epochNNN.trained.safetensors" in old.stderr
    assert not (tmp_path / "old.safetensors").exists()


def test_epoch_outputs_and_schedule(tmp_path):
    data = write_aligned(tmp_path / "data")
    record = train(tiny_config(data, tmp_path / "run", keep_snapshots=True))
    run = tmp_path / "run"
    assert record["epoch"] == 3
    snapshots = sorted(p.name for p in (run / "snapshots").iterdir())
    assert snapshots == ["epoch001.safetensors", "epoch002.safetensors", "epoch003.safetensors"]
    last, kept = load_file(run / "generator.safetensors"), load_file(run / "snapshots" / "epoch003.safetensors")
    assert all(kept[k].dtype == torch.float16 and torch.allclose(kept[k].float(), last[k], atol=1e-2, rtol=1e-3)
               for k in last if last[k].is_floating_point())
    lines = (run / "history.jsonl").read_text().splitlines()
    assert len(lines) == 3
    assert (run / "samples" / "epoch003.png").is_file()
    assert (run / "best_generator.safetensors").is_file()
    trainer = Trainer(tiny_config(data, run))
    trainer.load_checkpoint()
    # lr constant for 2 epochs, then linear decay: after 3 epochs the factor is 1 - 2/2 = 0.
    assert trainer.opt_G.param_groups[0]["lr"] == pytest.approx(0.0)
    assert set(load_file(run / "generator.safetensors")) == set(UNetGenerator(ngf=4).state_dict())


def test_the_discriminator_learns_at_its_own_rate_on_the_same_schedule_and_it_is_recorded(tmp_path):
    data = write_aligned(tmp_path / "data")
    cfg = tiny_config(data, tmp_path / "run", lr=2e-4, lr_d=5e-5, epochs=1, epochs_decay=1, max_steps=4)
    trainer = Trainer(cfg)
    assert [o.param_groups[0]["lr"] for o in (trainer.opt_G, trainer.opt_D)] == [2e-4, 5e-5]
    assert Trainer(tiny_config(data, tmp_path / "same")).opt_D.param_groups[0]["lr"] == 2e-4  # the recipe
    train(cfg)  # one epoch at the rates, then the decay halves both
    trainer.load_checkpoint()
    assert [o.param_groups[0]["lr"] for o in (trainer.opt_G, trainer.opt_D)] == pytest.approx([1e-4, 2.5e-5])
    assert load_generator(tmp_path / "run" / "generator.safetensors")[1].provenance["settings"]["lr_d"] == 5e-5


def test_finished_run_trains_longer_with_an_extended_schedule(tmp_path, monkeypatch):
    data = write_aligned(tmp_path / "data")
    run = tmp_path / "run"
    train(tiny_config(data, run))  # 2 + 1 epochs: ends at rate 0
    # Only --epochs given: the stored decay (1) is kept, so the run goes on to 4 + 1 epochs,
    # at the full rate again from epoch 4 (factor 1 - max(0, 4 - 4) / 2 = 1).
    seen: list[float] = []
    import geosat2map.train as train_mod

    original = train_mod.Trainer.train_step

    def spy(self, a, b, taught=None):
        seen.append(self.opt_G.param_groups[0]["lr"])
        return original(self, a, b, taught)

    monkeypatch.setattr(train_mod.Trainer, "train_step", spy)
    record = train(tiny_config(data, run), resume=True, schedule=(4, None))
    assert record["epoch"] == 5
    assert seen[0] == pytest.approx(2e-4)
    stored = TrainConfig.from_json(run / "config.json")
    assert (stored.epochs, stored.epochs_decay) == (4, 1)
    assert len((run / "history.jsonl").read_text().splitlines()) == 5


def test_a_fine_tuned_generator_records_what_it_came_from(tmp_path):
    from geosat2map.weights import ModelSpec, load_generator, model_digest, save_generator

    data = write_aligned(tmp_path / "data")
    start = tmp_path / "start.safetensors"
    save_generator(UNetGenerator(ngf=4).eval(), ModelSpec(ngf=4, gsd_m=2.0, provenance={"epoch": 7}), start)
    digest = model_digest(load_generator(start)[0])
    cfg = tiny_config(data, tmp_path / "run", init_from=str(start), epochs=1, epochs_decay=0, load_size=256)
    train(cfg)
    prov = load_generator(tmp_path / "run" / "generator.safetensors")[1].provenance
    assert prov["fine_tuned_from"] == {"file": str(start), "sha256": digest, "provenance": {"epoch": 7}}
    assert prov["settings"]["load_size"] == 256 and prov["settings"]["lambda_l1"] == 100.0
    # The starting file changes (as the shipped default does); a resumed run still names the original.
    save_generator(UNetGenerator(ngf=4).eval(), ModelSpec(ngf=4, gsd_m=2.0), start)
    train(cfg, resume=True, schedule=(2, 0))
    prov = load_generator(tmp_path / "run" / "generator.safetensors")[1].provenance
    assert prov["epoch"] == 2 and prov["fine_tuned_from"]["sha256"] == digest


def test_frozen_batchnorm_trains_on_the_starting_statistics_and_keeps_them(tmp_path):
    from geosat2map.weights import load_generator

    data, start = data_and_start(tmp_path)
    # Two epochs: the first's end-of-epoch scoring must leave BatchNorm frozen for the second.
    cfg = tiny_config(data, tmp_path / "run", init_from=str(start), freeze_batchnorm=True, epochs=1,
                      epochs_decay=1, load_size=256, ema_decay=0.9)
    train(cfg)
    for name in ("generator.safetensors", "trained_generator.safetensors"):
        trained, spec = load_generator(tmp_path / "run" / name)
        trained_bns = [m for m in trained.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert all(torch.equal(m.running_mean, torch.full_like(m.running_mean, 0.25))
                   and torch.equal(m.running_var, torch.full_like(m.running_var, 3.0)) for m in trained_bns)
        assert spec.provenance["settings"]["freeze_batchnorm"] is True
    moved = [not torch.equal(a, b) for a, b in zip(trained.parameters(), load_generator(start)[0].parameters())]
    assert any(moved)
    with pytest.raises(TrainingError, match="--init-from"):
        train(tiny_config(data, tmp_path / "run2", freeze_batchnorm=True))


@pytest.mark.parametrize("no_dropout", [False, True])
def test_no_dropout_trains_the_generator_with_dropout_off_and_is_recorded(tmp_path, monkeypatch, no_dropout):
    from geosat2map.weights import load_generator

    seen = []  # each generator dropout call: whether it dropped (training mode)
    forward = torch.nn.Dropout.forward

    def spy(self, x):
        seen.append(self.training)
        return forward(self, x)

    monkeypatch.setattr(torch.nn.Dropout, "forward", spy)
    data, start = data_and_start(tmp_path)
    # BatchNorm frozen, as the option is used: no re-estimation pass (run in train mode) at epoch ends.
    train(tiny_config(data, tmp_path / "run", init_from=str(start), no_dropout=no_dropout, freeze_batchnorm=True,
                      epochs=1, epochs_decay=1, load_size=256))
    assert any(seen) is not no_dropout  # the recipe drops in its training steps; --no-dropout never does
    trained, spec = load_generator(tmp_path / "run" / "generator.safetensors")
    assert spec.provenance["settings"]["no_dropout"] is no_dropout
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), load_generator(start)[0].parameters()))


def test_storage_aware_training_steps_with_the_stored_rounding_and_saves_what_it_scored(tmp_path, monkeypatch):
    from geosat2map.evaluate import evaluate_generator
    from geosat2map.weights import load_generator, stored_value

    monkeypatch.setattr(weights, "INT8_MIN_ELEMENTS", 1)
    monkeypatch.setattr(weights, "INT4_MIN_ELEMENTS", 4096)  # the test generator's larger convolutions
    data = write_aligned(tmp_path / "data")
    cfg = tiny_config(data, tmp_path / "run", storage_aware="int4", epochs=1, epochs_decay=0, load_size=256)
    trainer = Trainer(cfg)
    conv = trainer.G.encoder[3][1]  # 16 384 weights: coded in 4 bits
    assert conv.weight.numel() >= 4096
    exact = conv.weight.detach().clone()
    seen = []
    hook = conv.register_forward_pre_hook(lambda m, args: seen.append(m.weight.detach().clone()))
    a, b = trainer.train_set[0]
    trainer.train_step(a[None], b[None])
    hook.remove()
    rounded = stored_value(exact, "int4")
    assert not torch.equal(rounded, exact) and torch.equal(seen[0], rounded)  # the step computed with the rounding
    after = conv.weight.detach()  # and the update went to the exact weights, not to the rounded ones
    assert 0 < (after - exact).abs().max() <= 1.01 * cfg.lr and not torch.equal(after, stored_value(after, "int4"))
    trainer.release()

    train(cfg)
    saved = tmp_path / "run" / "generator.safetensors"
    assert load_file(saved)["encoder.3.1.weight" + weights.INT4_SCALE].dtype == torch.float16  # stored in 4 bits
    model, spec = load_generator(saved)
    prov = spec.provenance
    assert prov["settings"]["storage_aware"] == "int4" and prov["val_storage"] == "int4"
    val_set = Trainer(cfg).val_set
    assert prov["val"]["rmse"] == pytest.approx(evaluate_generator(model, val_set, torch.device("cpu"))[0]["rmse"],
                                                rel=1e-6)  # the score is the saved file's own
    exported = tmp_path / "int4.safetensors"  # exported in the storage it trained for: not scored again
    assert CliRunner().invoke(cli, ["export-weights", str(tmp_path / "run"), str(exported), "--int4",
                                    "--which", "latest"]).exit_code == 0
    kept = read_spec(exported).provenance
    assert kept["val"] == prov["val"] and "val_before_storage" not in kept
    assert "as stored): RMSE" in CliRunner().invoke(cli, ["info", str(exported)]).stdout
    # --which unrounded: the same generator at full precision from the checkpoint, which rounds to the file's
    unrounded, rounded_again = tmp_path / "fp32.safetensors", tmp_path / "again.safetensors"
    for path, storage in ((unrounded, []), (rounded_again, ["--int4"])):
        result = CliRunner().invoke(cli, ["export-weights", str(tmp_path / "run"), str(path), "--which", "unrounded",
                                          *storage])
        assert result.exit_code == 0, result.output
    full, again = load_file(unrounded), load_file(rounded_again)
    assert not torch.equal(full["encoder.3.1.weight"], load_generator(saved)[0].state_dict()["encoder.3.1.weight"])
    assert all(torch.equal(again[k], v) for k, v in load_file(saved).items())
    full_model, full_spec = load_generator(unrounded)
    assert full_spec.provenance["val_storage"] == "fp32" and full_spec.provenance["val"]["rmse"] == pytest.approx(
        evaluate_generator(full_model, val_set, torch.device("cpu"))[0]["rmse"], rel=1e-6)
    checkpoint = tmp_path / "run" / "checkpoint.pt"  # a checkpoint past the latest generator holds other weights
    state = torch.load(checkpoint, weights_only=True)
    torch.save({**state, "global_step": state["global_step"] + 1}, checkpoint)
    refused = CliRunner().invoke(cli, ["export-weights", str(tmp_path / "run"), str(tmp_path / "no.safetensors"),
                                       "--which", "unrounded"])
    checkpoint.write_bytes(b"garbage")  # and one cut short or overwritten: one line too
    garbled = CliRunner().invoke(cli, ["export-weights", str(tmp_path / "run"), str(tmp_path / "no.safetensors"),
                                       "--which", "unrounded"])
    for result, phrase in ((refused, "is not at its run's latest generator"), (garbled, "not a readable checkpoint")):
        assert result.exit_code == 1 and phrase in result.stderr and "Traceback" not in result.output
        assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "no.safetensors").exists()
    with pytest.raises(TrainingError, match="int8 or int4"):
        train(tiny_config(data, tmp_path / "run2", storage_aware="fp16"))


def test_quarter_turns_augment_input_and_target_alike_and_are_recorded(tmp_path):
    from geosat2map.datasets import PairDataset
    from geosat2map.weights import load_generator

    a = np.arange(3 * 8 * 8, dtype=np.uint8).reshape(3, 8, 8)  # no symmetry: every turn and mirror differs
    b = 255 - a
    seen = {}
    for rot90 in (False, True):
        ds = PairDataset([(a, b)], ["p"], load_size=8, crop_size=8, seed=0, rot90=rot90)
        outs = []
        for epoch in range(32):
            ds.set_epoch(epoch)
            x, y = ds[0]
            assert torch.allclose(x, -y, atol=1e-6)  # the target turned and mirrored with its input
            outs.append(x)
        seen[rot90] = {tuple(x.flatten().tolist()) for x in outs}
    assert len(seen[False]) == 2  # the recipe: mirrored or not
    assert len(seen[True]) > 4 and seen[False] <= seen[True]  # quarter turns too
    data = write_aligned(tmp_path / "data")
    train(tiny_config(data, tmp_path / "run", rot90=True, epochs=1, epochs_decay=0, load_size=256))
    spec = load_generator(tmp_path / "run" / "generator.safetensors")[1]
    assert spec.provenance["settings"]["rot90"] is True


def test_shift_moves_input_and_target_alike_and_leaves_the_crops_and_flips_as_they_were():
    """--shift: each pair is its whole image moved by up to ``shift`` pixels each way (edges
    mirrored), input and target alike, at the same scale; drawn after the flip, so a run without
    it mirrors the same pairs in the same epochs as before."""
    from geosat2map.model import moved

    img = torch.arange(3 * 10 * 10, dtype=torch.float).reshape(3, 10, 10)
    m = moved(img, 2, -3)  # content 2 pixels down and 3 left
    assert torch.equal(m[:, 2:, :7], img[:, :8, 3:]) and torch.equal(m[:, 0, :7], img[:, 2, 3:])  # top: mirrored
    assert torch.equal(moved(img[None], -1, 4)[0, :, :9, 4:], img[:, 1:, :6]) and moved(img, 0, 0) is img
    a = np.arange(3 * 16 * 16, dtype=np.uint8).reshape(3, 16, 16)
    plain = PairDataset([(a, 255 - a)], ["p"], load_size=16, crop_size=16, seed=0)
    moving = PairDataset([(a, 255 - a)], ["p"], load_size=16, crop_size=16, seed=0, shift=3)
    moves = set()
    for epoch in range(40):
        plain.set_epoch(epoch)
        moving.set_epoch(epoch)
        flip, dy, dx = moving.placement(0)
        assert plain.placement(0) == (flip, 0, 0)
        x, y = moving[0]
        assert torch.allclose(x, -y, atol=1e-6)  # the target moved with its input
        assert torch.equal(x, moved(plain[0][0], dy, dx))
        moves.add((dy, dx))
    assert len(moves) > 10 and max(max(abs(dy), abs(dx)) for dy, dx in moves) == 3
    with pytest.raises(DataError, match="from 0 to 7 pixels, not 8"):
        PairDataset([(a, 255 - a)], ["p"], load_size=16, crop_size=16, shift=8)


def test_recolouring_changes_the_colours_not_the_scene_and_none_at_strength_0():
    """A recolouring keeps the image's layout (a monotone change of its luma where no band clips),
    lands on 8-bit levels in the model's range, and is the identity at its defaults and strength 0."""
    from geosat2map.datasets import to_model_range
    from geosat2map.recolour import Recolouring

    img = to_model_range(torch.from_numpy(synthetic_image(32, 32, seed=3).astype(np.uint8)))
    assert torch.allclose(Recolouring()(img), img, atol=1e-6)
    assert Recolouring.draw(0.0, torch.Generator().manual_seed(1)) == Recolouring()
    gen = torch.Generator().manual_seed(1)
    drawn = [Recolouring.draw(1.0, gen) for _ in range(200)]
    assert 0.9 < min(r.gains[0] for r in drawn) < 0.92 and 1.09 < max(r.gains[0] for r in drawn) < 1.11
    assert max(abs(r.hue) for r in drawn) <= 0.15 and len({r.saturation for r in drawn}) == 200
    luma = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
    gentle = Recolouring(gains=(1.05, 0.97, 1.0), gamma=1.2, brightness=0.9, contrast=0.8, saturation=1.3, hue=0.1)
    out = gentle(img)
    levels = (out + 1) * 127.5
    assert out.shape == img.shape and out.min() >= -1 and out.max() <= 1
    assert torch.allclose(levels, levels.round(), atol=1e-4) and not torch.allclose(out, img, atol=0.05)
    y_in, y_out = (img * luma).sum(0).flatten(), (out * luma).sum(0).flatten()
    order = y_in.argsort()
    assert (y_out[order].diff() > -0.05).all()  # brighter pixels stay brighter (up to rounding and chroma)


def test_colour_jitter_recolours_the_students_input_only_per_item_and_epoch(tmp_path, monkeypatch):
    """--colour-jitter: each input is recoloured as drawn for its item and epoch (a resumed run
    draws the same), its map is left alone, the crops and flips are those of a run without it, and
    a teacher maps the input as it is. Refused out of range, recorded in the saved generator."""
    a = synthetic_image(16, 16, seed=1).astype(np.uint8)
    ds = PairDataset([(a, 255 - a), (a, a)], ["p", "q"], load_size=16, crop_size=16, seed=0, colour_jitter=0.5)
    plain = PairDataset([(a, 255 - a), (a, a)], ["p", "q"], load_size=16, crop_size=16, seed=0)
    x = torch.stack([ds[0][0], ds[1][0]])
    assert torch.equal(x, torch.stack([plain[0][0], plain[1][0]]))  # the dataset's items themselves: as without
    first = ds.recoloured(x, [0, 1])
    assert torch.equal(first, ds.recoloured(x, [0, 1])) and not torch.equal(first[0], first[1])
    ds.set_epoch(1)
    assert not torch.equal(first, ds.recoloured(x, [0, 1]))
    assert torch.equal(plain.recoloured(x, [0, 1]), x)

    monkeypatch.setenv("GEOSAT2MAP_CACHE", str(tmp_path / "cache"))
    data = write_aligned(tmp_path / "data")
    teacher_file = tmp_path / "teacher.safetensors"
    torch.manual_seed(5)
    save_generator(UNetGenerator(ngf=4).eval(), ModelSpec(ngf=4, gsd_m=2.0), teacher_file)
    # load 286: crops change every epoch, so the teacher maps each step's input (not kept maps)
    trainer = Trainer(tiny_config(data, tmp_path / "run", distill_from=str(teacher_file), epochs=1,
                                  epochs_decay=0, colour_jitter=1.0))
    taught_inputs, student_inputs, clean = [], [], []
    trainer.teacher.register_forward_pre_hook(lambda _, args: taught_inputs.append(args[0].clone()))
    batches, step = trainer._batches, trainer.train_step

    def watched_batches():
        for a_, b_, batch in batches():
            clean.append(a_.clone())
            yield a_, b_, batch

    def watched_step(real_a, real_b, taught=None):
        student_inputs.append(real_a.clone())
        return step(real_a, real_b, taught)

    monkeypatch.setattr(trainer, "_batches", watched_batches)
    monkeypatch.setattr(trainer, "train_step", watched_step)
    trainer.run()
    assert len(student_inputs) == len(trainer.train_set) == len(clean)
    assert len(taught_inputs) == len(clean) and all(torch.equal(t, c) for t, c in zip(taught_inputs, clean))
    assert all(not torch.allclose(s, c, atol=0.02) for s, c in zip(student_inputs, clean))
    settings = load_generator(tmp_path / "run" / "generator.safetensors")[1].provenance["settings"]
    assert settings["colour_jitter"] == 1.0
    info = CliRunner().invoke(cli, ["info", str(tmp_path / "run" / "generator.safetensors")])
    assert "inputs recoloured at random (strength 1)" in info.output
    result = CliRunner().invoke(cli, ["train", str(data), "--out", str(tmp_path / "bad"), "--colour-jitter", "1.5"])
    assert result.exit_code == 2 and "--colour-jitter" in result.output and not (tmp_path / "bad").exists()
    with pytest.raises(TrainingError, match="--colour-jitter must be from 0 to 1, not -0.1"):
        train(tiny_config(data, tmp_path / "bad", colour_jitter=-0.1))


def test_a_moved_pair_is_taught_its_teachers_map_moved_with_it(tmp_path, monkeypatch):
    """With --shift the teacher maps each whole pair once (first epoch) and the step's teacher map
    is that map mirrored and moved as the pair is; the setting is refused out of range and
    recorded in the saved generator."""
    from geosat2map.model import FlipAveraged, moved

    monkeypatch.setenv("GEOSAT2MAP_CACHE", str(tmp_path / "cache"))
    data = write_aligned(tmp_path / "data")
    teacher_file = tmp_path / "teacher.safetensors"
    torch.manual_seed(5)
    save_generator(UNetGenerator(ngf=4).eval(), ModelSpec(ngf=4, gsd_m=2.0), teacher_file)
    teacher = FlipAveraged(load_generator(teacher_file)[0].eval())
    trainer = Trainer(tiny_config(data, tmp_path / "run", distill_from=str(teacher_file), epochs=2,
                                  epochs_decay=0, load_size=256, shift=9))
    calls, seen = [], []
    trainer.teacher.register_forward_hook(lambda *_: calls.append(1))
    asked = trainer._teacher_maps

    def watched(batch):
        maps = asked(batch)
        seen.append((batch, [trainer.train_set.placement(i) for i in batch], maps))
        return maps

    monkeypatch.setattr(trainer, "_teacher_maps", watched)
    trainer.run()
    train_pairs = len(trainer.train_set)
    assert len(calls) == train_pairs and len(seen) == 2 * train_pairs  # made in epoch 1, kept for epoch 2
    assert any(dy or dx for _, placements, _ in seen for _, dy, dx in placements)
    with torch.no_grad():
        for batch, placements, maps in seen:
            for i, (mirrored, dy, dx), got in zip(batch, placements, maps):
                whole = teacher(trainer.train_set.whole(i)[0][None])[0].half().float()
                assert torch.allclose(got, moved(whole.flip(-1) if mirrored else whole, dy, dx), atol=2e-3)
    assert load_generator(tmp_path / "run" / "generator.safetensors")[1].provenance["settings"]["shift"] == 9
    info = CliRunner().invoke(cli, ["info", str(tmp_path / "run" / "generator.safetensors")])
    assert info.exit_code == 0 and "pairs moved by up to 9 pixels each way" in info.output
    with pytest.raises(TrainingError, match="--shift must be from 0 to 127 pixels, not 128"):
        train(tiny_config(data, tmp_path / "bad", shift=128))
    result = CliRunner().invoke(cli, ["train", str(data), "--out", str(tmp_path / "bad"), "--shift", "-1"])
    assert result.exit_code == 2 and "--shift" in result.output and not (tmp_path / "bad").exists()
    result = CliRunner().invoke(cli, ["train", str(data), "--out", str(tmp_path / "bad"), "--shift", "200"])
    assert result.exit_code == 1 and "--shift must be from 0 to 127 pixels, not 200" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "bad").exists()


def test_the_teachers_maps_are_made_once_kept_for_the_next_run_and_train_as_if_made_at_every_step(
        tmp_path, monkeypatch):
    """Pairs used whole (load size = crop size), mirrored or not: the teacher runs in the first
    epoch only, the next run with that teacher and those pairs (a chain's next cycle, a resumed
    run) takes its maps from the cache, and both end with the weights of a run that asks the
    teacher at every step. The cache keeps the last two teachers' maps; another teacher, torch
    release or code that makes the maps finds none."""
    monkeypatch.setenv("GEOSAT2MAP_CACHE", str(tmp_path / "cache"))
    data = write_aligned(tmp_path / "data")
    teacher_file = tmp_path / "teacher.safetensors"

    def run(name: str, teacher_seed: int = 5) -> tuple[int, dict, list]:
        torch.manual_seed(teacher_seed)
        save_generator(UNetGenerator(ngf=4).eval(), ModelSpec(ngf=4, gsd_m=2.0), teacher_file)
        torch.manual_seed(0)
        trainer = Trainer(tiny_config(data, tmp_path / name, distill_from=str(teacher_file), epochs=2,
                                      epochs_decay=0, load_size=256, crop_size=256))
        calls = []
        trainer.teacher.register_forward_hook(lambda *_: calls.append(1))
        trainer.run()
        mirrored = []
        for epoch in (0, 1):
            trainer.train_set.set_epoch(epoch)
            mirrored.append([trainer.train_set.placement(i) for i in range(len(trainer.train_set))])
        return len(calls), {k: v.clone() for k, v in trainer.saved_generator.state_dict().items()}, mirrored

    kept_calls, kept, mirrored = run("kept")
    cached_calls, cached, _ = run("cached")
    # A pair mirrored in one epoch and not in the other: its kept map was mirrored for it.
    assert None not in mirrored[0] + mirrored[1]
    assert any(first[0] != second[0] for first, second in zip(*mirrored))
    cache = sorted((tmp_path / "cache").glob("teacher-maps-*.safetensors"))
    assert len(cache) == 1 and cache[0].stat().st_size > 4 * 3 * 256 * 256 * 2  # four pairs' maps, fp16
    train_pairs = 4  # 6 pairs, every 3rd held out
    assert [run(f"other{seed}", seed)[0] for seed in (6, 7)] == [train_pairs] * 2  # other teachers: made again
    assert len(list((tmp_path / "cache").glob("teacher-maps-*.safetensors"))) == 2
    with monkeypatch.context() as m:  # the last run's teacher under another torch release: made again
        m.setattr(torch, "__version__", "0.0.0")
        assert run("other_torch", 7)[0] == train_pairs
    edited = tmp_path / "model.py"  # the code that makes the maps, changed: made again
    edited.write_text(Path(teacher_maps.MAKERS[0]).read_text() + "\n# batched otherwise\n")
    with monkeypatch.context() as m:
        m.setattr(teacher_maps, "MAKERS", (str(edited),))
        assert run("other_code", 7)[0] == train_pairs
    broken = tmp_path / "cache" / "teacher-maps-broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    assert teacher_maps.load_maps(broken) == {}  # made again, not a failed run
    unwritable = teacher_file / "cache" / "teacher-maps-x.safetensors"  # under a file: no folder there
    assert teacher_maps.save_maps(unwritable, {0: torch.zeros(3, 4, 4, dtype=torch.half)}) is False  # the run goes on

    def cut_short(tensors, filename) -> None:  # Ctrl-C while the maps are written
        Path(filename).write_bytes(b"part of the maps")
        raise KeyboardInterrupt

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(teacher_maps, "save_file", cut_short)
        teacher_maps.save_maps(tmp_path / "cache" / "teacher-maps-cut.safetensors", {0: torch.zeros(3, 4, 4)})
    assert not [p.name for p in (tmp_path / "cache").iterdir() if p.name.endswith(".part")]
    monkeypatch.setattr(PairDataset, "placement", lambda self, index: None)  # as a cropped set: no keeping
    asked_calls, asked, _ = run("asked")
    assert (kept_calls, cached_calls, asked_calls) == (train_pairs, 0, 2 * train_pairs)
    for k in kept:
        assert torch.allclose(kept[k].float(), asked[k].float(), atol=1e-6), k
        assert torch.equal(kept[k], cached[k]), k


def test_a_run_stopped_in_its_first_epoch_keeps_the_teachers_maps_made_so_far(tmp_path, monkeypatch):
    """Each checkpoint of the first epoch keeps the teacher's maps made so far in the cache: the
    resumed run asks the teacher only for the pairs it had not reached (not again for the others in
    its second epoch), and ends where a run never stopped ends."""
    data = write_aligned(tmp_path / "data")
    teacher_file = tmp_path / "teacher.safetensors"
    torch.manual_seed(5)
    save_generator(UNetGenerator(ngf=4).eval(), ModelSpec(ngf=4, gsd_m=2.0), teacher_file)
    asked = []
    ask = Trainer._ask_teacher
    monkeypatch.setattr(Trainer, "_ask_teacher", lambda self, real_a: asked.append(len(real_a)) or ask(self, real_a))

    def run(name: str, cache: str, **kw) -> int:
        monkeypatch.setenv("GEOSAT2MAP_CACHE", str(tmp_path / cache))
        asked.clear()
        train(tiny_config(data, tmp_path / name, distill_from=str(teacher_file), epochs=2, epochs_decay=0,
                          load_size=256, crop_size=256, checkpoint_every=1, max_steps=kw.pop("max_steps", None)),
              **kw)
        return sum(asked)

    train_pairs = 4  # 6 pairs, every 3rd held out
    assert run("stopped", "cache", max_steps=2) == 2
    (kept,) = (tmp_path / "cache").glob("teacher-maps-*.safetensors")
    assert len(teacher_maps.load_maps(kept)) == 2  # the two pairs it reached
    assert run("stopped", "cache", resume=True) == train_pairs - 2
    assert sorted(teacher_maps.load_maps(kept)) == list(range(train_pairs))
    assert run("whole", "cache2") == train_pairs
    assert_same_checkpoint(tmp_path / "whole", tmp_path / "stopped", step=2 * train_pairs)


def test_distillation_pulls_towards_the_teachers_flip_average_and_records_the_teacher(tmp_path):
    import torch.nn.functional as F

    from geosat2map.model import FlipAveraged
    from geosat2map.weights import load_generator, model_digest

    data = write_aligned(tmp_path / "data")
    teacher_file = tmp_path / "teacher.safetensors"
    torch.manual_seed(5)
    save_generator(UNetGenerator(ngf=4).eval(), ModelSpec(ngf=4, gsd_m=2.0, provenance={"epoch": 3}), teacher_file)
    teacher = load_generator(teacher_file)[0]
    cfg = tiny_config(data, tmp_path / "run", distill_from=str(teacher_file), distill_weight=0.25, epochs=1,
                      epochs_decay=0, load_size=256)
    trainer = Trainer(cfg)
    trainer._train_mode()
    a, b, _ = next(trainer._batches())
    torch.manual_seed(11)  # the generator's dropout draws the same masks in both passes
    fake = trainer.G(a).detach()
    torch.manual_seed(11)
    losses = trainer.train_step(a, b)
    with torch.no_grad():
        taught = FlipAveraged(teacher.eval())(a)
    assert not torch.allclose(taught, teacher(a))  # the flip average, not one pass
    assert losses["G_L1_teacher"] == pytest.approx(F.l1_loss(fake, taught).item(), rel=1e-4)
    assert losses["G_L1"] == pytest.approx(F.l1_loss(fake, b).item(), rel=1e-4)
    trainer.release()

    train(cfg)
    spec = load_generator(tmp_path / "run" / "generator.safetensors")[1]
    assert spec.provenance["distilled_from"] == {"file": str(teacher_file), "sha256": model_digest(teacher),
                                                 "views": "flip", "provenance": {"epoch": 3}}
    assert spec.provenance["settings"]["distill_weight"] == 0.25
    info = CliRunner().invoke(cli, ["info", str(tmp_path / "run" / "generator.safetensors")])
    assert info.exit_code == 0 and f"distilled from {teacher_file}'s flip-averaged maps" in info.output
    # A teacher that changed under a run would make the rest of it learn something else.
    save_generator(UNetGenerator(ngf=4).eval(), ModelSpec(ngf=4, gsd_m=2.0), teacher_file)
    with pytest.raises(TrainingError, match="teacher .* has changed"):
        train(cfg, resume=True, schedule=(2, 0))
    with pytest.raises(TrainingError, match="distillation weight"):
        train(tiny_config(data, tmp_path / "run2", distill_from=str(teacher_file), distill_weight=0.0))


def test_the_median_of_views_realigns_each_shifted_view_and_is_mirror_symmetric():
    """ViewMedian maps each shifted view back to where it came from: a generator that commutes
    with shifts (a 1 x 1 convolution) gives its own map back from all 18 views, to the edges
    (where a view shifted out is left to the others); and a U-Net's median map of a mirrored
    image is the mirrored median map."""
    from geosat2map.model import ViewMedian

    torch.manual_seed(3)
    x = torch.rand(2, 3, 256, 256) * 2 - 1
    pointwise = torch.nn.Conv2d(3, 3, 1)
    with torch.no_grad():
        assert torch.allclose(ViewMedian(pointwise)(x), pointwise(x), atol=1e-6)
        g = UNetGenerator(ngf=4).eval()
        median = ViewMedian(g)(x)
        assert torch.allclose(ViewMedian(g)(x.flip(-1)), median.flip(-1), atol=1e-5)
        assert not torch.allclose(median, g(x), atol=1e-3)  # the views disagree: not one pass
        assert not torch.isnan(median).any()


def test_distilling_the_median_of_views_trains_towards_it_and_keeps_its_maps_apart(tmp_path, monkeypatch):
    """--distill-views median: the step's teacher map is ViewMedian's, the run records it (config,
    provenance, info), and its kept maps are not the flip-averaged teacher's (another cache file)."""
    import torch.nn.functional as F

    from geosat2map import teacher_maps
    from geosat2map.model import ViewMedian
    from geosat2map.weights import load_generator

    monkeypatch.setenv("GEOSAT2MAP_CACHE", str(tmp_path / "cache"))
    data = write_aligned(tmp_path / "data")
    teacher_file = tmp_path / "teacher.safetensors"
    torch.manual_seed(5)
    save_generator(UNetGenerator(ngf=4).eval(), ModelSpec(ngf=4, gsd_m=2.0), teacher_file)
    teacher = load_generator(teacher_file)[0].eval()
    files = {}
    for views in ("flip", "median"):
        cfg = tiny_config(data, tmp_path / views, distill_from=str(teacher_file), distill_views=views,
                          no_dropout=True, epochs=1, epochs_decay=0, load_size=256)
        trainer = Trainer(cfg)
        trainer._train_mode()
        files[views] = trainer._taught_file
        a, b, _ = next(trainer._batches())
        fake = trainer.G(a).detach()
        losses = trainer.train_step(a, b)
        trainer.release()
    with torch.no_grad():
        taught = ViewMedian(teacher)(a)
    assert losses["G_L1_teacher"] == pytest.approx(F.l1_loss(fake, taught).item(), rel=1e-3)
    assert files["flip"] != files["median"] and files["median"].name.startswith("teacher-maps-")
    train(cfg)
    spec = load_generator(tmp_path / "median" / "generator.safetensors")[1]
    assert spec.provenance["distilled_from"]["views"] == "median"
    assert spec.provenance["settings"]["distill_views"] == "median"
    assert len(teacher_maps.load_maps(files["median"])) == len(trainer.train_set)
    info = CliRunner().invoke(cli, ["info", str(tmp_path / "median" / "generator.safetensors")])
    assert info.exit_code == 0 and f"distilled from {teacher_file}'s median of 18 views" in info.output
    run_info = CliRunner().invoke(cli, ["info", str(tmp_path / "median")])
    assert run_info.exit_code == 0 and "(median of views)" in run_info.output
    with pytest.raises(TrainingError, match="teacher's views are combined as flip or median, not mean"):
        train(tiny_config(data, tmp_path / "bad", distill_from=str(teacher_file), distill_views="mean"))


def test_the_squared_error_term_adds_its_gradient_towards_the_real_and_the_teachers_maps(tmp_path):
    """--lambda-l2 adds lambda_L2 * ((1 - w) * MSE(real map) + w * MSE(teacher's map)) to the
    generator's loss and nothing else: the gradients of two runs that differ only in it differ by
    that term's gradient."""
    import torch.nn.functional as F

    from geosat2map.model import FlipAveraged
    from geosat2map.weights import load_generator

    data = write_aligned(tmp_path / "data")
    teacher_file = tmp_path / "teacher.safetensors"
    torch.manual_seed(5)
    save_generator(UNetGenerator(ngf=4).eval(), ModelSpec(ngf=4, gsd_m=2.0), teacher_file)
    grads, runs = [], []
    for lambda_l2 in (0.0, 50.0):
        cfg = tiny_config(data, tmp_path / f"run{lambda_l2}", distill_from=str(teacher_file), distill_weight=0.25,
                          lambda_l2=lambda_l2, no_dropout=True, load_size=256)
        trainer = Trainer(cfg)
        trainer._train_mode()
        a, b, _ = next(trainer._batches())
        trainer._losses_and_gradients(a, b)
        grads.append([q.grad.clone() for q in trainer.G.parameters()])
        runs.append(trainer)
    trainer = runs[0]
    trainer.G.zero_grad(set_to_none=True)
    with torch.no_grad():
        taught = FlipAveraged(load_generator(teacher_file)[0].eval())(a)
    fake = trainer.G(a)
    (50.0 * (0.75 * F.mse_loss(fake, b) + 0.25 * F.mse_loss(fake, taught))).backward()
    for without, with_l2, q in zip(*grads, trainer.G.parameters()):
        assert torch.allclose(with_l2 - without, q.grad, rtol=1e-3, atol=1e-6)
    assert any(q.grad.abs().max() > 1e-4 for q in trainer.G.parameters())  # the term is not vanishing
    for run in runs:
        run.release()
    with pytest.raises(TrainingError, match="squared-error weight"):
        train(tiny_config(data, tmp_path / "run2", lambda_l2=-1.0))


def test_the_adversarial_weight_scales_its_term_and_zero_skips_the_discriminator(tmp_path):
    """--lambda-gan: G's gradient is the pixel terms' plus lambda_gan times the adversarial
    term's (so 2 adds as much again as 1 does over 0); at 0, D is never run or trained and the
    step reports no adversarial losses."""
    data = write_aligned(tmp_path / "data", n=1)
    grads, reported = [], []
    for weight in (0.0, 1.0, 2.0):
        trainer = Trainer(tiny_config(data, tmp_path / f"run{weight}", lambda_gan=weight, no_dropout=True,
                                      load_size=256, holdout=0))
        trainer._train_mode()
        a, b, _ = next(trainer._batches())
        calls = []
        hook = trainer.D.register_forward_hook(lambda *_: calls.append(1))
        before = [q.detach().clone() for q in trainer.D.parameters()]
        reported.append(trainer._losses_and_gradients(a, b))
        hook.remove()
        grads.append([q.grad.clone() for q in trainer.G.parameters()])
        unchanged = all(torch.equal(x, q) for x, q in zip(before, trainer.D.parameters()))
        assert (len(calls), unchanged) == ((0, True) if weight == 0 else (3, False))
        trainer.release()
    assert set(reported[0]) == {"G_L1"} and set(reported[1]) == {"D", "G_GAN", "G_L1"}
    # Over all of G's gradients: float32's sums leave 0.9 % of the term's part off a straight line
    # here (the output bias sums 65 536 pixels' gradients); a weight not applied would leave all of it.
    def norm(tensors) -> float:
        return float(sum((t.double() ** 2).sum() for t in tensors)) ** 0.5

    term = norm([g1 - g0 for g0, g1 in zip(grads[0], grads[1])])
    bend = norm([g2 - 2 * g1 + g0 for g0, g1, g2 in zip(*grads)])
    assert term > 0.01 and bend < 0.1 * term, (bend, term)
    with pytest.raises(TrainingError, match="adversarial weight"):
        train(tiny_config(data, tmp_path / "bad", lambda_gan=-1.0))


def test_a_lineage_records_each_ancestor_once(tmp_path):
    """A cycle fine-tuned from and taught by the same generator names it twice; a chain of them
    doubled its provenance each time (5.9 MB of JSON after eight cycles). Saved, a repeated
    ancestor keeps its file and sha256 and points to the first record."""
    from geosat2map.weights import RECORDED_ABOVE, load_generator, model_digest

    data = write_aligned(tmp_path / "data")
    previous = tmp_path / "c0.safetensors"
    save_generator(UNetGenerator(ngf=4).eval(), ModelSpec(ngf=4, gsd_m=2.0, provenance={"epoch": 3}), previous)
    sizes = []
    for cycle in range(1, 7):
        trainer = Trainer(tiny_config(data, tmp_path / f"run{cycle}", init_from=str(previous),
                                      distill_from=str(previous), distill_weight=0.5))
        saved = tmp_path / f"c{cycle}.safetensors"
        save_generator(trainer.G, trainer._spec({}), saved)
        trainer.release()
        prov = read_spec(saved).provenance
        digest = model_digest(load_generator(previous)[0])
        assert prov["fine_tuned_from"]["sha256"] == prov["distilled_from"]["sha256"] == digest
        assert prov["distilled_from"]["provenance"] == RECORDED_ABOVE
        sizes.append(len(json.dumps(prov)))
        previous = saved
    first = read_spec(tmp_path / "c1.safetensors").provenance
    assert first["fine_tuned_from"]["provenance"] == {"epoch": 3}  # the first record is whole
    assert sizes[-1] < 2 * sizes[0] * len(sizes)  # grows with the chain's length, not 2 ** length


def test_interrupted_training_says_so_in_one_line(tmp_path):
    """Ctrl-C or SIGTERM during training: the progress bar is closed before the CLI restores its
    stderr, so nothing writes to a closed descriptor afterwards (a traceback at exit, once)."""
    data = write_aligned(tmp_path / "data")
    code = ("import geosat2map.train as t\n"
            "def interrupted(config, resume=False, progress=None, schedule=None):\n"
            "    progress({'epoch': 0, 'step': 1, 'G_L1': 0.1, 'D': 0.5})\n"
            "    raise KeyboardInterrupt\n"
            "t.train = interrupted\n"
            "from geosat2map_cli.main import cli; cli(prog_name='geosat2map')")
    proc = subprocess.run([sys.executable, "-c", code, "train", str(data), "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith("geosat2map: interrupted"), proc.stderr


@pytest.mark.parametrize("stopped", [False, True])
def test_under_torchrun_rank_0_alone_reports(tmp_path, monkeypatch, stopped):
    """Every rank ran the CLI's reporting: two progress bars, two end-of-run lines (each rank's own
    loss), and the same interrupt line twice."""
    import geosat2map.train as train_module

    data = write_aligned(tmp_path / "data")

    def run(config, resume=False, progress=None, schedule=None):
        progress({"epoch": 0, "step": 1, "G_L1": 0.1, "D": 0.5})
        if stopped:
            raise Interrupted("stopped at step 1 (1 of epoch 1), its checkpoint saved")
        return {"epoch": 1, "step": 1, "G_L1": 0.1}

    monkeypatch.setattr(train_module, "train", run)
    said = {}
    for rank in ("0", "1"):
        result = CliRunner().invoke(cli, ["train", str(data), "--out", str(tmp_path / "run")], env={"RANK": rank})
        assert result.exit_code == (130 if stopped else 0), result.output
        said[rank] = result.output  # stdout and stderr
    assert said["1"] == ""
    assert ("stopped at step 1" if stopped else "epoch 1 step 1: L1 0.1000") in said["0"]
    assert "1step [" in said["0"]  # its progress bar


def write_tile_folder(folder: Path, gsd_m: float, train_n: int = 3, val_n: int = 1, size: int = 64) -> Path:
    """A folder laid out as `geosat2map tiles` writes one: SPLIT/sat and SPLIT/map, and a manifest."""
    for split, n in (("train", train_n), ("val", val_n)):
        for kind in ("sat", "map"):
            (folder / split / kind).mkdir(parents=True)
        for i in range(n):
            a = synthetic_image(size, size, seed=100 + i).astype(np.uint8)
            for kind, img in (("sat", a), ("map", a // 64 * 64 + 32)):
                with rasterio.open(folder / split / kind / f"r0c{i}.tif", "w", driver="GTiff", width=size,
                                   height=size, count=3, dtype="uint8") as dst:
                    dst.write(img)
    (folder / "manifest.json").write_text(json.dumps({"gsd_m": gsd_m}))
    return folder


def test_a_set_too_large_for_memory_is_read_pair_by_pair_the_same(tmp_path):
    """Past the memory budget each pair is read again at each use: the same tensors as those kept
    in memory, crops and flips and all (the maps set loaded with a peak of 825 MB instead of 2.9 GB:
    no pair is held at full size)."""
    from geosat2map import datasets

    pairs, names = datasets.load_pairs(write_aligned(tmp_path / "maps"), "all", holdout=0)
    tiles, tile_names = datasets.load_pairs(write_tile_folder(tmp_path / "region", gsd_m=1.0), "all")
    for sources, labels in ((pairs, names), (tiles, tile_names)):
        kept = datasets.PairDataset(sources, labels, 96, 64, seed=3)
        read = datasets.PairDataset(sources, labels, 96, 64, seed=3, in_memory_bytes=0)
        assert kept.kept is not None and read.kept is None and len(kept) == len(read) == len(sources)
        for i in range(len(kept)):
            for x, y in zip(kept[i], read[i]):
                assert torch.equal(x, y)


def test_a_bad_image_fails_when_the_set_is_loaded_not_in_training(tmp_path):
    """Pairs are read when used (past the memory budget), so their files are checked up front."""
    from geosat2map import datasets

    data = write_aligned(tmp_path / "maps")
    (data / "7.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read image .*7.png"):
        datasets.load_pairs(data, "all", holdout=0)
    (data / "7.png").unlink()
    whole = (data / "5.png").read_bytes()
    (data / "5.png").write_bytes(whole[: len(whole) // 2])  # cut short: its header reads, its pixels do not
    pairs, names = datasets.load_pairs(data, "all", holdout=0)
    with pytest.raises(DataError, match=r"cannot read image .*5.png: (?!Read failed)\S"):  # GDAL's reason
        datasets.PairDataset(pairs, names, 96, 64)
    (data / "5.png").write_bytes(whole)
    with rasterio.open(data / "8.tif", "w", driver="GTiff", width=128, height=64, count=3, dtype="uint16") as dst:
        dst.write(np.zeros((3, 64, 128), np.uint16))
    with pytest.raises(DataError, match="8.tif: expected 8-bit images, found uint16"):
        datasets.load_pairs(data, "all", holdout=0)


def test_several_data_folders_are_trained_on_as_one(tmp_path):
    """The user's region (a tiles folder) beside an aligned folder: both splits hold both, each
    name says its folder, and the run records the tiles' resolution and both folders."""
    aligned = write_aligned(tmp_path / "maps")  # 6 images, every 3rd held out: 4 train, 2 val
    tiles = write_tile_folder(tmp_path / "region", gsd_m=0.5)
    result = CliRunner().invoke(cli, ["train", str(aligned), str(tiles), "--out", str(tmp_path / "run"), "--ngf", "4",
                                      "--ndf", "4", "--holdout", "3", "--epochs", "1", "--epochs-decay", "0",
                                      "--device", "cpu", "--precision", "fp32", "--quiet"])
    assert result.exit_code == 0, result.output
    config = TrainConfig.from_json(tmp_path / "run" / "config.json")
    assert config.data == [str(aligned), str(tiles)]
    trainer = Trainer(config)
    assert len(trainer.train_set) == 4 + 3 and len(trainer.val_set) == 2 + 1
    assert trainer.train_set.names[0] == "maps/1.png" and trainer.train_set.names[-1] == "region/train/r0c2.tif"
    assert trainer.spec.gsd_m == 0.5 * 64 / 256  # its 64-pixel tiles, cut at 0.5 m, seen as 256-pixel pairs
    # export-weights scores the stored file again on the run's validation pairs, of both folders
    exported = CliRunner().invoke(cli, ["export-weights", str(tmp_path / "run"), str(tmp_path / "w.safetensors"),
                                        "--which", "latest", "--half"])
    assert exported.exit_code == 0, exported.output
    assert read_spec(tmp_path / "w.safetensors").provenance["val"]["count"] == 3
    described = CliRunner().invoke(cli, ["info", str(tmp_path / "w.safetensors")]).stdout
    assert f"; trained on {aligned}, {tiles} (--json" in described
    scored = CliRunner().invoke(cli, ["evaluate", str(aligned), str(tiles), "--split", "val", "--holdout", "3",
                                      "--weights", str(tmp_path / "w.safetensors"), "--json"])
    assert scored.exit_code == 0, scored.output
    assert json.loads(scored.stdout)["count"] == 3 and json.loads(scored.stdout)["data"] == [str(aligned), str(tiles)]
    other = write_tile_folder(tmp_path / "coarser", gsd_m=2.0)
    mixed, told = tiny_config(tiles, tmp_path / "mixed"), tiny_config(tiles, tmp_path / "told", gsd_m=1.0)
    mixed.data = told.data = [str(tiles), str(other)]
    with pytest.raises(DataError, match="resolutions as 256-pixel pairs .*region at 0.12 m, .*coarser at 0.50 m"):
        Trainer(mixed)
    assert Trainer(told).spec.gsd_m == 1.0


def test_the_resolution_recorded_is_the_one_the_model_sees_the_tiles_at(tmp_path):
    """Tiles of 512 pixels cut at 0.15 m, trained as 256-pixel pairs (validated resized to the crop
    size), show 0.30 m: the run recorded 0.15 m, and translate fed the model a scale twice finer than
    it learned. Trained on 512-pixel crops, they show their own 0.15 m; tiles cut at 0.30 m of 256
    pixels and those of 512 at 0.15 m are the same scale to the model, and train as one."""
    fine = write_tile_folder(tmp_path / "fine", gsd_m=0.15, train_n=1, val_n=0, size=512)
    coarse = write_tile_folder(tmp_path / "coarse", gsd_m=0.30, train_n=1, val_n=0, size=256)
    assert Trainer(tiny_config(fine, tmp_path / "a", holdout=0)).spec.gsd_m == pytest.approx(0.30)
    whole = Trainer(tiny_config(fine, tmp_path / "b", holdout=0, load_size=512, crop_size=512))
    # ... and records its 512-pixel pairs, which evaluate and export's scoring resize pairs to (256 before)
    assert whole.spec.gsd_m == pytest.approx(0.15) and whole.spec.tile_size == 512
    both = tiny_config(fine, tmp_path / "c", holdout=0)
    both.data = [str(fine), str(coarse)]
    assert Trainer(both).spec.gsd_m == pytest.approx(0.30)


def test_info_on_a_run_folder_gives_its_epochs_scores_and_next_step(tmp_path):
    """`geosat2map info RUN` follows a run in the background from its files: epochs done of those
    planned, the last and best held-out scores, how to continue and export it."""
    data = write_aligned(tmp_path / "maps")
    run_dir = tmp_path / "run"
    train(tiny_config(data, run_dir, max_steps=4))  # 4 training pairs: one epoch of 3
    first = json.loads((run_dir / "history.jsonl").read_text())
    result = CliRunner().invoke(cli, ["info", str(run_dir)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"{run_dir}: a training run of width 4 on {data} (--holdout 3): 1 of 3 epochs done"
    assert lines[2] == f"last, the best: epoch 1, step 4: held out RMSE {first['val']['rmse']:.2f}  " \
                       f"acc@5 {first['val']['acc5']:.4f}  acc@10 {first['val']['acc10']:.4f}  " \
                       f"PSNR {first['val']['psnr']:.2f} dB  SSIM {first['val']['ssim']:.4f}"
    secs = first["seconds"]
    assert lines[3] == f"at the recent epochs' pace (about {secs:.0f} s each): about {2 * secs:.0f} s to go"
    assert lines[4] == f"`geosat2map train {data} --out {run_dir} --resume` continues it"
    assert lines[5] == f"`geosat2map export-weights {run_dir} OUT.safetensors` makes a weights file of its best " \
                       "generator"
    with open(run_dir / "history.jsonl", "a") as f:  # a kill while the next epoch's line was written
        f.write('{"epoch": 2, "st')
    described = cli_json(["info", str(run_dir), "--json"])
    assert (described["epochs_done"], described["epochs_planned"], described["unreadable_history_lines"]) == (1, 3, 1)
    assert described["history"] == [first] and described["config"]["ngf"] == 4 and described["resumable"]
    assert described["seconds_to_go"] == pytest.approx(2 * secs)
    assert "1 line(s) of history.jsonl unreadable" in CliRunner().invoke(cli, ["info", str(run_dir)]).stdout
    train(tiny_config(data, run_dir, max_steps=4), resume=True)  # the next epoch's line stands on its own
    resumed = cli_json(["info", str(run_dir), "--json"])
    assert [r["epoch"] for r in resumed["history"]] == [1, 2] and resumed["unreadable_history_lines"] == 1
    assert "under way" not in CliRunner().invoke(cli, ["info", str(run_dir)]).stdout  # checkpoint at an epoch's end
    train(tiny_config(data, run_dir, max_steps=2), resume=True)  # stopped within epoch 3: its checkpoint says where
    assert "epoch 3 under way: 2 of 4 steps at the last checkpoint (step 10)" in \
        CliRunner().invoke(cli, ["info", str(run_dir)]).stdout.splitlines()
    assert cli_json(["info", str(run_dir), "--json"])["checkpoint"] == \
        {"epoch": 2, "step_in_epoch": 2, "global_step": 10}


def test_the_time_to_go_counts_the_epochs_left_at_the_median_pace(tmp_path):
    """An epoch resumed part-way records only its rest (100 s here): the median of the recent
    epochs, not their mean, sets the pace; the checkpoint's part of the epoch under way is done."""
    from geosat2map.run_info import RunInfo

    config = tiny_config(tmp_path, tmp_path / "run", epochs=2, epochs_decay=3)
    history = [{"epoch": e + 1, "step": 986 * (e + 1), "seconds": s} for e, s in enumerate((400.0, 100.0, 410.0))]
    run = RunInfo(tmp_path, config, history, True, position={"epoch": 3, "step_in_epoch": 493, "global_step": 3451})
    assert run.epoch_seconds() == 400.0
    assert run.seconds_to_go() == pytest.approx(1.5 * 400.0)
    assert RunInfo(tmp_path, config, history[:0], False).seconds_to_go() is None  # no epoch timed yet
    config.epochs_decay = 1
    assert run.seconds_to_go() == 0.0  # finished
    # A distilled run's first epoch also made the teacher's maps: timed only while it is the only one.
    config.epochs_decay, config.distill_from = 3, "teacher.safetensors"
    taught = RunInfo(tmp_path, config, [{"epoch": 1, "step": 986, "seconds": 2400.0}, *history[1:]], True)
    assert taught.epoch_seconds() == pytest.approx(255.0) and taught.seconds_to_go() == pytest.approx(2 * 255.0)
    assert RunInfo(tmp_path, config, taught.history[:1], True).epoch_seconds() == 2400.0


def test_existing_run_needs_resume(tmp_path):
    data = write_aligned(tmp_path / "data")
    train(tiny_config(data, tmp_path / "run", max_steps=1))
    with pytest.raises(TrainingError, match="--resume"):
        train(tiny_config(data, tmp_path / "run", max_steps=1))


def test_resume_without_a_run_or_an_out_that_cannot_be_made_is_one_line(tmp_path):
    """--resume of a folder that holds no run (a typo in --out), or whose config is torn."""
    data = write_aligned(tmp_path / "data")
    with pytest.raises(TrainingError, match="holds no training run"):
        train(tiny_config(data, tmp_path / "nosuch", max_steps=1), resume=True)
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "config.json").write_text("{")
    with pytest.raises(TrainingError, match="config.json is unreadable"):
        train(tiny_config(data, tmp_path / "torn", max_steps=1), resume=True)
    for edited, why in (("[1]", "not a JSON object of settings"), ('{"data": "d"}', "it does not say out"),
                        ('{"data": "d", "out": "o", "epochs": "5"}', 'epochs is "5", not a whole number'),
                        ('{"data": ["d", 2], "out": "o"}', 'data is \\["d", 2\\], not a string or a list of strings'),
                        ('{"data": "d", "out": "o", "rot90": 1}', "rot90 is 1, not true or false")):
        (tmp_path / "torn" / "config.json").write_text(edited)  # edited by hand: named, not a traceback
        with pytest.raises(TrainingError, match=f"config.json is unreadable: {why}$"):
            train(tiny_config(data, tmp_path / "torn", max_steps=1), resume=True)
    (tmp_path / "a_file").write_text("")  # and a new run whose --out cannot be a folder
    with pytest.raises(TrainingError, match="cannot create the run folder"):
        train(tiny_config(data, tmp_path / "a_file" / "run", max_steps=1))
    with pytest.raises(TrainingError, match="is a file, not a run folder"):
        train(tiny_config(data, tmp_path / "a_file", max_steps=1))


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """A checkpoint that cannot be written leaves the one before it, no .part, and one line; so
    does a generator file (save_generator's write)."""
    import geosat2map.train as train_module

    data = write_aligned(tmp_path / "data")
    train(tiny_config(data, tmp_path / "run", max_steps=1))
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()

    def full_disk(obj, path) -> None:
        Path(path).write_bytes(b"torn")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")

    monkeypatch.setattr(train_module.torch, "save", full_disk)
    result = CliRunner().invoke(cli, ["train", str(data), "--out", str(tmp_path / "run"), "--resume",
                                      "--max-steps", "2", "--quiet"])
    assert result.exit_code == 1 and result.stderr.strip().splitlines() == [
        f"geosat2map: error: writing {tmp_path / 'run' / 'checkpoint.pt'} failed (disk full?): [enforce fail at "
        "inline_container.cc:603] . unexpected pos 64 vs 0"], result.output
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before
    assert not list((tmp_path / "run").glob("*.part"))
    # The settings a resumed run with a new schedule rewrites: the old ones stay whole.
    settings = (tmp_path / "run" / "config.json").read_text()
    with monkeypatch.context() as patched, pytest.raises(OutputError, match="writing .*config.json failed: No sp"):
        patched.setattr(train_module.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left")))
        train(tiny_config(data, tmp_path / "run", max_steps=2), resume=True, schedule=(3, None))
    assert (tmp_path / "run" / "config.json").read_text() == settings
    assert not list((tmp_path / "run").glob("*.part"))
    monkeypatch.setattr(weights.os, "chmod", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    (tmp_path / "w.safetensors").write_bytes(b"")  # an existing file: its mode is copied, where the write fails here
    with pytest.raises(OutputError, match="writing .*w.safetensors failed: No space left on device"):
        save_generator(UNetGenerator(ngf=4), ModelSpec(ngf=4), tmp_path / "w.safetensors")
    assert not (tmp_path / "w.safetensors.part").exists()
    # and an epoch's sample PNG: GDAL's PNG driver fails on close, as a CPLE_ error
    from rasterio._err import CPLE_AppDefinedError

    from geosat2map import evaluate

    def png_full(path, grid) -> None:
        Path(path).write_bytes(b"torn")
        raise CPLE_AppDefinedError(1, 1, "libpng: Write Error")

    monkeypatch.setattr(evaluate, "_write_png", png_full)
    sample = tmp_path / "samples" / "epoch001.png"
    with pytest.raises(OutputError, match="writing .*epoch001.png failed .*libpng: Write Error"):
        evaluate.write_triplets([(torch.zeros(3, 4, 4),) * 3], sample)
    assert not sample.exists()


def test_corrupt_checkpoint_is_detected_on_resume(tmp_path):
    data = write_aligned(tmp_path / "data")
    train(tiny_config(data, tmp_path / "run", max_steps=1))
    ckpt = tmp_path / "run" / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(TrainingError, match="corrupt"):
        train(tiny_config(data, tmp_path / "run", max_steps=1), resume=True)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    data = write_aligned(tmp_path / "data")
    train(tiny_config(data, tmp_path / "run", max_steps=2))
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    import geosat2map.train as train_mod

    monkeypatch.setattr(train_mod.F, "l1_loss", lambda a, b: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(TrainingError, match="non-finite"):
        train(tiny_config(data, tmp_path / "run", max_steps=2), resume=True)
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before


def test_export_weights_says_why_a_run_has_nothing_to_export(tmp_path):
    data = write_aligned(tmp_path / "data")
    out = tmp_path / "g.safetensors"

    def export(run: Path, *which: str):
        return CliRunner().invoke(cli, ["export-weights", str(run), str(out), *which])

    # Stopped before its first epoch ended: only the checkpoint exists.
    train(tiny_config(data, tmp_path / "early", max_steps=1))
    result = export(tmp_path / "early", "--which", "latest")
    assert result.exit_code != 0 and "has not finished an epoch yet" in result.stderr
    result = export(tmp_path / "data")
    assert result.exit_code != 0 and "is not a training run" in result.stderr
    # Without validation pairs there is no best generator, but the latest exports.
    train(tiny_config(data, tmp_path / "noval", holdout=0, epochs=1, epochs_decay=0))
    result = export(tmp_path / "noval")
    assert result.exit_code != 0 and "--which latest" in result.stderr
    assert "Traceback" not in result.output and not out.exists()
    assert export(tmp_path / "noval", "--which", "latest").exit_code == 0 and out.exists()
    # Stored in fp16, it has no score to keep or redo: the export said "not scored as stored: the
    # run's data folder was not found" and wrote an empty val_before_storage.
    result = export(tmp_path / "noval", "--which", "latest", "--half", "--overwrite")
    assert result.exit_code == 0 and result.output.count("\n") == 1 and "not scored" not in result.output
    assert "val_before_storage" not in read_spec(out).provenance

def test_train_and_evaluate_cli(tmp_path, monkeypatch):
    data = write_aligned(tmp_path / "data")
    run = tmp_path / "run"
    with warnings.catch_warnings():  # no D: no D loss to show, no schedule stepped for it
        warnings.filterwarnings("error", message=".*lr_scheduler.step")
        result = CliRunner().invoke(cli, ["train", str(data), "--out", str(run), "--ngf", "4", "--ndf", "4",
                                          "--epochs", "1", "--epochs-decay", "0", "--holdout", "3", "--gsd", "2.0",
                                          "--lambda-gan", "0", "--quiet", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "val RMSE" in result.stdout
    # --resume takes the stored options; --epochs given with it extends the finished schedule.
    result = CliRunner().invoke(cli, ["train", str(data), "--out", str(run), "--resume", "--epochs", "2",
                                      "--quiet"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("epoch 2 ")
    assert TrainConfig.from_json(run / "config.json").epochs_decay == 0
    assert TrainConfig.from_json(run / "config.json").lambda_gan == 0
    out = tmp_path / "exported.safetensors"
    result = CliRunner().invoke(cli, ["export-weights", str(run), str(out), "--half"])
    assert result.exit_code == 0, result.output
    assert read_spec(out).gsd_m == 2.0
    small = tmp_path / "int8.safetensors"
    monkeypatch.setattr(weights, "INT8_MIN_ELEMENTS", 1)  # the test's generator is too small for the default
    assert CliRunner().invoke(cli, ["export-weights", str(run), str(small), "--int8"]).exit_code == 0
    assert small.stat().st_size < 0.6 * out.stat().st_size
    assert load_file(small)["encoder.1.1.weight"].dtype == torch.int8
    assert load_file(out)["encoder.1.1.weight"].dtype == torch.float16
    tiny = tmp_path / "int4.safetensors"
    monkeypatch.setattr(weights, "INT4_MIN_ELEMENTS", 1)
    assert CliRunner().invoke(cli, ["export-weights", str(run), str(tiny), "--int4"]).exit_code == 0
    assert tiny.stat().st_size < 0.7 * small.stat().st_size
    assert load_file(tiny)["encoder.1.1.weight" + weights.INT4_SCALE].dtype == torch.float16
    # Stored in 4 bits, the file records its own held-out score, the run's fp32 one beside it.
    provenance = read_spec(tiny).provenance
    own = CliRunner().invoke(cli, ["evaluate", str(data), "--weights", str(tiny), "--split", "val",
                                   "--holdout", "3", "--json", "--device", "cpu"])
    own = json.loads(own.stdout)
    assert provenance["val"]["rmse"] == pytest.approx(own["rmse"], rel=1e-6)
    assert provenance["val_before_storage"] == read_spec(run / "best_generator.safetensors").provenance["val"]
    assert provenance["val"]["rmse"] != provenance["val_before_storage"]["rmse"]
    info = CliRunner().invoke(cli, ["info", str(tiny)])
    assert "(2, before storage)" in info.stdout and f"(2, as stored): RMSE {own['rmse']:.2f}" in info.stdout
    # A run whose data folder moved exports unscored, and says so.
    moved = tmp_path / "moved"
    data.rename(moved)
    result = CliRunner().invoke(cli, ["export-weights", str(run), str(tiny), "--int4", "--overwrite"])
    assert result.exit_code == 0 and "not scored as stored" in result.stdout, result.output
    assert "val" not in read_spec(tiny).provenance
    moved.rename(data)
    for flags in (["--half", "--int8"], ["--int8", "--int4"]):
        both = CliRunner().invoke(cli, ["export-weights", str(run), str(tmp_path / "b.safetensors"), *flags])
        assert both.exit_code == 2 and "pass one" in both.stderr and not (tmp_path / "b.safetensors").exists()
    no_average = CliRunner().invoke(cli, ["export-weights", str(run), str(tmp_path / "t.safetensors"),
                                          "--which", "trained"])
    assert no_average.exit_code != 0 and "--which latest" in no_average.stderr
    result = CliRunner().invoke(cli, ["evaluate", str(data), "--weights", str(out), "--split", "val",
                                      "--holdout", "3", "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    assert scores["count"] == 2 and 0 <= scores["acc5"] <= 1 and scores["rmse"] > 0
    assert scores["tta"] is False and 0 < scores["se"]["rmse"] < math.inf  # two pairs: a spread
    text = CliRunner().invoke(cli, ["evaluate", str(data), "--weights", str(out), "--split", "val",
                                    "--holdout", "3", "--device", "cpu"]).stdout
    assert text.startswith("2 pairs of 256 x 256 (mean +- standard error): RMSE ")
    assert f"RMSE {scores['rmse']:.2f} +- {scores['se']['rmse']:.2f}" in text
    one = CliRunner().invoke(cli, ["evaluate", str(data), "--weights", str(out), "--split", "val",
                                   "--holdout", "6", "--device", "cpu"]).stdout
    assert one.startswith("1 pair of 256 x 256 (mean +- standard error): RMSE "), one
    result = CliRunner().invoke(cli, ["evaluate", str(data), "--weights", str(out), "--split", "val",
                                      "--holdout", "3", "--json", "--device", "cpu", "--tta"])
    flipped = json.loads(result.stdout)
    assert flipped["tta"] is True and flipped["count"] == 2 and flipped["rmse"] != scores["rmse"]
    result = CliRunner().invoke(cli, ["evaluate", str(data), "--weights", str(out), "--split", "val",
                                      "--holdout", "3", "--json", "--device", "cpu", "--tta-median"])
    median = json.loads(result.stdout)
    assert median["tta"] == "median" and median["rmse"] not in (scores["rmse"], flipped["rmse"])
    if onnx_available():  # int8: translate --precision int8 --tta-median's engine, near fp32's median
        result = CliRunner().invoke(cli, ["evaluate", str(data), "--weights", str(out), "--split", "val",
                                          "--holdout", "3", "--json", "--tta-median", "--precision", "int8"])
        int8 = json.loads(result.stdout)
        assert int8["tta"] == "median" and int8["rmse"] != median["rmse"]
        assert abs(int8["rmse"] - median["rmse"]) < 1.0
    result = CliRunner().invoke(cli, ["evaluate", str(data), "--map", str(out), "--tta"])
    assert result.exit_code == 2 and "score generators" in result.output


def test_evaluate_against_pairs_each_image_with_itself(tmp_path):
    data = write_aligned(tmp_path / "data")
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_generator(random_generator(seed=1), ModelSpec(ngf=8), first)
    save_generator(random_generator(seed=2), ModelSpec(ngf=8), second)
    common = ["--split", "val", "--holdout", "3", "--device", "cpu"]
    result = CliRunner().invoke(cli, ["evaluate", str(data), "--weights", str(first), "--against", str(second),
                                      "--json", *common])
    assert result.exit_code == 0, result.output
    import json

    compared = json.loads(result.stdout)
    alone = [cli_json(["evaluate", str(data), "--weights", str(w), "--json", *common]) for w in (first, second)]
    for key in ("rmse", "acc5", "ssim"):  # each side scores as evaluate scores it alone
        assert compared["scores"]["weights"][key] == pytest.approx(alone[0][key])
        assert compared["scores"]["against"][key] == pytest.approx(alone[1][key])
        assert compared["difference"][key]["mean"] == pytest.approx(alone[0][key] - alone[1][key])
    assert compared["count"] == 2 and compared["difference"]["rmse"]["count"] == 2
    same = cli_json(["evaluate", str(data), "--weights", str(first), "--against", str(first), "--json", *common])
    assert all(d["mean"] == 0 and d["se"] == 0 and d["better"] == 0 for d in same["difference"].values())
    text = CliRunner().invoke(cli, ["evaluate", str(data), "--weights", str(first), "--against", str(second),
                                    *common])
    assert "difference +- s.e." in text.stdout and "of 2" in text.stdout
    missing = CliRunner().invoke(cli, ["evaluate", str(data), "--against", str(tmp_path / "none.safetensors"),
                                       *common])
    assert missing.exit_code != 0 and "not found" in missing.stderr


def test_evaluate_recolour_scores_the_model_on_inputs_recoloured_that_way(tmp_path):
    """evaluate --recolour NAME: the same figures as a folder whose inputs were recoloured by hand,
    the maps untouched; refused with --map."""
    from geosat2map.recolour import SHIFTS

    data = write_aligned(tmp_path / "data")
    by_hand = tmp_path / "by_hand"
    by_hand.mkdir()
    for png in sorted(data.glob("*.png")):
        with rasterio.open(png) as src:
            pair = src.read()
        a = torch.from_numpy(pair[:, :, :64].copy()).float() / 127.5 - 1
        pair[:, :, :64] = ((SHIFTS["warm"](a) + 1) * 127.5).round().byte().numpy()
        with rasterio.open(by_hand / png.name, "w", driver="PNG", width=128, height=64, count=3,
                           dtype="uint8") as dst:
            dst.write(pair)
    weights_file = tmp_path / "g.safetensors"
    save_generator(random_generator(seed=1), ModelSpec(ngf=8), weights_file)
    common = ["--split", "val", "--holdout", "3", "--device", "cpu", "--weights", str(weights_file), "--json"]
    scored = [cli_json(["evaluate", str(folder), *common, *extra])
              for folder, extra in ((data, ["--recolour", "warm"]), (by_hand, []), (data, []))]
    assert scored[0]["recolour"] == "warm" and "recolour" not in scored[1]
    for key in ("rmse", "acc5", "psnr", "ssim"):
        assert scored[0][key] == pytest.approx(scored[1][key])
    assert scored[0]["rmse"] != pytest.approx(scored[2]["rmse"])
    with_map = CliRunner().invoke(cli, ["evaluate", str(data / "0.png"), "--map", str(data / "1.png"),
                                        "--recolour", "pale"])
    assert with_map.exit_code == 2 and "--recolour" in with_map.output


def test_paired_differences_mean_standard_error_and_wins():
    first = [{"rmse": 10.0, "psnr": 30.0}, {"rmse": 12.0, "psnr": math.inf}, {"rmse": 20.0, "psnr": 20.0}]
    second = [{"rmse": 11.0, "psnr": 29.0}, {"rmse": 11.0, "psnr": 28.0}, {"rmse": 23.0, "psnr": 21.0}]
    d = metrics.paired_differences(first, second)
    assert d["rmse"]["mean"] == pytest.approx(-1.0)  # (-1 + 1 - 3) / 3
    assert d["rmse"]["se"] == pytest.approx(math.sqrt(((0) ** 2 + 2 ** 2 + 2 ** 2) / 2 / 3))
    assert d["rmse"]["better"] == 2  # lower RMSE is better
    assert d["psnr"]["count"] == 2 and d["psnr"]["mean"] == pytest.approx(0.0)  # the infinite pair left out
    assert d["psnr"]["better"] == 1  # higher PSNR is better
    with pytest.raises(ValueError):
        metrics.paired_differences(first, second[:2])
    se = metrics.standard_errors(first)  # of one set's means; the infinite PSNR left out
    assert se["rmse"] == pytest.approx(math.sqrt((16 + 4 + 36) / 2 / 3))  # mean 14
    assert se["psnr"] == pytest.approx(math.sqrt((25 + 25) / 1 / 2))  # mean 25 of two


def test_evaluate_scores_each_map_colour_class(tmp_path):
    """--classes adds, per colour class, its share of the real maps and the generated maps'
    precision, recall and IoU; the other figures are the same as without it."""
    data = write_aligned(tmp_path / "data")
    weights_file = tmp_path / "w.safetensors"
    save_generator(random_generator(seed=1), ModelSpec(ngf=8), weights_file)
    common = ["evaluate", str(data), "--weights", str(weights_file), "--device", "cpu", "--json"]
    plain = cli_json(common)
    scored = cli_json([*common, "--classes"])
    assert {k: scored[k] for k in plain} == plain
    assert list(scored["classes"]) == list(metrics.MAP_CLASSES)
    assert all(set(c) == {"share", "precision", "recall", "iou"} for c in scored["classes"].values())
    text = CliRunner().invoke(cli, [*common[:-1], "--classes"]).stdout.splitlines()
    assert text[1].startswith("class      share  precision recall   IoU") and text[2].startswith("land ")


def test_class_scores_pool_the_pixels_of_every_image():
    water, land = torch.tensor(metrics.MAP_CLASSES["water"]), torch.tensor(metrics.MAP_CLASSES["land"])
    real = torch.empty(3, 4, 4)
    real[:, :, :2], real[:, :, 2:] = water[:, None, None], land[:, None, None]
    made = real.clone()
    made[:, :2, :2] = land[:, None, None] - 10  # half the water painted (nearly) as land
    made[:, 3, 3] = torch.tensor([0.0, 0.0, 0.0])  # a pixel in no class: a label's black
    s = metrics.class_scores([metrics.image_metrics(made, real, classes=True), metrics.image_metrics(real, real, True)])
    assert s["water"] == pytest.approx({"share": 0.5, "precision": 1.0, "recall": 0.75, "iou": 0.75})
    assert s["land"]["recall"] == pytest.approx(15 / 16) and s["land"]["precision"] == pytest.approx(15 / 19)
    assert math.isnan(s["road"]["iou"]) and s["road"]["share"] == 0  # no road in either map


# --- metrics on constructed images ------------------------------------------------------------

def test_rmse_follows_the_maps_protocol():
    a = torch.zeros(3, 256, 256)
    b = torch.full((3, 256, 256), 10.0)
    # sum over channels and pixels of 100, divided by 256^2, is 300.
    assert metrics.rmse(a, b) == pytest.approx(math.sqrt(300))


def test_accuracy_uses_the_largest_channel_difference():
    a = torch.zeros(3, 4, 4)
    b = torch.zeros(3, 4, 4)
    b[0, :2] = 7  # half the pixels off by 7 in one channel only
    assert metrics.accuracy(a, b, 5) == pytest.approx(0.5)
    assert metrics.accuracy(a, b, 10) == pytest.approx(1.0)


def test_psnr_and_ssim_known_values():
    a = torch.zeros(3, 32, 32)
    b = torch.full((3, 32, 32), 255.0)
    assert metrics.psnr(a, b) == pytest.approx(0.0)
    # Flat images: only the luminance term, (2*100*150 + C1) / (100^2 + 150^2 + C1).
    c1 = (0.01 * 255) ** 2
    flat = metrics.ssim(torch.full((3, 32, 32), 100.0), torch.full((3, 32, 32), 150.0))
    assert flat == pytest.approx((30000 + c1) / (32500 + c1))
    noise = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0)) * 255
    assert metrics.ssim(noise, noise) == pytest.approx(1.0)
    assert metrics.ssim(noise, 255 - noise) < -0.5
    assert math.isinf(metrics.psnr(noise, noise))


def test_ssim_equals_the_full_11x11_gaussian_window():
    """The two 1-D passes give the textbook 2-D window's value on a real-looking pair."""
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(3, 48, 48, generator=g) * 255).round()
    y = (0.6 * x + 0.4 * torch.rand(3, 48, 48, generator=g) * 255).round()
    k1 = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5**2))
    k = (torch.outer(k1, k1) / k1.sum() ** 2)[None, None]
    a, b = x.double().unsqueeze(1), y.double().unsqueeze(1)
    mu_a, mu_b = torch.nn.functional.conv2d(a, k), torch.nn.functional.conv2d(b, k)
    saa = torch.nn.functional.conv2d(a * a, k) - mu_a**2
    sbb = torch.nn.functional.conv2d(b * b, k) - mu_b**2
    sab = torch.nn.functional.conv2d(a * b, k) - mu_a * mu_b
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    ref = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (saa + sbb + c2))
    assert metrics.ssim(x, y) == pytest.approx(float(ref.mean()), abs=1e-12)


# --- torchrun -------------------------------------------------------------------------------

@pytest.mark.skipif(not shutil.which("torchrun", path=os.path.dirname(sys.executable)), reason="torchrun not installed")
def test_torchrun_two_cpu_ranks_end_with_identical_weights(tmp_path):
    data = write_aligned(tmp_path / "data", n=4)
    script = tmp_path / "ddp_check.py"
    script.write_text(
        "import sys, torch\n"
        "import torch.distributed as dist\n"
        "from geosat2map.distributed import CrossRankBatchNorm2d\n"
        "from geosat2map.train import TrainConfig, Trainer\n"
        f"cfg = TrainConfig(data={str(data)!r}, out={str(tmp_path / 'run')!r}, ngf=4, ndf=4, holdout=0,\n"
        "                  epochs=2, epochs_decay=0, max_steps=3, checkpoint_every=0, device='cpu', ema_decay=0.5)\n"
        "t = Trainer(cfg)\n"
        "assert any(isinstance(m, CrossRankBatchNorm2d) for m in t.G.modules())\n"
        "t.run()\n"
        "states = [t.G.state_dict(), t.D.state_dict(), t.G_ema.state_dict()]\n"
        "for name, p in [item for state in states for item in state.items()]:\n"
        "    mine = p.detach().float().clone()\n"
        "    other = mine.clone(); dist.broadcast(other, 0)\n"
        "    assert torch.equal(mine, other), name\n"
        "xs = [torch.randn(1, 5, 8, 8, generator=torch.Generator().manual_seed(r)) for r in range(2)]\n"
        "bn = CrossRankBatchNorm2d(5).train()\n"
        "ref = torch.nn.BatchNorm2d(5).train()(torch.cat(xs))[dist.get_rank()]\n"
        "assert torch.allclose(bn(xs[dist.get_rank()])[0], ref, atol=1e-5), 'statistics are not cross-rank'\n"
        f"open({str(tmp_path)!r} + f'/rank{{dist.get_rank()}}.txt', 'w').write(f'steps {{t.global_step}} identical')\n"
        "from geosat2map.distributed import shutdown_distributed\n"
        "t.release()\n"
        "shutdown_distributed()\n"
    )
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(script)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text() == "steps 3 identical"


def test_average_weights_is_the_mean_with_fresh_batchnorm_statistics(tmp_path):
    from geosat2map.average import average_generators
    from geosat2map.errors import WeightsError
    from geosat2map.model import init_weights
    from geosat2map.weights import ModelSpec, load_generator, save_generator

    data = write_aligned(tmp_path / "pairs", n=8)
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        g = UNetGenerator(ngf=4)
        init_weights(g)
        set_batchnorm_statistics(g, 0.1 * seed)  # each snapshot's own, as an ordinary run's epochs have
        paths.append(tmp_path / f"g{seed}.safetensors")
        save_generator(g.eval(), ModelSpec(ngf=4, gsd_m=2.0, provenance={"epoch": seed, "data": str(data)}), paths[-1])
    first, second = (load_generator(p)[0].state_dict() for p in paths)
    model, spec = average_generators(paths, data, recalibration=4, batch=2, holdout=3, device="cpu")
    state = model.state_dict()
    key = next(k for k in state if k.endswith("weight") and state[k].dim() == 4)
    assert torch.allclose(state[key], (first[key] + second[key]) / 2)
    bn_mean = next(k for k in state if k.endswith("running_mean"))
    assert not torch.allclose(state[bn_mean], (first[bn_mean] + second[bn_mean]) / 2)  # re-estimated
    assert torch.isfinite(state[bn_mean]).all() and not model.training
    assert spec.gsd_m == 2.0 and [s["provenance"]["epoch"] for s in spec.provenance["averaged_from"]] == [1, 2]
    assert spec.provenance["val"]["count"] == 3 and spec.provenance["val"]["rmse"] > 0  # every 3rd of 8 pairs
    assert spec.provenance["bn_recalibration"]["crops"] == 4
    every = average_generators(paths, data, batch=2, holdout=3, device="cpu")[1]  # by default, all 5 others
    assert every.provenance["bn_recalibration"]["crops"] == 5
    other = tmp_path / "wide.safetensors"
    save_generator(UNetGenerator(ngf=8), ModelSpec(ngf=8), other)
    with pytest.raises(WeightsError, match="different generator"):
        average_generators([paths[0], other], data, device="cpu")
    finer = tmp_path / "finer.safetensors"  # same width, learned at another scale
    save_generator(load_generator(paths[1])[0], ModelSpec(ngf=4, gsd_m=1.0), finer)
    with pytest.raises(WeightsError, match="one ground sampling distance"):
        average_generators([paths[0], finer], data, device="cpu")
    out = tmp_path / "mean.safetensors"
    args = ["average-weights", *map(str, paths), str(out), "--data", str(data), "--holdout", "3", "--crops", "4",
            "--half", "--load-size", "256"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    averaged = load_generator(out)[1]
    assert averaged.ngf == 4 and averaged.provenance["bn_recalibration"]["load_size"] == 256
    from geosat2map.evaluate import evaluate  # the recorded score is the fp16 file's own

    own = evaluate(out, data, split="val", holdout=3, device="cpu")
    assert averaged.provenance["val"]["rmse"] == pytest.approx(own["rmse"], rel=1e-6)
    assert averaged.provenance["val_storage"] == "fp16"
    info = CliRunner().invoke(cli, ["info", str(out)]).stdout  # its sources, and what they were trained on
    assert f"the mean of 2 generators (g1.safetensors, g2.safetensors), each trained on {data} (" in info, info
    again = CliRunner().invoke(cli, args)
    assert again.exit_code != 0 and "exists" in again.stderr


def test_average_of_frozen_batchnorm_snapshots_keeps_their_statistics(tmp_path):
    """Snapshots of a --freeze-batchnorm run share their statistics, which their weights were
    trained for: the average keeps them instead of re-estimating."""
    from geosat2map.weights import load_generator

    data = write_aligned(tmp_path / "pairs", n=8)
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        g = UNetGenerator(ngf=4)
        set_batchnorm_statistics(g, 0.25, 3.0)
        paths.append(tmp_path / f"g{seed}.safetensors")
        save_generator(g.eval(), ModelSpec(ngf=4, gsd_m=2.0), paths[-1])
    out = tmp_path / "mean.safetensors"
    result = CliRunner().invoke(cli, ["average-weights", *map(str, paths), str(out), "--data", str(data),
                                      "--holdout", "3"])
    assert result.exit_code == 0, result.output
    assert "statistics kept" in result.output
    model, spec = load_generator(out)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.equal(m.running_var, torch.full_like(m.running_var, 3.0)) for m in bns)
    assert "bn_recalibration" not in spec.provenance and spec.provenance["bn_statistics"].startswith("kept")
    # Asked for crops, it re-estimates them anyway.
    again = CliRunner().invoke(cli, ["average-weights", *map(str, paths), str(out), "--data", str(data),
                                     "--holdout", "3", "--crops", "4", "--overwrite"])
    assert again.exit_code == 0 and "re-estimated on 4 crops" in again.output, again.output
    bns = [m for m in load_generator(out)[0].modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert not all(torch.equal(m.running_var, torch.full_like(m.running_var, 3.0)) for m in bns)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_saved_weights_get_the_mode_an_ordinary_write_would(tmp_path):
    """safetensors 0.8 writes through a private (0600) temporary file; other users must be able to
    load a trained model, and an overwritten file keeps its mode."""
    path = tmp_path / "g.safetensors"
    old = os.umask(0o022)
    try:
        save_generator(UNetGenerator(ngf=4), ModelSpec(ngf=4), path)
        assert path.stat().st_mode & 0o777 == 0o644
        path.chmod(0o640)
        save_generator(UNetGenerator(ngf=4), ModelSpec(ngf=4), path)
        assert path.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


def test_fine_tuning_takes_the_generators_width_and_refuses_a_narrower_one(tmp_path):
    """--init-from a width-4 generator with the default --ngf recorded width 64 in config.json
    (while training width 4); a narrower width is refused before the run folder is made."""
    data = write_aligned(tmp_path / "data")
    start = tmp_path / "start.safetensors"
    save_generator(UNetGenerator(ngf=4).eval(), ModelSpec(ngf=4, gsd_m=2.0), start)
    cfg = tiny_config(data, tmp_path / "run", init_from=str(start), max_steps=1, ngf=None)
    train(cfg)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["ngf"] == 4
    with pytest.raises(TrainingError, match="width-4 generator: --ngf can widen it, not narrow it to 3"):
        train(tiny_config(data, tmp_path / "other", init_from=str(start), max_steps=1, ngf=3))
    assert not (tmp_path / "other").exists()


def test_a_widened_generator_computes_what_the_narrow_one_did():
    from geosat2map.model import widen_generator

    torch.manual_seed(0)
    narrow = UNetGenerator(ngf=4)
    init_weights(narrow)
    set_batchnorm_statistics(narrow, 0.25, 3.0)
    wide, fresh = widen_generator(narrow, 6)
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        assert torch.equal(narrow.eval()(x), wide.eval()(x))
    assert sum(p.numel() for p in wide.parameters()) == sum(p.numel() for p in UNetGenerator(ngf=6).parameters())
    # The new channels are live (they get gradients), they only start with no path to the old ones.
    bns = [m for m in wide.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert [len(f) for f in fresh] == [m.num_features - m.num_features * 4 // 6 for m in bns]
    assert wide.encoder[1][1].weight[4:].abs().sum() > 0
    assert wide.decoder[-1][1].weight[:, 4:].abs().sum() == 0  # the skip's new channels into the image
    with pytest.raises(ValueError, match="narrow"):
        widen_generator(wide, 4)


def test_narrowing_a_grown_generator_gives_back_the_one_it_grew_from():
    """Widened, then trained (its old and new channels changed here at random), then narrowed:
    the old channels as trained; untrained, exactly the generator it grew from."""
    from geosat2map.model import narrow_generator, widen_generator

    torch.manual_seed(0)
    narrow = UNetGenerator(ngf=4)
    init_weights(narrow)
    set_batchnorm_statistics(narrow, 0.25, 3.0)
    wide, _ = widen_generator(narrow, 6)
    back = narrow_generator(wide, 4)
    assert all(torch.equal(a, b) for a, b in zip(narrow.state_dict().values(), back.state_dict().values()))
    with torch.no_grad():
        for p in wide.parameters():
            p.add_(torch.randn_like(p))
    back = narrow_generator(wide, 4)
    assert torch.equal(back.encoder[1][1].weight, wide.encoder[1][1].weight[:8, :4])  # level 1: 8 of 12, from 4 of 6
    assert torch.equal(back.decoder[-1][1].weight, wide.decoder[-1][1].weight[torch.tensor([0, 1, 2, 3, 6, 7, 8, 9])])
    assert torch.equal(back.decoder[0][2].running_var, wide.decoder[0][2].running_var[:32])
    with pytest.raises(ValueError, match="cannot narrow a width-6 generator to 8"):
        narrow_generator(wide, 8)


def test_fine_tuning_narrowed_back_to_the_width_it_was_grown_from_resumes_at_it(tmp_path):
    """`train --init-from GROWN --ngf N`, N the width GROWN was grown from; any other narrower
    width is refused, naming the one allowed."""
    from geosat2map.weights import load_generator

    data, start = data_and_start(tmp_path)
    train(tiny_config(data, tmp_path / "wide", init_from=str(start), ngf=6, max_steps=4))  # one epoch
    grown = tmp_path / "wide" / "generator.safetensors"
    with pytest.raises(TrainingError, match="width-6 generator grown from width 4: --ngf can widen it, or narrow "
                                            "it back to 4, not narrow it to 3"):
        train(tiny_config(data, tmp_path / "other", init_from=str(grown), max_steps=1, ngf=3))
    mean = tmp_path / "mean.safetensors"  # a mean of generators grown from width 4 narrows back too
    averaged = CliRunner().invoke(cli, ["average-weights", str(grown), str(grown), str(mean), "--data", str(data),
                                        "--holdout", "3"])
    assert averaged.exit_code == 0, averaged.output
    train(tiny_config(data, tmp_path / "from_mean", init_from=str(mean), ngf=4, max_steps=1))
    assert json.loads((tmp_path / "from_mean" / "config.json").read_text())["narrowed"]
    train(tiny_config(data, tmp_path / "run", init_from=str(grown), ngf=4, max_steps=1, checkpoint_every=1))
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (recorded["ngf"], recorded["narrowed"], recorded["widened"]) == (4, True, False)
    train(tiny_config(data, tmp_path / "run", max_steps=3), resume=True)
    _, spec = load_generator(tmp_path / "run" / "generator.safetensors")
    assert spec.ngf == 4 and spec.provenance["fine_tuned_from"]["narrowed_from_ngf"] == 6
    info = CliRunner().invoke(cli, ["info", str(tmp_path / "run" / "generator.safetensors")])
    assert f"fine-tuned from {grown} (narrowed from width 6)" in info.stdout
    with pytest.raises(TrainingError, match="width-4 generator: --ngf can widen it, not narrow it to 2"):
        train(tiny_config(data, tmp_path / "again", init_from=str(tmp_path / "run" / "generator.safetensors"),
                          max_steps=1, ngf=2))


def test_fine_tuning_at_a_wider_width_grows_the_generator_and_resumes_at_that_width(tmp_path):
    from geosat2map.weights import load_generator

    data, start = data_and_start(tmp_path)
    cfg = tiny_config(data, tmp_path / "run", init_from=str(start), ngf=6, freeze_batchnorm=True, max_steps=2,
                      checkpoint_every=1)
    train(cfg)
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (recorded["ngf"], recorded["widened"]) == (6, True)
    train(tiny_config(data, tmp_path / "run", max_steps=4), resume=True)
    wide, spec = load_generator(tmp_path / "run" / "generator.safetensors")
    assert spec.ngf == 6 and spec.provenance["fine_tuned_from"]["widened_from_ngf"] == 4
    info = CliRunner().invoke(cli, ["info", str(tmp_path / "run" / "generator.safetensors")])
    assert f"fine-tuned from {start} (grown from width 4)" in info.stdout
    bns = [m for m in wide.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    # Old channels keep the frozen statistics; new ones got theirs estimated on training crops.
    assert all(torch.equal(m.running_mean[: m.num_features * 4 // 6], torch.full((m.num_features * 4 // 6,), 0.25))
               for m in bns)
    assert any(not torch.allclose(m.running_var[m.num_features * 4 // 6 :], torch.ones(1)) for m in bns)


def test_a_folder_with_no_training_pairs_is_one_clear_error(tmp_path):
    data = write_aligned(tmp_path / "data", n=1)  # its one image is every 10th: held out for validation
    result = CliRunner().invoke(cli, ["train", str(data), "--out", str(tmp_path / "run"), "--ngf", "4", "--quiet"])
    assert result.exit_code == 1 and "Traceback" not in result.output and not (tmp_path / "run").exists()
    assert result.stderr.strip() == (f"geosat2map: error: no training pairs in {data}: its images all went to "
                                     "validation (--holdout 10) or its train/ folder is empty")


def test_evaluate_scores_a_model_in_the_direction_it_was_trained_in(tmp_path):
    """A map -> aerial model (train --direction BtoA) was scored aerial -> map unless evaluate was
    told again: garbage figures without a word. Its files record the direction, evaluate follows it."""
    from geosat2map.evaluate import evaluate

    data = write_aligned(tmp_path / "data")
    train(tiny_config(data, tmp_path / "run", direction="BtoA", epochs=1, epochs_decay=0))
    weights = tmp_path / "run" / "generator.safetensors"
    assert read_spec(weights).provenance["settings"]["direction"] == "BtoA"
    by_default = evaluate(str(weights), str(data), split="val", holdout=3, device="cpu")
    told = evaluate(str(weights), str(data), split="val", holdout=3, device="cpu", direction="BtoA")
    other_way = evaluate(str(weights), str(data), split="val", holdout=3, device="cpu", direction="AtoB")
    assert by_default["rmse"] == told["rmse"] != other_way["rmse"]


def test_evaluate_says_when_the_pairs_scored_include_pairs_the_model_learned(tmp_path):
    """Scored on --split all of the folder it trained on, or at a --holdout that is not a multiple
    of its own, a model's figures flatter it: a note says so, by the folder's name anywhere in its
    lineage (here a mean of a run fine-tuned from one trained on maps_train); another folder, its
    held-out pairs, or --split train (asked for in so many words) get none."""
    from geosat2map.evaluate import evaluate

    maps = write_aligned(tmp_path / "maps_train", n=4)
    other = write_aligned(tmp_path / "elsewhere", n=4)
    parent = {"data": "../shared/data/maps_train", "settings": {"holdout": 2}}
    child = {"data": str(tmp_path / "tiles"), "fine_tuned_from": {"file": "p", "provenance": parent}}
    weights = tmp_path / "mean.safetensors"
    save_generator(UNetGenerator(ngf=4).eval(), ModelSpec(ngf=4, gsd_m=2.0, provenance={
        "averaged_from": [{"file": "c", "provenance": child}]}), weights)
    said = "the model was trained on a folder named maps_train and held out one pair in 2 (--holdout 2)"
    for data, split, holdout, note in [(maps, "all", 10, True), (maps, "val", 3, True), (maps, "val", 2, False),
                                       (maps, "val", 4, False), (maps, "train", 2, False), (other, "all", 10, False)]:
        result = evaluate(str(weights), str(data), split=split, holdout=holdout, device="cpu")
        assert result["notes"] == ([said + ": these scores include pairs it learned; --split val --holdout 2 scores "
                                    "those alone"] if note else []), (data.name, split, holdout)
    # A tiles folder holds its validation tiles apart: only --split all mixes its training ones in.
    from geosat2map.evaluate import trained_pairs_note

    (tmp_path / "tiles").mkdir()
    (tmp_path / "tiles" / "manifest.json").write_text("{}")
    assert "--split all scores its training tiles too" in trained_pairs_note(weights, tmp_path / "tiles", "all", 10)
    assert trained_pairs_note(weights, tmp_path / "tiles", "val", 10) is None
    # The CLI says it on stderr, as translate's notes; --against's model is asked too.
    shown = CliRunner().invoke(cli, ["evaluate", str(maps), "--weights", str(weights), "--against", str(weights)])
    assert shown.exit_code == 0 and shown.stderr.count(f"note: {said}") == 1, shown.output
    assert "note: the --against model was trained on a folder named maps_train" in shown.stderr
