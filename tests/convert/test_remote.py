"""Remote-code export parity: every family without a native transformers class (and a native
one forced with --remote-code) exports a folder that transformers loads with
trust_remote_code=True in a process where `pretrain`, `kernels` and `triton` cannot be imported,
and that folder gives our logits (fp32, max relative error <= 1e-5) and our greedy continuation
(`pretrain generate --greedy`'s function) token for token."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pretrain.cli import main
from tests.convert.conftest import perturb_, relative_error

PROMPT = "And God said, Let there be light"
NEW_TOKENS = 8

_SAMBAY = ["mamba", "swa", "mamba_mem", "attn_kv", "gmu", "xattn"]
REMOTE_MODELS = {
    "samba": {"layer_pattern": "mamba swa", "attention": {"n_heads": 4, "window": 5}, "mamba": {"d_state": 4}},
    "sambay": {"n_layers": 6, "layer_pattern": _SAMBAY, "tie_embeddings": False,
               "attention": {"n_heads": 4, "n_kv_heads": 2, "window": 5, "pos_encoding": "none"}, "mamba": {"d_state": 4}},
    "sambay_diff_mamba2": {"n_layers": 6, "layer_pattern": ["mamba2", "diff_swa", "mamba2_mem", "diff_attn_kv", "gmu", "diff_xattn"],
                           "attention": {"n_heads": 4, "n_kv_heads": 2, "window": 5},
                           "mamba2": {"d_state": 8, "head_dim": 8, "n_groups": 2, "chunk_size": 4}},
    "yoco_gla": {"n_layers": 4, "layer_pattern": ["gla_mem", "attn_kv", "gmu", "xattn"], "gla": {"n_heads": 2, "chunk_size": 4},
                 "attention": {"n_heads": 4}},
    "gla": {"layer_pattern": "gla", "gla": {"n_heads": 2, "chunk_size": 4, "gate_low_rank": 4}},
    **{f"titans_{v}": {"layer_pattern": v, "attention": {"n_heads": 4, "window": 6},
                       "titans": {"n_heads": 2, "chunk_size": 4, "segment_size": 8, "n_persistent": 2}}
       for v in ("mac", "mag", "mal")},
    "rmoe": {"layer_pattern": "attn:moe_gru", "moe": {"n_experts": 4, "top_k": 2, "expert_hidden": 16, "router_hidden": 8}},
    "mix": {"n_layers": 4, "layer_pattern": "mamba:moe_gru gla:mlp swa:moe_gru attn:mlp", "attention": {"n_heads": 4, "window": 5},
            "mamba": {"d_state": 4}, "gla": {"n_heads": 2, "chunk_size": 4}, "moe": {"n_experts": 4, "router_hidden": 8}},
    # a native family, exported with --remote-code
    "llama_remote": {"layer_pattern": "attn", "tie_embeddings": False, "attention": {"n_heads": 4, "n_kv_heads": 2}},
}
"""Our [model] sections of every non-native family: Samba, SambaY (Mamba, and Mamba-2 with
differential attention), a GLA-memory YOCO, GLA, Titans MAC/MAG/MAL, RMoE and a mix; windows
and chunks shorter than the inputs."""


def _config(name: str):
    from pretrain.config import config_from_dict

    model = {"vocab_size": 256, "d_model": 32, "n_layers": 2, "norm_eps": 1e-5, "init_std": 0.2, "ffn": "mlp",
             **REMOTE_MODELS[name]}
    return config_from_dict({"model": model, "data": {"seq_len": 32}, "run": {"dir": "unused"}})


def _save_checkpoint(name: str, root: Path, tokenizer: Path):
    """A random model of ``name`` (vector parameters moved off their constant init), saved by
    the trainer's checkpoint writer; (model in eval mode, run folder)."""
    from pretrain.models import build_model
    from pretrain.train.checkpoint import save_checkpoint
    from pretrain.train.optim import build_optimizer

    cfg = _config(name)
    torch.manual_seed(0)
    model = perturb_(build_model(cfg.model))
    optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))
    save_checkpoint(root / "checkpoints", 3, model, optimizer, {"data": {"consumed_samples": 0}}, cfg.to_toml(), tokenizer,
                    keep_last=1)
    return model.eval(), root


_LOADER = textwrap.dedent('''
    import importlib.abc, json, sys

    BLOCKED = ("pretrain", "kernels", "triton")

    class Gate(importlib.abc.MetaPathFinder):
        """The only meta path finder: our packages and triton look absent (find_spec None,
        import ModuleNotFoundError); everything else goes to the original finders."""

        def __init__(self, finders):
            self.finders = finders

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                return None
            for finder in self.finders:
                spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
                if spec is not None:
                    return spec
            return None

        def find_distributions(self, *args, **kwargs):  # importlib.metadata asks the meta path too
            for finder in self.finders:
                if hasattr(finder, "find_distributions"):
                    yield from finder.find_distributions(*args, **kwargs)

        def invalidate_caches(self):
            for finder in self.finders:
                if hasattr(finder, "invalidate_caches"):
                    finder.invalidate_caches()

    sys.meta_path[:] = [Gate(list(sys.meta_path))]
    for name in BLOCKED:
        try:
            __import__(name)
        except ImportError:
            pass
        else:
            raise SystemExit(f"the blocker let {name} through")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    job = json.load(open(sys.argv[1]))
    results = {}
    for name, folder in job["folders"].items():
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(folder)
        prompt = tok(job["prompt"], return_tensors="pt").input_ids
        ids = torch.tensor(job["ids"])
        with torch.no_grad():
            logits = model(ids).logits
            loss = model(ids, labels=ids, use_cache=False).loss
        steps = []  # (tokens fed, id of the cache passed in) per forward of generate()
        hook = model.register_forward_pre_hook(
            lambda m, args, kw: steps.append((kw["input_ids"].shape[1], id(kw.get("cache")))), with_kwargs=True)
        new = model.generate(prompt, max_new_tokens=job["new_tokens"], do_sample=False, use_cache=True)
        hook.remove()
        results[name] = {"logits": logits, "loss": loss, "prompt": prompt[0].tolist(), "new": new[0, prompt.shape[1]:].tolist(),
                         "class": type(model).__module__ + "." + type(model).__name__,
                         "fed": [n for n, _ in steps], "caches": len({c for _, c in steps[1:]})}
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("pretrain", "kernels", "triton"))
    torch.save({"results": results, "leaked": leaked}, job["out"])
''')


@pytest.fixture(scope="module")
def loaded(tokenizer_path, tmp_path_factory):
    """Every family exported by the CLI, then loaded and run in one blocked subprocess."""
    root = tmp_path_factory.mktemp("remote")
    models, folders = {}, {}
    for name in REMOTE_MODELS:
        model, run = _save_checkpoint(name, root / name / "run", tokenizer_path)
        out = root / name / "hf"
        extra = ["--remote-code"] if name == "llama_remote" else ["--max-shard-size", "40KB"] if name == "mix" else []
        assert main(["convert", str(run), "--to", "hf", str(out), *extra]) == 0
        models[name], folders[name] = model, str(out)
    ids = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(1))
    job = {"folders": folders, "prompt": PROMPT, "ids": ids.tolist(), "new_tokens": NEW_TOKENS, "out": str(root / "out.pt")}
    (root / "job.json").write_text(json.dumps(job))
    (root / "loader.py").write_text(_LOADER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # PRETRAIN_KERNELS=triton would make our own dispatch raise (no triton here): the bundled one ignores it
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(root / "modules"), TRANSFORMERS_VERBOSITY="error",
               PRETRAIN_KERNELS="triton")
    proc = subprocess.run([sys.executable, str(root / "loader.py"), str(root / "job.json")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = torch.load(root / "out.pt")
    return models, folders, ids, result


def test_loads_without_our_packages(loaded):
    _, folders, _, result = loaded
    assert result["leaked"] == []
    for name, res in result["results"].items():
        assert res["class"].startswith("transformers_modules.") and res["class"].endswith(".PretrainHybridForCausalLM"), res
        config = json.loads((Path(folders[name]) / "config.json").read_text())
        assert config["architectures"] == ["PretrainHybridForCausalLM"]
        assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_pretrain.PretrainHybridForCausalLM"


@pytest.mark.parametrize("name", sorted(REMOTE_MODELS))
def test_logits_match(loaded, name):
    models, _, ids, result = loaded
    with torch.no_grad():
        ref = models[name](ids)
    got = result["results"][name]["logits"]
    assert got.dtype == torch.float32 and got.shape == ref.shape
    err = relative_error(got, ref)
    print(f"{name}: max relative logit error {err:.2e}")
    assert err <= 1e-5, (name, err)
    # labels give the mean next-token cross-entropy, shifted inside as transformers' models do
    expected = torch.nn.functional.cross_entropy(ref[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert torch.allclose(result["results"][name]["loss"], expected, rtol=1e-5), name


@pytest.mark.parametrize("name", ["samba", "sambay", "mix"])
def test_weights_keep_our_names(loaded, name):
    """model.safetensors (sharded above --max-shard-size, with its index) holds our state_dict
    under our names; a tied head stores no second copy."""
    from safetensors import safe_open

    models, folders, _, _ = loaded
    folder = Path(folders[name])
    shards = sorted(folder.glob("model*.safetensors"))
    assert (len(shards) > 1) == (name == "mix") and (folder / "model.safetensors.index.json").is_file() == (name == "mix")
    stored = {}
    for shard in shards:
        with safe_open(shard, "pt") as f:
            stored.update({k: f.get_tensor(k) for k in f.keys()})
    ours = models[name].state_dict()
    assert sorted(stored) == sorted(ours)
    assert ("head.weight" in stored) == (not models[name].cfg.tie_embeddings)
    for k, v in ours.items():
        assert torch.equal(stored[k], v), k


@pytest.mark.parametrize("name", sorted(REMOTE_MODELS))
def test_greedy_generate_matches(loaded, tokenizer_path, name):
    from pretrain.data import Tokenizer
    from pretrain.generate import generate

    models, _, _, result = loaded
    tok = Tokenizer(str(tokenizer_path))
    res = result["results"][name]
    # the prompt `pretrain generate` builds: one end-of-document token, then the text
    assert res["prompt"] == [tok.eos_id] + tok.encode(PROMPT)
    expected = generate(models[name], res["prompt"], NEW_TOKENS, greedy=True, eos_id=tok.eos_id)
    assert len(expected) >= 1 and res["new"][: len(expected)] == expected, (name, res["new"], expected)
    # linear time per token: the prompt once, then one token per step through one carried cache
    assert res["fed"] == [len(res["prompt"])] + [1] * (len(res["fed"]) - 1) and res["caches"] == 1, res["fed"]


def test_bundle_needs_only_torch_and_transformers(loaded, tokenizer_path, tmp_path):
    """Every bundled file passes transformers' own import check (as a Hub download is checked
    file by file), names no module of ours, and the tokenizer files are the native export's."""
    from transformers.dynamic_module_utils import get_imports, get_relative_import_files

    _, folders, _, _ = loaded
    folder = Path(folders["mix"])
    files = sorted(folder.glob("*.py"))
    reached = {Path(f).name for f in get_relative_import_files(folder / "modeling_pretrain.py")}
    assert reached | {"modeling_pretrain.py"} == {f.name for f in files}  # the loader copies every file
    for f in files:
        outside = [m for m in get_imports(f) if m not in sys.stdlib_module_names and m not in ("torch", "transformers")]
        assert outside == [], (f.name, outside)
    model, run = _save_checkpoint("llama_remote", tmp_path / "run", tokenizer_path)
    assert main(["convert", str(run), "--to", "hf", str(tmp_path / "native")]) == 0  # native without the flag
    assert json.loads((tmp_path / "native" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    remote = Path(folders["llama_remote"])
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        assert (remote / name).read_bytes() == (tmp_path / "native" / name).read_bytes(), name


@pytest.mark.parametrize(
    "source, named",
    [("from {pkg}.missing import X\n", "{pkg}.missing"), ("import tomli_w\n", "tomli_w")],
)
def test_bundle_failure_is_one_line_and_leaves_no_folder(monkeypatch, capsys, tokenizer_path, tmp_path, source, named):
    import pretrain.convert.remote as remote

    name = f"broken_{tmp_path.name}"  # a fresh package per case (the import system caches packages)
    source, named = source.format(pkg=name), named.format(pkg=name)
    pkg = tmp_path / "src" / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "entry.py").write_text("import torch\n" + source)
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    monkeypatch.setattr(remote, "ENTRY", f"{name}.entry")
    monkeypatch.setattr(remote, "BUNDLED_PACKAGES", (*remote.BUNDLED_PACKAGES, name))
    _, run = _save_checkpoint("gla", tmp_path / "run", tokenizer_path)
    capsys.readouterr()
    assert main(["convert", str(run), "--to", "hf", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pretrain convert: error: remote-code export"), err
    assert named in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "src"]


def test_native_only_refuses_and_flags_conflict(capsys, tokenizer_path, tmp_path):
    _, run = _save_checkpoint("gla", tmp_path / "run", tokenizer_path)
    capsys.readouterr()
    assert main(["convert", str(run), "--to", "hf", str(tmp_path / "o1"), "--native-only"]) == 2
    assert "no native transformers class" in capsys.readouterr().err
    assert main(["convert", str(run), "--to", "hf", str(tmp_path / "o2"), "--native-only", "--remote-code"]) == 2
    assert "choose one" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
