"""Export parity: each native family's export, loaded by transformers' own class, gives our
logits (fp32, max relative error <= 1e-5) and our greedy continuation token for token."""

from __future__ import annotations

import json

import pytest
import torch

from pretrain.cli import main
from pretrain.convert import HF_CLASSES
from tests.convert.conftest import FAMILY_MODELS, relative_error, save_tiny_checkpoint

PROMPT = "And God said, Let there be light"


@pytest.fixture(scope="module", params=sorted(FAMILY_MODELS))
def exported(request, tokenizer_path, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(f"export_{family}")
    model, run = save_tiny_checkpoint(family, root / "run", tokenizer_path)
    out = root / "hf"
    assert main(["convert", str(run), "--to", "hf", str(out), "--max-shard-size", "40KB"]) == 0
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    return family, model, run, out, hf


def test_folder_and_native_class(exported):
    family, _, _, out, hf = exported
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [HF_CLASSES[family]]
    assert config["hidden_size"] == 32 and config["num_hidden_layers"] == 2 and config["vocab_size"] == 256
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["bos_token_id"] == generation["eos_token_id"] == 2
    index = json.loads((out / "model.safetensors.index.json").read_text())  # sharded above 40KB
    assert len(set(index["weight_map"].values())) > 1
    assert type(hf).__name__ == HF_CLASSES[family]  # loaded by AutoModelForCausalLM


def test_logits_match(exported):
    family, model, _, _, hf = exported
    ids = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = model(ids), hf(ids).logits
    err = relative_error(got, ref)
    print(f"{family}: max relative logit error {err:.2e}")
    assert err <= 1e-5, (family, err)


def test_greedy_generate_matches(exported):
    from transformers import AutoTokenizer

    from pretrain.data import Tokenizer
    from pretrain.generate import generate

    family, model, run, out, hf = exported
    ours_tok = Tokenizer(run / "checkpoints" / "step-00000003" / "tokenizer.model")
    hf_tok = AutoTokenizer.from_pretrained(out)
    prompt = hf_tok(PROMPT, return_tensors="pt").input_ids
    # the prompt `pretrain generate` builds: one end-of-document token, then the text
    assert prompt[0].tolist() == [ours_tok.eos_id] + ours_tok.encode(PROMPT)
    new = hf.generate(prompt, max_new_tokens=12, do_sample=False)[0, prompt.shape[1]:].tolist()
    expected = generate(model, prompt[0].tolist(), 12, greedy=True, eos_id=ours_tok.eos_id)
    assert new[: len(expected)] == expected, (new, expected)


def test_cli_greedy_text_matches(tokenizer_path, tmp_path, capsys):
    """`pretrain generate --greedy` on a checkpoint prints what transformers generates from its
    export (the CLI path is the same for every family: one is enough)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, run = save_tiny_checkpoint("llama", tmp_path / "run", tokenizer_path, seed=5)
    out = tmp_path / "hf"
    assert main(["convert", str(run), "--to", "hf", str(out)]) == 0
    assert (out / "model.safetensors").is_file()  # one file below the default shard size
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(run), "--prompt", PROMPT, "--max-new-tokens", "10", "--greedy"]) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    tok = AutoTokenizer.from_pretrained(out)
    prompt = tok(PROMPT, return_tensors="pt").input_ids
    ids = AutoModelForCausalLM.from_pretrained(out).generate(prompt, max_new_tokens=10, do_sample=False)[0]
    assert printed == tok.decode(ids, skip_special_tokens=True)
