"""Atomic DCP checkpoints: round trip, pruning, partial writes and damaged files skipped; the
checks that refuse a resume under a changed data order."""

import dataclasses

import pytest
import torch
from torch import nn

from pretrain.config import ConfigError, load_config
from pretrain.data import read_meta
from pretrain.train import checkpoint as ckpt
from pretrain.train import resume_checks
from tests.conftest import data_overrides


def _model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt


def _train(model, opt, steps: int):
    for _ in range(steps):
        loss = model(torch.randn(5, 6)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()


def _save(root, step, model, opt, keep_last=5):
    return ckpt.save_checkpoint(root, step, model, opt, {"data": {"consumed_samples": step * 4}},
                                "[run]\n", None, keep_last)


def test_round_trip_restores_model_optimizer_rng(tmp_path):
    model, opt = _model_and_optimizer(0)
    _train(model, opt, 3)
    _save(tmp_path, 3, model, opt)
    after_save = torch.rand(4)  # the RNG stream right after the save

    other, other_opt = _model_and_optimizer(1)
    state = ckpt.resume_latest(tmp_path, other, other_opt)
    assert state["step"] == 3 and state["data"] == {"consumed_samples": 12}
    assert torch.equal(torch.rand(4), after_save)
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)
    for p, q in zip(model.parameters(), other.parameters()):
        sa, sb = opt.state[p], other_opt.state[q]
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
        assert float(sa["step"]) == float(sb["step"]) == 3
    # Continuing both gives bitwise the same parameters.
    torch.manual_seed(7)
    _train(model, opt, 2)
    torch.manual_seed(7)
    _train(other, other_opt, 2)
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)


def test_keep_last_and_partial_writes_are_ignored(tmp_path):
    model, opt = _model_and_optimizer(0)
    for step in (1, 2, 3):
        _train(model, opt, 1)
        _save(tmp_path, step, model, opt, keep_last=2)
    assert [p.name for p in ckpt.complete_steps(tmp_path)] == ["step-00000003", "step-00000002"]
    # A write killed midway leaves a .tmp folder: never taken for a checkpoint.
    (tmp_path / "step-00000009.tmp").mkdir()
    assert ckpt.complete_steps(tmp_path)[0].name == "step-00000003"
    _save(tmp_path, 4, model, opt, keep_last=2)
    assert not (tmp_path / "step-00000009.tmp").exists()


def test_truncated_and_corrupt_checkpoints_are_skipped(tmp_path):
    model, opt = _model_and_optimizer(0)
    _train(model, opt, 1)
    _save(tmp_path, 1, model, opt)
    reference = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, 1)
    _save(tmp_path, 2, model, opt)
    _train(model, opt, 1)
    _save(tmp_path, 3, model, opt)

    # step 3: a shard cut short; step 2: same size, garbage bytes (the manifest cannot see it).
    shard3 = next((tmp_path / "step-00000003").glob("*.distcp"))
    shard3.write_bytes(shard3.read_bytes()[:-10])
    shard2 = next((tmp_path / "step-00000002").glob("*.distcp"))
    shard2.write_bytes(b"\x00" * shard2.stat().st_size)

    reports = []
    fresh, fresh_opt = _model_and_optimizer(1)
    state = ckpt.resume_latest(tmp_path, fresh, fresh_opt, report=reports.append)
    assert state["step"] == 1
    assert len(reports) == 2
    assert "step-00000003" in reports[0] and "bytes" in reports[0]
    assert "step-00000002" in reports[1] and "cannot be loaded" in reports[1]
    for a, b in zip(reference, fresh.parameters()):
        assert torch.equal(a, b)


def test_nothing_to_resume(tmp_path):
    model, opt = _model_and_optimizer(0)
    assert ckpt.resume_latest(tmp_path / "absent", model, opt) is None


def test_resume_check_skips_damaged_steps_and_stops_on_a_refusal(tmp_path):
    model, opt = _model_and_optimizer(0)
    for step in (1, 2, 3):
        _train(model, opt, 1)
        _save(tmp_path, step, model, opt)
    config = tmp_path / "step-00000003" / "config.toml"
    config.write_bytes(b"\xff" * config.stat().st_size)  # same size: only reading it tells

    reports = []
    fresh, fresh_opt = _model_and_optimizer(1)
    state = ckpt.resume_latest(tmp_path, fresh, fresh_opt, report=reports.append, check=ckpt.read_saved_config)
    assert state["step"] == 2 and len(reports) == 1 and "config.toml is unreadable" in reports[0]

    def refuse(path):
        ckpt.read_saved_config(path)
        raise ConfigError(f"data.seq_len: refused for {path.name}")

    untouched, untouched_opt = _model_and_optimizer(1)
    with pytest.raises(ConfigError, match="step-00000002"):  # step 3 skipped, step 2 refused: no fallback to 1
        ckpt.resume_latest(tmp_path, untouched, untouched_opt, report=lambda _: None, check=refuse)
    reference, _ = _model_and_optimizer(1)
    for a, b in zip(reference.parameters(), untouched.parameters()):
        assert torch.equal(a, b)


def test_prepared_data_check(tmp_path, small_corpus, prepared_dir):
    cfg = load_config(None, data_overrides(small_corpus, prepared_dir))
    meta = read_meta(prepared_dir)
    model, opt = _model_and_optimizer(0)
    data = {"data": {"consumed_samples": 8}}
    path = ckpt.save_checkpoint(tmp_path, 1, model, opt, {**data, "prepared_data": resume_checks.prepared_data_record(meta)},
                                cfg.to_toml(), None, 5)
    resume_checks.check_prepared_data(path, cfg, meta)
    one_dataset = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, weights=[3.0]))
    resume_checks.check_prepared_data(path, one_dataset, meta)  # a single dataset: any weight is the same blend

    entry = meta["datasets"][0]
    shorter = {**meta, "datasets": [{**entry, "tokens": {**entry["tokens"], "train": entry["tokens"]["train"] - 1}}]}
    with pytest.raises(ConfigError, match=r"^data\.dir: .*step-00000001.*train_tokens") as err:
        resume_checks.check_prepared_data(path, cfg, shorter)
    assert "\n" not in str(err.value)
    # A checkpoint from before the record was saved has nothing to compare the data with.
    legacy = ckpt.save_checkpoint(tmp_path, 2, model, opt, data, cfg.to_toml(), None, 5)
    resume_checks.check_prepared_data(legacy, cfg, shorter)
