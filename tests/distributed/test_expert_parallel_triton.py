"""Expert parallelism on the MoE Triton kernels (model.kernels='triton', under the interpreter):
two gloo ranks, ep = 2, the RMoE case of test_expert_parallel.py, whose first layer sends no row
to rank 0's experts (an empty grouped GEMM that must still join the backward all-to-alls).
The mean loss and every gradient equal one process on the PyTorch path."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pretrain.config import load_config
from tests.conftest import end_spawned_rank
from tests.distributed.test_expert_parallel import CASES, ROWS, SEED, VOCAB, WORLD, _rel, _step


def _model(kernels: str):
    from pretrain.models import build_model

    path, overrides = CASES["rmoe"]
    cfg = load_config(path, [f"model.vocab_size={VOCAB}", *overrides, f"model.kernels='{kernels}'"]).model
    torch.manual_seed(SEED)
    return build_model(cfg)


def _rank_main(rank: int, world: int, store: str, out_dir: str) -> None:
    from kernels import dispatch
    from parallel.expert import apply_expert_parallel, expert_param_names

    os.environ.pop(dispatch.ENV_VAR, None)
    os.environ["TRITON_INTERPRET"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    model = _model("triton")
    sharded = apply_expert_parallel(model, dist.group.WORLD)
    loss, _, loads = _step(model, slice(rank * ROWS, (rank + 1) * ROWS))
    experts, grads = expert_param_names(model), {}
    for name, p in model.named_parameters():
        if name not in experts:  # data parallelism: the mean over ranks
            dist.all_reduce(p.grad)
            p.grad /= world
        grads[name] = p.grad
    torch.save({"loss": loss, "loads": loads, "grads": grads, "sharded": sharded}, f"{out_dir}/rank{rank}.pt")
    end_spawned_rank()


def test_expert_parallel_on_triton_kernels_equals_one_process(tmp_path, monkeypatch):
    from kernels import dispatch

    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    mp.start_processes(_rank_main, args=(WORLD, str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD,
                       start_method="spawn")
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    torch.set_num_threads(1)
    model = _model("torch")
    loss, _, loads = _step(model, slice(0, WORLD * ROWS))
    assert any(v[: v.numel() // WORLD].sum() == 0 for v in loads.values())  # rank 0 gets no row somewhere
    assert _rel(sum(g["loss"] for g in got) / WORLD, loss) <= 1e-5
    for name, p in model.named_parameters():
        if name in got[0]["sharded"]:
            mine = torch.cat([g["grads"][name] for g in got])  # experts in rank order
        else:
            mine = got[0]["grads"][name]
        assert _rel(mine, p.grad) <= 1e-5, f"{name}: relative error {_rel(mine, p.grad):.2e}"
