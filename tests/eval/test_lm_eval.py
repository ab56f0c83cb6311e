"""lm-evaluation-harness smoke test, offline: `pretrain eval --tasks` on a tiny Llama export runs
both shipped tasks, and lm-eval's loglikelihoods equal our own HybridLM's on the same tokens."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re

import numpy as np
import pytest
import torch

from pretrain.cli import main
from pretrain.data import Tokenizer
from pretrain.eval import harness, results_files
from pretrain.eval.local_data import load_task
from pretrain.train.checkpoint import resolve_checkpoint
from tests.eval.conftest import LLAMA, save_checkpoint_on

pytestmark = pytest.mark.usefixtures("one_thread", "eval_cache")
SEQ_LEN = 128
LIMIT = 6


@pytest.fixture(scope="module")
def run(prepared_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval") / "run"
    model, cfg = save_checkpoint_on(prepared_dir, root, LLAMA, seq_len=SEQ_LEN, seed=3)
    return root, model, Tokenizer(prepared_dir / "tokenizer.model")


@pytest.fixture(scope="module")
def cli_results(run, lm_eval_tasks):
    """The results file of `pretrain eval --tasks` (both shipped tasks) and what it printed."""
    root = run[0]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["eval", "--checkpoint", str(root), "--tasks", "kjv_chapter_ppl,kjv_verse_choice",
                     "--limit", str(LIMIT)])
    assert code == 0
    (path,) = results_files(resolve_checkpoint(root), "lm_eval")
    return json.loads(path.read_text()), out.getvalue()


@torch.no_grad()
def logprobs(model, inputs: list[int], targets: list[int], last: int) -> float:
    """Sum of the last ``last`` of log p(targets[i] | inputs[: i + 1]) under our model (one
    forward of ``inputs``, float64 log-softmax)."""
    logits = model(torch.tensor([inputs]))[0].double()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(targets)[:, None])[-last:].sum().item()


def rolling_loglikelihood(model, tok: Tokenizer, text: str, window: int) -> float:
    """The document after one EOS, scored in windows of ``window`` tokens: the first from the
    EOS, each later one predicting the next ``window`` tokens (the last one fewer, with the
    tokens before them as context), as lm-eval's rolling loglikelihood defines it."""
    x = [tok.eos_id] + tok.encode(text)
    n = len(x) - 1
    first = min(window, n)
    total, done = logprobs(model, x[:first], x[1 : first + 1], first), first
    while done < n:
        end = done + min(window, n - done)  # predict x[done + 1 .. end]
        total += logprobs(model, x[end - window : end], x[end - window + 1 : end + 1], end - done)
        done = end
    return total


def test_rolling_perplexity_matches_our_model(run, cli_results):
    _, model, tok = run
    docs = [d["text"] for d in load_task("kjv_chapter_ppl")["test"]][:LIMIT]
    with torch.no_grad():
        lls = [rolling_loglikelihood(model, tok, d, SEQ_LEN) for d in docs]
    assert all(len(tok.encode(d)) > 2 * SEQ_LEN for d in docs)  # several windows each
    words = sum(len(re.split(r"\s+", d)) for d in docs)
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    got = cli_results[0]["results"]["kjv_chapter_ppl"]
    assert got["bits_per_byte,none"] == pytest.approx(-sum(lls) / nbytes / math.log(2), rel=1e-5)
    assert got["word_perplexity,none"] == pytest.approx(math.exp(-sum(lls) / words), rel=1e-4)
    assert cli_results[0]["n-samples"]["kjv_chapter_ppl"]["effective"] == LIMIT


def choice_loglikelihoods(model, tok: Tokenizer, doc: dict) -> list[float]:
    """log p(" " + choice | context) per choice: the context's tokens, then the rest of the
    tokens of the joined text (lm-eval's split), with no EOS in front."""
    context = tok.encode(doc["context"])
    out = []
    for choice in doc["choices"]:
        whole = tok.encode(doc["context"] + " " + choice)
        assert whole[: len(context)] == context
        out.append(logprobs(model, whole[:-1], whole[1:], len(whole) - len(context)))
    return out


def test_multiple_choice_matches_our_model(run, cli_results):
    root, model, tok = run
    docs = list(load_task("kjv_verse_choice")["test"])[:LIMIT]
    ours = [choice_loglikelihoods(model, tok, d) for d in docs]

    # per request: lm-eval's loglikelihood of every choice
    samples = harness.run_lm_eval(root, ["kjv_verse_choice"], limit=2, log_samples=True)["samples"]["kjv_verse_choice"]
    for sample in samples:
        got = [r[0] for r, in sample["resps"]]
        assert got == pytest.approx(ours[int(sample["doc_id"])], rel=1e-5)

    # the accuracies of the CLI run are our model's
    acc = np.mean([np.argmax(o) == d["label"] for o, d in zip(ours, docs)])
    norm = np.mean([np.argmax(np.array(o) / [len(c) for c in d["choices"]]) == d["label"] for o, d in zip(ours, docs)])
    got = cli_results[0]["results"]["kjv_verse_choice"]
    assert (got["acc,none"], got["acc_norm,none"]) == pytest.approx((acc, norm))


def test_cli_table_and_json(run, cli_results, capsys):
    results, printed = cli_results
    assert set(results["results"]) == {"kjv_chapter_ppl", "kjv_verse_choice"} and "samples" not in results
    rows = [line for line in printed.splitlines() if line.startswith("|")]
    assert any("kjv_chapter_ppl" in r and "bits_per_byte" in r for r in rows)
    assert any("kjv_verse_choice" in r and "acc" in r for r in rows)

    assert main(["eval", "--checkpoint", str(run[0]), "--tasks", "kjv_verse_choice", "--limit", "1", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["n-samples"]["kjv_verse_choice"]["effective"] == 1
    # the second evaluation of the checkpoint went to a file of its own; the first one's is intact
    first, second = (json.loads(p.read_text()) for p in results_files(resolve_checkpoint(run[0]), "lm_eval"))
    assert first == results and second == again
