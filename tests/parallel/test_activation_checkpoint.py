"""Activation checkpointing ('full', 'selective') against the unchecked model: the loss and every
gradient bitwise equal for every family's tiny config (shrunk), parameter names and state-dict
keys unchanged, decoding untouched, compiled blocks too, less memory kept for the backward (full < selective < none),
a two-rank pipeline (GPipe and zero-bubble) with checkpointed stages and two-rank FSDP2 over a
checkpointed model equal to one unchecked process, and `pretrain train` with and without it logging the same losses."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tests.conftest import end_spawned_rank, losses, run_cli, set_args, tiny_overrides

VOCAB, BATCH, SEQ = 64, 2, 16

CASES = {  # every family's tiny config, shrunk to run in a fraction of a second
    "tiny": ("configs/tiny.toml", ["model.d_model=32", "model.n_layers=4", "model.attention.window=5",
                                   "model.mamba.d_state=4"]),
    "llama_tiny": ("configs/llama_tiny.toml", ["model.d_model=32", "model.n_layers=4", "model.attention.n_heads=4"]),
    "gla_tiny": ("configs/gla_tiny.toml", ["model.d_model=32", "model.gla.chunk_size=4"]),
    "mamba2_tiny": ("configs/mamba2_tiny.toml", ["model.d_model=32", "model.mamba2.d_state=4",
                                                 "model.mamba2.chunk_size=4"]),
    "titans_mac_tiny": ("configs/titans_mac_tiny.toml", ["model.d_model=32", "model.titans.chunk_size=2",
                                                         "model.titans.segment_size=4", "model.titans.n_persistent=2"]),
    "sambay_tiny": ("configs/sambay_tiny.toml", ["model.d_model=32", "model.attention.window=5",
                                                 "model.mamba.d_state=4"]),
    "rmoe_tiny": ("configs/rmoe_tiny.toml", ["model.d_model=32", "model.moe.n_experts=4", "model.moe.router_hidden=8",
                                             "model.moe.aux_loss_coef=0.05"]),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _config(name: str):
    from pretrain.config import load_config

    path, overrides = CASES[name]
    return load_config(path, [f"model.vocab_size={VOCAB}", *overrides]).model


def _batch():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    position_ids = torch.arange(SEQ).repeat(BATCH, 1)
    position_ids[0, 5:] = torch.arange(SEQ - 5)  # two packed documents in the first row
    return tokens[:, :-1], tokens[:, 1:], position_ids


def _model(name: str, mode: str):
    from parallel.activation_checkpoint import apply_activation_checkpoint
    from pretrain.models import build_model

    torch.manual_seed(0)
    return apply_activation_checkpoint(build_model(_config(name)), mode)


def _loss(model) -> torch.Tensor:
    from pretrain.train.trainer import lm_loss

    inputs, labels, pos = _batch()
    logits, aux = model(inputs, position_ids=pos, return_aux=True)
    return lm_loss(logits, labels) + aux.get("aux_loss", 0.0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_loss_and_gradients_equal_unchecked(name):
    ref = _model(name, "none")
    ref_loss = _loss(ref)
    ref_loss.backward()
    for mode in ("full", "selective"):
        model = _model(name, mode)
        assert [n for n, _ in model.named_parameters()] == [n for n, _ in ref.named_parameters()], mode
        assert list(model.state_dict()) == list(ref.state_dict()), mode
        model.load_state_dict(ref.state_dict(), strict=True)  # a checkpoint loads across settings
        loss = _loss(model)
        loss.backward()
        assert torch.equal(loss, ref_loss), (mode, loss.item(), ref_loss.item())
        for (k, p), q in zip(model.named_parameters(), ref.parameters()):
            assert p.grad is not None and torch.equal(p.grad, q.grad), (mode, k)


def test_decoding_and_no_grad_forward_are_unchanged():
    from tests.models.util import decode

    ref, model = _model("sambay_tiny", "none"), _model("sambay_tiny", "full")
    inputs, _, _ = _batch()
    with torch.no_grad():
        assert torch.equal(model(inputs), ref(inputs))
        assert torch.equal(decode(model, inputs, [5, 1, 10]), decode(ref, inputs, [5, 1, 10]))


# dynamo reads .grad of non-leaf tensors it wraps as inputs and warns (torch 2.13); it does so
# without checkpointing too
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_compiled_checkpointed_blocks_equal_unchecked(mode):
    """The trainer's order, checkpointing then torch.compile of each block, traces (dynamo must
    see the selective context_fn as a function) and gives the unchecked loss and gradients;
    aot_eager: the graph capture and the backward split without Inductor's C++ build."""
    ref = _model("llama_tiny", "none")
    ref_loss = _loss(ref)
    ref_loss.backward()
    model = _model("llama_tiny", mode)
    for name, block in model.blocks.items():
        model.blocks[name] = torch.compile(block, backend="aot_eager")
    try:
        loss = _loss(model)
        loss.backward()
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


class _Outputs(TorchDispatchMode):
    """Records a weak reference to the storage of every op output: a storage whose reference is
    still alive after the forward is held by the autograd graph or a checkpoint's cache."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: list[weakref.ref] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.storages += [weakref.ref(t.untyped_storage()) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


def kept_activation_bytes(forward, params) -> int:
    """Bytes of the tensors that ``forward()`` (returning a scalar loss) created and that stay
    alive until its backward, the storages of ``params`` (and views of them) excluded. A
    saved_tensors_hooks count would miss what the checkpoints keep outside autograd's saved
    tensors (selective's cached GEMM outputs, the blocks' inputs)."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    outputs = _Outputs()
    with outputs:
        loss = forward()
    gc.collect()
    alive = {s.data_ptr(): s.nbytes() for s in (r() for r in outputs.storages) if s is not None}
    loss.backward()
    return sum(n for ptr, n in alive.items() if ptr not in param_ptrs)


def test_kept_bytes_count_what_autograd_saves():
    """The measure on ops whose saved tensors are known: mm keeps its inputs (a leaf and a
    weight, not counted), exp its output, sin its input (that same output), sum nothing; the
    fp32 loss itself is alive too."""
    w = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(16, 8, requires_grad=True)
    assert kept_activation_bytes(lambda: (x @ w).exp().sin().sum(), [w, x]) == 16 * 8 * 4 + 4
    assert kept_activation_bytes(lambda: (x @ w).sum(), [w, x]) == 4


def test_checkpointing_keeps_fewer_activation_bytes():
    kept = {}
    for mode in ("none", "full", "selective"):
        model = _model("llama_tiny", mode)
        kept[mode] = kept_activation_bytes(lambda: _loss(model), model.parameters())
    print(f"llama_tiny (4 blocks, {BATCH}x{SEQ} tokens) bytes kept for backward: {kept}")
    assert kept["full"] < kept["selective"] < kept["none"], kept
    # full keeps per block little more than its input h [B, T, d_model] fp32, besides the logits
    # and the loss: a small part of the unchecked model's activations
    assert kept["full"] < kept["none"] / 4, kept


def test_bad_mode_is_one_line_naming_the_field():
    from parallel.activation_checkpoint import apply_activation_checkpoint
    from pretrain.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"^parallel\.activation_checkpoint: 'partial' is not one of"):
        load_config(None, ["parallel.activation_checkpoint=partial"])
    model = _model("tiny", "full")
    with pytest.raises(ValueError, match="already activation-checkpointed"):
        apply_activation_checkpoint(model, "selective")


# ---------------------------------------------------------------- two-rank pipeline

PP_SCHEDULES = [("gpipe", 1, "selective"), ("zero_bubble", 2, "full"), ("zero_bubble", 2, "selective")]


def _pipeline_grads(schedule: str, virtual: int, mode: str, rank: int, pp: int) -> dict:
    """One step of the pipeline over ``sambay_tiny`` (the shared K/V cross the cuts) with every
    stage checkpointed in ``mode``: the last stage's loss and this rank's gradients by name."""
    from parallel.activation_checkpoint import apply_activation_checkpoint_to_stage
    from parallel.pipeline.schedule import PipelineLoss, build_schedule, pipeline_stage, stages_of_rank, step
    from parallel.pipeline.stage import build_stage

    cfg = _config("sambay_tiny")
    cuts = {2: [0, 6], 4: [0, 3, 6, 7]}[pp * virtual]
    local = [build_stage(cfg, cuts, s, 0) for s in stages_of_rank(schedule, rank, pp, virtual)]
    for m in local:
        apply_activation_checkpoint_to_stage(m, mode)
    last = next((m for m in local if m.is_last), None)
    loss_fn = PipelineLoss(last.out_keys if last is not None else [], BATCH)
    sched = build_schedule(schedule, [pipeline_stage(m, torch.device("cpu")) for m in local], BATCH, loss_fn)
    inputs, labels, pos = _batch()
    records = step(sched, loss_fn, inputs if any(m.is_first for m in local) else None,
                   labels if last is not None else None, pos)
    out = {"loss": sum(r["lm_loss"].item() for r in records) / BATCH if records else None, "grads": {}}
    for m in local:
        for k, p in m.model.named_parameters():
            out["grads"].setdefault(k, []).append(p.grad.clone())
    return out


def _fsdp_grads(mode: str, rank: int, world: int) -> dict:
    """One step of FSDP2 over ``world`` ranks, each on its own row of the batch, with the model
    checkpointed in ``mode`` first (the trainer's order): the mean loss and the full gradients."""
    from torch.distributed.device_mesh import init_device_mesh

    from parallel.data import apply_fsdp
    from pretrain.train.trainer import lm_loss

    model = _model("sambay_tiny", mode)
    apply_fsdp(model, init_device_mesh("cpu", (1, world), mesh_dim_names=("dp_replicate", "dp_shard")))
    inputs, labels, pos = _batch()
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    loss = lm_loss(model(inputs[rows], position_ids=pos[rows]), labels[rows])
    loss.backward()  # FSDP averages the gradients over the ranks
    dist.all_reduce(total := loss.detach().clone())
    return {"loss": total.item() / world, "grads": {k: [p.grad.full_tensor()] for k, p in model.named_parameters()}}


def _rank_main(rank: int, world: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    results = {(s, mode): _pipeline_grads(s, v, mode, rank, world) for s, v, mode in PP_SCHEDULES}
    results["fsdp", "selective"] = _fsdp_grads("selective", rank, world)
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    end_spawned_rank()


def test_checkpointed_pipeline_and_fsdp_equal_one_unchecked_process(tmp_path):
    from pretrain.train.trainer import lm_loss

    mp.start_processes(_rank_main, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    ref = _model("sambay_tiny", "none")
    inputs, labels, pos = _batch()
    ref_loss = 0.0
    for row in range(BATCH):  # one micro-batch per row, as the pipeline runs it
        loss = lm_loss(ref(inputs[row : row + 1], position_ids=pos[row : row + 1]), labels[row : row + 1]) / BATCH
        loss.backward()
        ref_loss += loss.item()
    for schedule, mode in [(s, mode) for s, _, mode in PP_SCHEDULES] + [("fsdp", "selective")]:
        got = [r[schedule, mode] for r in ranks]
        if schedule == "fsdp":  # every rank holds every (gathered) gradient
            assert got[0]["loss"] == pytest.approx(ref_loss, rel=1e-6)
            got = got[:1]
        else:  # the last stage holds the loss
            assert [g["loss"] for g in got if g["loss"] is not None] == [pytest.approx(ref_loss, rel=1e-6)], schedule
        grads = {}
        for g in got:
            for k, gs in g["grads"].items():
                grads.setdefault(k, []).extend(gs)
        names = [k for k, _ in ref.named_parameters()]
        assert sorted(grads) == sorted(names), schedule
        for k, p in ref.named_parameters():
            if k == "embed.weight":  # tied: each copy holds its own uses' share, summed by the trainer
                torch.testing.assert_close(sum(grads[k]), p.grad, rtol=1e-5, atol=1e-7, msg=(schedule, mode, k))
            else:
                torch.testing.assert_close(grads[k][0], p.grad, rtol=1e-5, atol=1e-7, msg=(schedule, mode, k))


# -------------------------------------------------------------------- command line


def test_train_cli_with_full_checkpointing_logs_the_same_losses(small_corpus, prepared_dir, tmp_path):
    runs = {}
    for mode in ("none", "full"):
        run_dir = tmp_path / mode
        overrides = tiny_overrides(small_corpus, prepared_dir, run_dir, **{
            "train.max_steps": 3, "train.eval_interval": 0, "checkpoint.interval": 0,
        })
        result = run_cli(["train", *set_args(overrides), "--set", f"parallel.activation_checkpoint={mode}"])
        assert result.returncode == 0, result.stderr
        runs[mode] = losses(run_dir)
    assert [s for s, _ in runs["none"]] == [1, 2, 3]
    assert runs["full"] == runs["none"]
