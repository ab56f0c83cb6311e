"""A checkpoint whose model differs from the configured one (a changed architecture, or one
written before a field changed the default model) stops the run with one line naming the
parameters and config fields, and writes nothing; it was taken for damage, skipped, and the run
restarted from step 0 over the old checkpoints."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from pretrain.cli import main
from pretrain.config import load_config
from pretrain.train.trainer import train
from tests.conftest import set_args, tiny_overrides

MAC = {"model.layer_pattern": "'mac swa'", "model.titans.n_heads": 2, "model.titans.segment_size": 12,
       "train.max_steps": 4, "checkpoint.interval": 2}


def _snapshot(d: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def _as_written_before_mac_output(step: Path) -> None:
    """Make a step folder look written by the version before model.titans.mac_output existed."""
    config = step / "config.toml"
    config.write_text("".join(line for line in config.read_text().splitlines(True) if "mac_output" not in line))
    manifest = json.loads((step / "manifest.json").read_text())
    manifest["files"]["config.toml"] = config.stat().st_size
    (step / "manifest.json").write_text(json.dumps(manifest))


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_a_mac_run_from_before_the_output_gate_is_kept(small_corpus, prepared_dir, tmp_path, capsys):
    old = tiny_overrides(small_corpus, prepared_dir, tmp_path, **MAC, **{"model.titans.mac_output": "'none'"})
    train(load_config(None, old), log=lambda *_: None)
    for step in (tmp_path / "checkpoints").iterdir():
        _as_written_before_mac_output(step)
    before = _snapshot(tmp_path)

    # its own config now means the gated layer: refused, naming the field, nothing written
    now = tiny_overrides(small_corpus, prepared_dir, tmp_path, **{**MAC, "train.max_steps": 6})
    code, out, err = _run(["train", *set_args(now)], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert 'model.titans.mac_output "none" -> "per_token"' in err and "gate_norm.weight not in the checkpoint" in err
    assert "step-00000004" in err and _snapshot(tmp_path) == before

    # the checkpoint alone still generates: a saved config without the field meant 'none'
    code, out, err = _run(["generate", "--checkpoint", str(tmp_path), "--max-new-tokens", "3"], capsys)
    assert code == 0 and err == ""

    # and the run resumes with the setting it was trained with
    code, out, _ = _run(["train", *set_args(now), "--set", "model.titans.mac_output='none'"], capsys)
    assert code == 0 and "resumed from step 4 " in out


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [("model.d_model", "48", "model.d_model 32 -> 48"),
     ("model.layer_pattern", "'mamba mamba'", 'model.layer_pattern "mamba swa" -> "mamba mamba"')],
)
def test_an_architecture_change_is_refused_not_restarted(small_corpus, prepared_dir, tmp_path, capsys, field, value, named):
    base = tiny_overrides(small_corpus, prepared_dir, tmp_path, **{"train.max_steps": 4})
    train(load_config(None, base), log=lambda *_: None)
    before = _snapshot(tmp_path)
    code, _, err = _run(["train", *set_args(base + [f"{field}={value}", "train.max_steps=6"])], capsys)
    assert code == 2 and err.count("\n") == 1 and named in err and "holds another model" in err, err
    assert _snapshot(tmp_path) == before
