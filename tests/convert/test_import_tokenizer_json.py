"""Import of Hugging Face checkpoints whose tokenizer is only a ``tokenizer.json`` (byte-level
BPE, as Mamba's GPT-NeoX tokenizer and Llama-3's): the run folder carries it, training resumes
with it, it encodes as transformers does, export writes it back unchanged, and bits per byte
counts its bytes exactly."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from pretrain.cli import main
from tests.conftest import run_cli, set_args
from tests.convert.conftest import relative_error

EOS = "<|endoftext|>"
VOCAB = 300
"""Tokenizer size: the 256 byte-level characters, the EOS and a few dozen merges."""
MODEL_VOCAB = 320
"""Padded above the tokenizer's size, as real checkpoints do (Mamba: 50277 tokens, 50280 rows)."""
SAMPLE = "In the beginning  God created\nthe heaven — naïve café, 日本語 🙂 and\tthe earth.\n"


def _byte_level_bpe(texts: list[str], specials: list[str]):
    """A GPT-NeoX-style byte-level BPE ``tokenizers.Tokenizer`` trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


@pytest.fixture(scope="module")
def corpus_texts(small_corpus) -> list[str]:
    return [json.loads(line)["text"] for line in small_corpus.read_text().splitlines()[:8]]


@pytest.fixture(scope="module")
def bpe(corpus_texts):
    return _byte_level_bpe(corpus_texts, [EOS])


def _hf_folder(family: str, out, bpe, with_eos: bool = True):
    """A tiny transformers model of ``family`` saved with save_pretrained, beside the byte-level
    tokenizer as transformers saves it (tokenizer.json + tokenizer_config.json), or, without
    ``with_eos``, a bare tokenizer.json with no EOS anywhere."""
    import transformers

    tiny = {"vocab_size": MODEL_VOCAB, "hidden_size": 32, "num_hidden_layers": 2}
    configs = {
        "llama": transformers.LlamaConfig(**tiny, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                                          rms_norm_eps=1e-5, max_position_embeddings=64,
                                          rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
        "mamba": transformers.MambaConfig(**tiny, state_size=4, expand=2, conv_kernel=4, time_step_rank=3),
    }
    torch.manual_seed(0)
    model = getattr(transformers, type(configs[family]).__name__.replace("Config", "ForCausalLM"))(configs[family])
    with torch.no_grad():  # norms, D and biases away from their constant inits
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.rand_like(p) * 0.5)
    model.save_pretrained(out)
    if with_eos:
        transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, bos_token=EOS).save_pretrained(out)
    else:
        bpe.save(str(out / "tokenizer.json"))
    return model.eval()


@pytest.mark.parametrize("family", ["mamba", "llama"])
def test_import_with_tokenizer_json_matches_transformers(family, bpe, tmp_path, capsys):
    from pretrain.config import load_config
    from pretrain.train.checkpoint import load_for_inference

    hf = _hf_folder(family, tmp_path / "hf", bpe)
    assert not (tmp_path / "hf" / "tokenizer.model").exists()
    assert main(["convert", str(tmp_path / "hf"), "--from", "hf", str(tmp_path / "run")]) == 0
    cfg, model, tok = load_for_inference(tmp_path / "run")
    assert tok.name == "tokenizer.json"
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the run folder and its checkpoint
        original = (tmp_path / "hf" / name).read_bytes()
        assert (tmp_path / "run" / name).read_bytes() == original
        assert (tok.parent / name).read_bytes() == original
    data_tokenizer = load_config(tmp_path / "run" / "config.toml").data.tokenizer
    assert data_tokenizer == str((tmp_path / "run" / "tokenizer.json").resolve())
    ids = torch.randint(0, MODEL_VOCAB, (2, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        err = relative_error(model(ids), hf(ids).logits)
    print(f"import {family} with tokenizer.json: max relative logit error {err:.2e}")
    assert err <= 1e-5, (family, err)
    if family == "mamba":  # `pretrain generate` reads the run's tokenizer.json
        capsys.readouterr()
        argv = ["generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "naïve 日本", "--max-new-tokens", "4"]
        assert main([*argv, "--greedy"]) == 0
        assert capsys.readouterr().out.startswith("naïve 日本")


def test_tokenizer_json_encodes_as_transformers(bpe, corpus_texts, tmp_path):
    from transformers import AutoTokenizer

    from pretrain.data import Tokenizer

    _hf_folder("mamba", tmp_path / "hf", bpe)
    theirs = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = Tokenizer(tmp_path / "hf" / "tokenizer.json")
    texts = [SAMPLE, " leading space", "", corpus_texts[3][:500]]
    for text in texts:
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == theirs.decode(ids) == text  # byte-level BPE round-trips any text
    assert ours.encode_batch(texts) == [ours.encode(t) for t in texts]
    with_eos = ours.encode(SAMPLE) + [ours.eos_id]
    assert ours.decode(with_eos) == theirs.decode(with_eos)
    assert ours.eos_id == ours.bos_id == theirs.eos_token_id == theirs.convert_tokens_to_ids(EOS)
    assert ours.vocab_size == len(theirs)
    assert ours.piece(ours.eos_id) == EOS


def test_token_bytes_add_up_to_the_text(bpe, corpus_texts, tmp_path):
    """Bits per byte's byte count of a JSON tokenizer: per document, the tokens' bytes sum to
    the UTF-8 size of the text, multi-byte characters split across tokens included."""
    from pretrain.data import Tokenizer
    from pretrain.eval.perplexity import hf_token_bytes, label_bytes

    _hf_folder("mamba", tmp_path / "hf", bpe)
    tok = Tokenizer(tmp_path / "hf" / "tokenizer.json")
    nbytes, prefixed = hf_token_bytes(tmp_path / "hf" / "tokenizer.json")
    assert nbytes.shape == (tok.vocab_size,) and not prefixed.any()
    docs = [SAMPLE, corpus_texts[0][:300], "🙂🙂 ü"]
    stream = [tok.eos_id] + [i for d in docs for i in tok.encode(d) + [tok.eos_id]]
    assert any("\ufffd" in tok.decode([i]) for i in stream)  # a token holding part of a character
    ids = torch.tensor(stream[:-1]).view(1, -1)
    labels = torch.tensor(stream[1:]).view(1, -1)
    assert label_bytes(ids, labels, nbytes, prefixed, tok.eos_id) == sum(len(d.encode("utf-8")) for d in docs)


def test_train_resumes_from_tokenizer_json_import(small_corpus, bpe, tmp_path):
    """`pretrain train OUT/config.toml` prepares the data with the imported tokenizer.json,
    resumes step 0 (its first loss is the imported weights' loss on that batch) and trains 2
    steps; the checkpoint carries the tokenizer, and export writes it back unchanged."""
    from pretrain.config import load_config
    from pretrain.data import Tokenizer
    from pretrain.data.loader import PackedLoader
    from pretrain.data.meta import prepared_datasets, read_meta
    from pretrain.train.checkpoint import load_for_inference

    _hf_folder("mamba", tmp_path / "hf", bpe)
    out = tmp_path / "imported"
    data = [f"data.sources=['{small_corpus}']", "data.seq_len=32", "data.valid_fraction=0.05", "data.num_workers=1"]
    assert main(["convert", str(tmp_path / "hf"), "--from", "hf", str(out), *set_args(data)]) == 0
    _, imported, _ = load_for_inference(out)
    train = ["train.max_steps=2", "train.log_interval=1", "train.global_batch_size=2", "train.micro_batch_size=2",
             "train.eval_interval=0", "optim.warmup_steps=0", "checkpoint.interval=1", "logging.wandb='disabled'",
             "logging.progress='off'", "logging.plot=false"]
    proc = run_cli(["train", str(out / "config.toml"), *set_args(train)], timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from step 0" in proc.stdout + proc.stderr
    step2 = out / "checkpoints" / "step-00000002"
    assert (step2 / "tokenizer.json").read_bytes() == (tmp_path / "hf" / "tokenizer.json").read_bytes()
    assert not (step2 / "tokenizer.model").exists()

    cfg = load_config(out / "config.toml")
    meta = read_meta(cfg.data.dir)
    tok = Tokenizer(tmp_path / "hf" / "tokenizer.json")
    assert (meta["tokenizer"], meta["eos_id"], meta["vocab_size"]) == ("tokenizer.json", tok.eos_id, tok.vocab_size)
    # the prepared tokens are the HF tokenizer's: the first document, re-encoded here
    first_doc = json.loads(small_corpus.read_text().splitlines()[0])["text"]
    from pretrain.data.indexed import open_dataset

    shard = open_dataset(str(next((out / "data").rglob("train.bin")).with_suffix("")))
    assert shard[0].tolist() == tok.encode(first_doc) + [tok.eos_id]

    records = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    logged = next(r["loss"] for r in records if r.get("step") == 1 and "loss" in r)
    loader = PackedLoader(prepared_datasets(cfg.data.dir, "train", None), seq_len=32, seed=cfg.train.seed,
                          global_batch_size=2, micro_batch_size=2, dp_rank=0, dp_size=1)
    batch = loader.next_step()[0]
    with torch.no_grad():
        logits = imported(batch["input_ids"], position_ids=batch["position_ids"])
    expected = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten()).item()
    assert logged == pytest.approx(expected, rel=1e-4), (logged, expected)

    # bits per byte counts the bytes of the decoded validation text (ASCII here: no character
    # is cut at a row's edge, so decoding each row whole is an exact reference)
    from pretrain.data import validation_batches
    from pretrain.eval.perplexity import perplexity

    scores = perplexity(step2, samples=4)
    text_bytes = sum(
        len(tok.decode([t for t in row.tolist() if t != tok.eos_id]).encode("utf-8"))
        for batch in validation_batches(cfg.data.dir, 32, 4, cfg.train.micro_batch_size, 0, 1)
        for row in batch["labels"]
    )
    assert scores["bytes"] == text_bytes > 0, (scores, text_bytes)

    assert main(["convert", str(step2), "--to", "hf", str(tmp_path / "back")]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "back" / name).read_bytes() == (tmp_path / "hf" / name).read_bytes()
    assert not (tmp_path / "back" / "tokenizer.model").exists()


def test_tokenizer_json_without_eos_is_one_line_exit_2(capsys, corpus_texts, tmp_path):
    no_eos = _byte_level_bpe(corpus_texts, [])
    _hf_folder("mamba", tmp_path / "hf", no_eos, with_eos=False)
    capsys.readouterr()
    code = main(["convert", str(tmp_path / "hf"), "--from", "hf", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("pretrain convert: error: "), err
    assert "end-of-sequence" in err and "tokenizer.json" in err, err
    assert not (tmp_path / "out").exists()
