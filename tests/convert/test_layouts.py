"""Export reads a checkpoint of another parallel layout: one written by two FSDP2 ranks
(parameters, including the stacked MoE experts, sharded along dim 0) exports to the same
transformers model as the single-process weights."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pretrain.cli import main
from tests.conftest import end_spawned_rank
from tests.convert.conftest import model_config, relative_error, tiny_model


def _rank_main(rank: int, world: int, store: str, run: str, tokenizer: str) -> None:
    from pathlib import Path

    from torch.distributed.device_mesh import init_device_mesh

    from parallel.data import apply_fsdp
    from pretrain.train.checkpoint import save_checkpoint
    from pretrain.train.optim import build_optimizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    model = tiny_model("mixtral")
    apply_fsdp(model, init_device_mesh("cpu", (1, world), mesh_dim_names=("dp_replicate", "dp_shard")))
    cfg = model_config("mixtral", 256)
    optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))
    save_checkpoint(Path(run) / "checkpoints", 3, model, optimizer, {"data": {"consumed_samples": 0}},
                    cfg.to_toml(), Path(tokenizer), keep_last=1)
    end_spawned_rank()


def test_export_of_fsdp_checkpoint(tokenizer_path, tmp_path):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    mp.start_processes(_rank_main, args=(2, str(tmp_path / "store"), str(run), str(tokenizer_path)), nprocs=2,
                       start_method="spawn")
    assert main(["convert", str(run), "--to", "hf", str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    reference = tiny_model("mixtral").eval()  # the same seed, in one process
    ids = torch.randint(0, 256, (2, 15), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        err = relative_error(hf(ids).logits, reference(ids))
    print(f"fsdp2 mixtral: max relative logit error {err:.2e}")
    assert err <= 1e-5
