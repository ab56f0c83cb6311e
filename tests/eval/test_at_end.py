"""eval.at_end in a tiny training run, and the one-line errors (exit 2) of bad eval input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pretrain.cli import main
from pretrain.eval import results_files
from pretrain.train.checkpoint import resolve_checkpoint
from tests.conftest import set_args, tiny_overrides
from tests.eval.conftest import LLAMA, save_checkpoint_on

pytestmark = pytest.mark.usefixtures("one_thread", "eval_cache", "lm_eval_tasks")

LLAMA_SETS = {
    "model.layer_pattern": "'attn'", "model.ffn": "'mlp'", "model.tie_embeddings": "false",
    "model.attention.n_kv_heads": 1, "data.seq_len": 128, "train.max_steps": 4, "train.eval_interval": 0,
    "checkpoint.interval": 0,
}


def test_at_end_logs_the_evaluation(small_corpus, prepared_dir, tmp_path, capsys):
    run = tmp_path / "run"
    overrides = tiny_overrides(small_corpus, prepared_dir, run, **LLAMA_SETS, **{
        "eval.at_end": "true", "eval.tasks": "['kjv_chapter_ppl', 'kjv_verse_choice']", "eval.limit": 2,
    })
    assert main(["train", *set_args(overrides)]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final, evaluated = records[-2], records[-1]
    assert evaluated["step"] == final["step"] == 4
    # the validation split scored again from the checkpoint: the trainer's own last validation
    assert evaluated["eval/val_loss"] == pytest.approx(final["val_loss"], rel=1e-5)
    step = resolve_checkpoint(run)
    (path,) = results_files(step, "perplexity")
    saved = json.loads(path.read_text())
    assert evaluated["eval/bits_per_byte"] == saved["bits_per_byte"] > 0
    (path,) = results_files(step, "lm_eval")
    lm_eval = json.loads(path.read_text())["results"]
    assert evaluated["eval/kjv_chapter_ppl/bits_per_byte"] == lm_eval["kjv_chapter_ppl"]["bits_per_byte,none"]
    assert 0 <= evaluated["eval/kjv_verse_choice/acc"] <= 1
    assert all(math.isfinite(v) for k, v in evaluated.items() if k.startswith("eval/"))
    assert "kjv_verse_choice" in capsys.readouterr().out  # the table, on the terminal


def one_line_error(capsys, *names: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(n in err for n in names), err
    return err


def test_unknown_task_fails_before_training(small_corpus, prepared_dir, tmp_path, capsys):
    run = tmp_path / "run"
    overrides = tiny_overrides(small_corpus, prepared_dir, run, **LLAMA_SETS, **{
        "eval.at_end": "true", "eval.tasks": "['kjv_verse_choice', 'no_such_task']",
    })
    assert main(["train", *set_args(overrides)]) == 2
    one_line_error(capsys, "eval.tasks", "'no_such_task'")
    assert not run.exists()


@pytest.mark.parametrize("sets, names", [
    ({"eval.limit": -1}, ["eval.limit"]),
    ({"eval.tasks": "['a,b']"}, ["eval.tasks"]),
])
def test_bad_eval_fields(small_corpus, prepared_dir, tmp_path, capsys, sets, names):
    assert main(["train", *set_args(tiny_overrides(small_corpus, prepared_dir, tmp_path / "run", **sets))]) == 2
    one_line_error(capsys, *names)


def test_eval_bad_input(prepared_dir, tmp_path, capsys):
    missing = tmp_path / "missing"
    assert main(["eval", "--checkpoint", str(missing)]) == 2
    one_line_error(capsys, str(missing))
    assert main(["eval", "--checkpoint", str(missing), "--tasks", "kjv_verse_choice"]) == 2
    one_line_error(capsys, str(missing))

    save_checkpoint_on(prepared_dir, tmp_path / "run", LLAMA)
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--tasks", "kjv_verse_choice,nope"]) == 2
    one_line_error(capsys, "--tasks", "'nope'")
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--limit", "-1", "--tasks", "kjv_verse_choice"]) == 2
    one_line_error(capsys, "--limit")
    assert not (tmp_path / "run" / "eval").exists()

    (tmp_path / "run" / "eval").write_text("")  # a file where the results folder goes
    assert main(["eval", "--checkpoint", str(tmp_path / "run")]) == 2
    one_line_error(capsys, "results folder")
    (tmp_path / "run" / "eval").unlink()
    (state,) = (tmp_path / "run" / "checkpoints").glob("step-*/train_state.json")
    for damaged in ("{}", '{"step": "x"}', "[3]"):
        state.write_text(damaged)
        assert main(["eval", "--checkpoint", str(tmp_path / "run")]) == 2
        one_line_error(capsys, "train_state.json")


def test_eval_refuses_options_it_would_ignore(prepared_dir, tmp_path, capsys):
    """Each option that would be silently ignored, or a device this torch cannot use, is one
    line and exit 2 before anything is read or written."""
    run = tmp_path / "run"
    save_checkpoint_on(prepared_dir, run, LLAMA)
    cases = [
        (["--limit", "3"], ["--limit", "--tasks"]),
        (["--tasks", "kjv_verse_choice", "--samples", "4"], ["--samples"]),
        (["--tasks", ""], ["--tasks"]),
        (["--tasks", " , "], ["--tasks"]),
        (["--device", "bogus"], ["--device", "'bogus'"]),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], ["--device", "CUDA"]))
    for extra, names in cases:
        assert main(["eval", "--checkpoint", str(run), *extra]) == 2, extra
        one_line_error(capsys, *names)
    assert not (run / "eval").exists()
