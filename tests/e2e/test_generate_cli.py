"""`pretrain generate` at the edges of every sampling flag: the limiting behaviour, or one line
and exit code 2; never a traceback or a NaN passed to the sampler."""

from __future__ import annotations

import pytest
import torch

from pretrain.cli import main
from tests.conftest import run_cli, tiny_overrides


@pytest.fixture(scope="module")
def checkpoint(small_corpus, prepared_dir, tmp_path_factory):
    from pretrain.config import load_config
    from pretrain.train.trainer import train

    run_dir = tmp_path_factory.mktemp("gen_run")
    extra = {"train.max_steps": 3, "checkpoint.interval": 0, "train.eval_interval": 0, "logging.plot": "false"}
    train(load_config(None, tiny_overrides(small_corpus, prepared_dir, run_dir, **extra)), log=lambda *_: None)
    return str(run_dir)


def _generate(capsys, checkpoint, *flags):
    code = main(["generate", "--checkpoint", checkpoint, "--prompt", "And God said", "--max-new-tokens", "6", *flags])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--temperature", "-1"], "--temperature"),
        (["--temperature", "nan"], "--temperature"),
        (["--top-p", "1.5"], "--top-p"),
        (["--top-p", "-0.5"], "--top-p"),
        (["--top-k", "-1"], "--top-k"),
        (["--max-new-tokens", "-1"], "--max-new-tokens"),
        (["--num-samples", "0"], "--num-samples"),
        (["--seed", str(2**70)], "--seed"),
    ],
)
def test_out_of_range_flags_exit_2_with_one_line(capsys, checkpoint, flags, named):
    code, out, err = _generate(capsys, checkpoint, *flags)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"pretrain generate: error: {named}: ")


def test_limits_equal_greedy(capsys, checkpoint):
    code, greedy, _ = _generate(capsys, checkpoint, "--greedy")
    assert code == 0 and greedy.strip()
    for flags in (["--temperature", "1e-30"], ["--temperature", "0"], ["--top-p", "0"], ["--top-k", "1"],
                  ["--temperature", "1e-300", "--top-k", "100000", "--top-p", "1"]):
        assert _generate(capsys, checkpoint, *flags)[:2] == (0, greedy), flags


def test_other_edges_run(capsys, checkpoint):
    code, out, err = _generate(capsys, checkpoint, "--temperature", "inf", "--top-k", "100000")
    assert code == 0 and out.strip() and err == ""
    code, out, _ = _generate(capsys, checkpoint, "--max-new-tokens", "0")
    assert (code, out) == (0, "And God said\n")
    code, out, _ = _generate(capsys, checkpoint, "--max-new-tokens", "0", "--prompt", "Unicorn 🦄 said")
    assert (code, out) == (0, "Unicorn 🦄 said\n")  # not the unknown-piece mark of the decoded prompt
    # an empty prompt starts a new document (the end-of-document token alone)
    assert main(["generate", "--checkpoint", checkpoint, "--prompt", "", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().err == ""
    long_prompt = "In the beginning God created the heaven and the earth. " * 12  # > data.seq_len=32
    code = main(["generate", "--checkpoint", checkpoint, "--prompt", long_prompt, "--max-new-tokens", "4"])
    out, err = capsys.readouterr()
    assert code == 0 and out.startswith("In the beginning")
    assert err.count("\n") == 1 and "longer than the 32-token sequences" in err


def test_nan_logits_exit_2_naming_the_cause(capsys, checkpoint, monkeypatch):
    import pretrain.train.checkpoint as ckpt

    real = ckpt.load_for_inference

    def poisoned(path, device="cpu"):
        cfg, model, tok = real(path, device)
        with torch.no_grad():
            model.norm.weight.fill_(float("nan"))  # the final norm: every logit is NaN
        return cfg, model, tok

    monkeypatch.setattr(ckpt, "load_for_inference", poisoned)
    code, out, err = _generate(capsys, checkpoint)
    assert code == 2 and out == "" and err.count("\n") == 1 and "logits: contain NaN" in err


def test_a_real_process_exits_2_without_a_traceback(checkpoint):
    result = run_cli(["generate", "--checkpoint", checkpoint, "--top-p", "2"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "pretrain generate: error: --top-p: must be in [0, 1] (0: the most likely token; 1: no cut), got 2.0"
