"""The Trainer's model, built on the meta device and materialised one init unit at a time into
its TP/FSDP2 shards, against a single-process ``torch.manual_seed(seed); build_model(cfg)``:
every weight gathered from the shards bitwise, and the logits of one forward, at tp2, dp_shard2
and dp_shard2 x tp2 on one group of 4 gloo ranks."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import end_spawned_rank

VOCAB, SEED, BATCH, SEQ = 64, 7, 2, 8

CASES = {
    # untied head, Mamba + SWA + SambaY's shared memory and K/V
    "sambay": ("configs/sambay_tiny.toml", [
        "model.d_model=32", "model.mamba.d_state=4", "model.tie_embeddings=false",
    ]),
    # tied embeddings, MoE experts and the shared GRU router (an init unit of its own)
    "rmoe": ("configs/rmoe_tiny.toml", ["model.d_model=32", "model.n_layers=2", "model.moe.router_hidden=16"]),
}

LAYOUTS = {"tp2": (1, 2), "dp_shard2": (2, 1), "dp_shard2xtp2": (2, 2)}
"""layout -> (dp_shard, tp), each on the sub-meshes of a (1, 2, 2) ('dp_replicate', 'dp_shard',
'tp') mesh of 4 ranks: tp2 runs on the two tp groups, dp_shard2 on the two dp_shard groups."""


def _config(name: str, compile: bool = False):
    from pretrain.config import load_config

    path, overrides = CASES[name]
    return load_config(path, [
        f"model.vocab_size={VOCAB}", f"train.seed={SEED}", "train.device=cpu",
        "parallel.activation_checkpoint=full", f"train.compile={str(compile).lower()}", *overrides,
    ])


def _inputs() -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))


def _build(cfg, mesh, layout: str):
    """The model of ``Trainer._build_model`` for ``layout`` (a Trainer without its data)."""
    from parallel.dims import ParallelDims
    from pretrain.train.trainer import Trainer

    dp_shard, tp = LAYOUTS[layout]
    dims = ParallelDims(1, dp_shard, 4, tp=tp)
    owner = SimpleNamespace(cfg=cfg, device=torch.device("cpu"), dims=dims, mesh=mesh, fsdp=dp_shard > 1,
                            tp_mesh=mesh["tp"] if tp > 1 else None, _apply_ep=lambda model: ())
    return Trainer._build_model(owner), owner.tp_mesh


def _gathered(model) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    out = {}
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        out[name.replace("_orig_mod.", "")] = t.full_tensor() if isinstance(t, DTensor) else t.detach().clone()
    return out


def _rank_main(rank: int, world: int, store: str, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (1, 2, 2), mesh_dim_names=("dp_replicate", "dp_shard", "tp"))
    results = {}
    for name in CASES:
        for layout in LAYOUTS:
            model, tp_mesh = _build(_config(name), mesh, layout)
            with torch.no_grad():
                logits = model(_inputs())
            if tp_mesh is not None:  # vocabulary shards [B, T, V/tp]
                logits = DTensor.from_local(logits, tp_mesh, [Shard(2)]).full_tensor()
            results[name, layout] = {"weights": _gathered(model), "logits": logits}
    # compiled blocks (their parameter names gain '_orig_mod.'): weights only, nothing compiles
    model, _ = _build(_config("sambay", compile=True), mesh, "dp_shard2xtp2")
    results["sambay", "compiled"] = {"weights": _gathered(model)}
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    end_spawned_rank()


def test_meta_init_equals_single_process_build(tmp_path):
    from pretrain.models import build_model

    mp.start_processes(_rank_main, args=(4, str(tmp_path / "store"), str(tmp_path)), nprocs=4, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(4)]
    for name in CASES:
        torch.manual_seed(SEED)
        ref = build_model(_config(name).model)
        want = {n: t.detach() for n, t in (*ref.named_parameters(), *ref.named_buffers())}
        with torch.no_grad():
            logits = ref(_inputs())
        for layout in (*LAYOUTS, "compiled"):
            for r, part in enumerate(rank.get((name, layout)) for rank in ranks):
                if part is None:
                    continue
                what = f"{name} {layout} rank {r}"
                assert sorted(part["weights"]) == sorted(want), what
                for k, w in want.items():
                    assert torch.equal(part["weights"][k], w), (what, k)
                if "logits" in part:
                    torch.testing.assert_close(part["logits"], logits, rtol=1e-5, atol=1e-5, msg=what)
