"""Bad input to `pretrain convert`: one line naming the problem, exit code 2, and never a
folder under the output name; a failure mid-write leaves nothing that looks finished."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from pretrain.cli import main
from tests.convert.conftest import save_tiny_checkpoint


def _one_line_exit_2(capsys, argv, *named):
    capsys.readouterr()  # what came before (the fixture's export)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("pretrain convert: error: "), err
    for word in named:
        assert word in err, (word, err)
    return err


@pytest.fixture
def exported(tokenizer_path, tmp_path):
    _, run = save_tiny_checkpoint("mamba", tmp_path / "run", tokenizer_path)
    assert main(["convert", str(run), "--to", "hf", str(tmp_path / "hf")]) == 0
    return run, tmp_path / "hf"


def test_export_refusals(capsys, tokenizer_path, tmp_path, exported):
    from pretrain.models import build_model
    from pretrain.train.checkpoint import save_checkpoint
    from pretrain.train.optim import build_optimizer
    from tests.convert.conftest import model_config

    run, hf = exported
    # a hybrid (Samba-style) pattern has no native class
    cfg = model_config("mamba", 256)
    cfg.model.layer_pattern, cfg.model.ffn = "mamba swa", "mlp"
    model = build_model(cfg.model)
    save_checkpoint(tmp_path / "hybrid" / "checkpoints", 1, model, build_optimizer(model, cfg.optim, torch.device("cpu")),
                    {"data": {"consumed_samples": 0}}, cfg.to_toml(), tokenizer_path, 1)
    _one_line_exit_2(capsys, ["convert", str(tmp_path / "hybrid"), "--to", "hf", str(tmp_path / "o1"), "--native-only"],
                     "model.layer_pattern", "no native transformers class")
    # a Mamba stack with an FFN in every block: MambaForCausalLM has none
    cfg.model.layer_pattern = "mamba"
    model = build_model(cfg.model)
    save_checkpoint(tmp_path / "ffn" / "checkpoints", 1, model, build_optimizer(model, cfg.optim, torch.device("cpu")),
                    {"data": {"consumed_samples": 0}}, cfg.to_toml(), tokenizer_path, 1)
    _one_line_exit_2(capsys, ["convert", str(tmp_path / "ffn"), "--to", "hf", str(tmp_path / "o0"), "--native-only"],
                     "FFNs mlp", "no native transformers class")
    # a checkpoint saved without its tokenizer
    _, bare = save_tiny_checkpoint("llama", tmp_path / "bare", None)
    _one_line_exit_2(capsys, ["convert", str(bare), "--to", "hf", str(tmp_path / "o2")], "tokenizer.model is missing")
    # a folder that is no checkpoint
    (tmp_path / "empty").mkdir()
    _one_line_exit_2(capsys, ["convert", str(tmp_path / "empty"), "--to", "hf", str(tmp_path / "o3")],
                     "no complete checkpoint")
    # an existing output folder is never overwritten
    _one_line_exit_2(capsys, ["convert", str(run), "--to", "hf", str(hf)], "already exists")
    # a shard size transformers cannot read, an output whose parent is a file
    _one_line_exit_2(capsys, ["convert", str(run), "--to", "hf", str(tmp_path / "o4"), "--max-shard-size", "banana"],
                     "--max-shard-size", "'banana'")
    (tmp_path / "afile").write_text("")
    _one_line_exit_2(capsys, ["convert", str(run), "--to", "hf", str(tmp_path / "afile" / "o5")], "cannot create")
    assert not any(p.name.startswith(("o0", "o1", "o2", "o3", "o4")) for p in tmp_path.iterdir())


def test_interrupt_while_loading_is_an_interrupt_not_a_damaged_checkpoint(monkeypatch, tmp_path, exported):
    """DCP wraps a Ctrl-C during the read into its CheckpointException; the user must see
    'interrupted' (exit 130), not 'cannot be loaded'."""
    from torch.distributed.checkpoint.api import CheckpointException

    import pretrain.train.checkpoint as ckpt

    def interrupted(*args, **kwargs):
        raise CheckpointException("load failed", {0: (KeyboardInterrupt(), None)})

    monkeypatch.setattr(ckpt, "_dcp", interrupted)
    run, _ = exported
    assert main(["convert", str(run), "--to", "hf", str(tmp_path / "o6")]) == 130
    assert not (tmp_path / "o6").exists()


def test_import_refusals(capsys, tmp_path, exported):
    _, hf = exported
    _one_line_exit_2(capsys, ["convert", str(tmp_path / "run"), "--from", "hf", str(tmp_path / "o1")],
                     "config.json is missing")
    no_tok = tmp_path / "no_tok"
    shutil.copytree(hf, no_tok)
    (no_tok / "tokenizer.model").unlink()
    (no_tok / "tokenizer.json").unlink()  # a tokenizer.json alone is imported (test_import_tokenizer_json.py)
    _one_line_exit_2(capsys, ["convert", str(no_tok), "--from", "hf", str(tmp_path / "o2")], "tokenizer.model")
    other = tmp_path / "gpt2"
    shutil.copytree(hf, other)
    (other / "config.json").write_text(json.dumps({**json.loads((hf / "config.json").read_text()), "model_type": "gpt2"}))
    _one_line_exit_2(capsys, ["convert", str(other), "--from", "hf", str(tmp_path / "o3")], "'gpt2'", "supported")
    biased = tmp_path / "biased"
    shutil.copytree(hf, biased)
    (biased / "config.json").write_text(json.dumps({**json.loads((hf / "config.json").read_text()), "use_bias": True}))
    _one_line_exit_2(capsys, ["convert", str(biased), "--from", "hf", str(tmp_path / "o4")], "projection biases")
    # weights missing a tensor (transformers would silently initialise it at random)
    from safetensors.torch import load_file, save_file

    partial = tmp_path / "partial"
    shutil.copytree(hf, partial)
    weights = load_file(partial / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "norm_f" not in k}, partial / "model.safetensors", {"format": "pt"})
    _one_line_exit_2(capsys, ["convert", str(partial), "--from", "hf", str(tmp_path / "o5")], "backbone.norm_f.weight")
    assert not any(p.name.startswith(("o1", "o2", "o3", "o4", "o5")) for p in tmp_path.iterdir())


def test_failure_mid_export_leaves_no_folder(monkeypatch, tmp_path, exported):
    import pretrain.convert.export as export

    run, _ = exported

    def fail(*args, **kwargs):  # after the weights and tokenizer files are written
        raise OSError("disk full")

    monkeypatch.setattr(export.shutil, "copyfile", fail)
    with pytest.raises(OSError, match="disk full"):
        export.export_hf(run, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]  # no out, no out.tmp-*


def test_failure_mid_import_leaves_no_folder(monkeypatch, tmp_path, exported):
    import pretrain.train.checkpoint as ckpt
    from pretrain.convert import import_hf

    _, hf = exported
    written = []

    def fail(root, *args, **kwargs):
        written.append(sorted(p.name for p in root.parent.iterdir()))  # config and tokenizer already there
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_checkpoint", fail)
    with pytest.raises(OSError, match="disk full"):
        import_hf(hf, tmp_path / "out")
    assert written == [["config.toml", "tokenizer.model"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]
