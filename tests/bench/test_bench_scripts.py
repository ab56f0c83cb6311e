"""bench/seq_cost.py runs at its smallest sizes and prints its table (the numbers are the
benchmark's business; this keeps the script from rotting). decode.py and context_parallel.py
have their own smoke tests; vs_hf.py and data_loading.py take a minute even at their smallest
(HF's model build, a data preparation), so only `pretrain bench --quick` runs them."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def _run(*args: str) -> str:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_seq_cost_prints_every_mixer_and_length():
    out = _run("bench/seq_cost.py", "--lengths", "32", "64", "--mixers", "gla", "swa", "--d-model", "32", "--repeats", "1")
    rows = [line for line in out.splitlines() if line.startswith("| gla ") or line.startswith("| swa ")]
    assert len(rows) == 2
    for row in rows:
        cells = row.split("|")[2:4]  # T=32 and T=64: 'us/tok (x first)'
        assert cells[0].strip().endswith("(1.00x)") and float(cells[1].split()[0]) > 0


_IMPORT_EACH = """
import runpy, sys
bench, scripts = sys.argv[1], sys.argv[2:]
base = [p for p in sys.path if p not in ('', '.')]
failed = []
for script in scripts:
    for name in [m for m in sys.modules if m.split('.')[0] in ('pretrain', 'kernels', 'bench')]:
        del sys.modules[name]
    sys.path[:] = [bench] + base  # what `python bench/<script>.py` starts with
    try:
        runpy.run_path(script, run_name='bench_import_check')  # its imports, not its main()
    except Exception as exc:
        failed.append(f'{script}: {type(exc).__name__}: {exc}')
print(chr(10).join(failed))
"""


def test_every_script_imports_when_run_as_a_script():
    """``python bench/x.py`` puts bench/ first on sys.path, where bench/kernels.py shadows the
    ``kernels`` package: a script that does not put the repository first fails at its first
    ``pretrain`` import. Each script with a ``__main__`` block is loaded so (one interpreter,
    the project's modules dropped between scripts)."""
    bench = ROOT / "bench"
    scripts = sorted(str(p) for p in bench.glob("*.py") if '__name__ == "__main__"' in p.read_text())
    assert len(scripts) >= 10
    result = subprocess.run([sys.executable, "-c", _IMPORT_EACH, str(bench), *scripts], cwd=ROOT / "tests",
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "", result.stdout


def test_cuda_bench_skips_without_a_gpu_and_builds_its_models():
    """bench/cuda.py exits 0 with one line on a machine without CUDA (the suite runs it
    everywhere), and its models are the sizes it names: Llama 3.2 1B's shapes (counted here from
    the widths) and SambaY d16's ~1.0B, both without their two embedding matrices."""
    import importlib.util

    import torch

    from pretrain.config import load_config
    from pretrain.models import build_model

    if not torch.cuda.is_available():
        out = _run("bench/cuda.py", "--quick")
        assert out.startswith("Skipped: no CUDA device") and len(out.strip().splitlines()) == 1
    spec = importlib.util.spec_from_file_location("bench_cuda", ROOT / "bench" / "cuda.py")
    cuda = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cuda)
    d, ffn, kv, layers = 2048, 8192, 8 * 64, 16
    llama_layer = d * (d + 2 * kv) + d * d + 3 * d * ffn + 2 * d  # q/k/v, o, SwiGLU, two RMSNorms
    want = {"Llama-style 1B": layers * llama_layer + d, "SambaY d16": (0.99e9, 1.01e9)}
    for name, path, extra, _ in cuda.MODELS:
        cfg = load_config(str(ROOT / path), cuda.overrides(extra, 4, 4096)).with_vocab()
        assert (cfg.train.device, cfg.train.dtype, cfg.data.seq_len) == ("cuda", "bf16", 4096)
        with torch.device("meta"):
            model = build_model(cfg.model)
        body = sum(p.numel() for p in model.parameters()) - 2 * model.embed.weight.numel()
        if isinstance(want[name], tuple):
            assert want[name][0] < body < want[name][1], body
        else:
            assert body == want[name]
