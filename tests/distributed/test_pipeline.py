"""Pipeline parallelism on CPU/gloo against a single process with the same weights, global batch
and micro-batches: the losses of two SGD steps and every parameter gradient of the first, for
every family's tiny config (shrunk): tiny (Mamba/SWA, tied embeddings), llama_tiny (untied),
gla_tiny, mamba2_tiny, titans_mac_tiny, SambaY cut between the shared-KV layer and the
cross-decoder, RMoE with MoE layers on both sides of the cut and hybrid_mix, and cuts inside
blocks (between a block's mixer and FFN halves) of RMoE and SambaY; every batch is packed (the
position ids restart). All cases run in one process group of two ranks, since spawning is slow."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import end_spawned_rank

BATCH, SEQ, VOCAB, MICRO, SEED, LR, CLIP = 4, 12, 64, 2, 0, 0.5, 0.5


pytestmark = pytest.mark.usefixtures("one_thread")


CASES = {
    # name: (config file, overrides, stage cuts for 2 stages and for 4 (2 ranks x 2 virtual));
    # every family's tiny config, shrunk so that the whole matrix runs in seconds
    "tiny": ("configs/tiny.toml", [  # Mamba + SWA, tied embeddings
        "model.d_model=32", "model.n_layers=4", "model.attention.window=5", "model.mamba.d_state=4",
    ], {2: [0, 2], 4: [0, 1, 2, 3]}),
    "llama_tiny": ("configs/llama_tiny.toml", [  # untied: the head lives on the last stage only
        "model.d_model=32", "model.n_layers=4", "model.attention.n_heads=4",
    ], {2: [0, 2], 4: [0, 1, 2, 3]}),
    "gla_tiny": ("configs/gla_tiny.toml", [
        "model.d_model=32", "model.gla.chunk_size=4",
    ], {2: [0, 2], 4: [0, 1, 2, 3]}),
    "mamba2_tiny": ("configs/mamba2_tiny.toml", [
        "model.d_model=32", "model.mamba2.d_state=4", "model.mamba2.chunk_size=4",
    ], {2: [0, 2], 4: [0, 1, 2, 3]}),
    "titans_mac_tiny": ("configs/titans_mac_tiny.toml", [  # segments of 4: several per row
        "model.d_model=32", "model.titans.chunk_size=2", "model.titans.segment_size=4",
        "model.titans.n_persistent=2",
    ], {2: [0, 2], 4: [0, 1, 2, 3]}),
    # blocks 0-5 end with 'attn_kv'; 'gmu' (6) and 'xattn' (7) read its K/V and the memory, so at
    # 4 stages the K/V pass through stage 2 untouched on their way to stage 3
    "sambay_kv_cut": ("configs/sambay_tiny.toml", [
        "model.d_model=32", "model.attention.window=5", "model.mamba.d_state=4",
    ], {2: [0, 6], 4: [0, 3, 6, 7]}),
    "rmoe_both_sides": ("configs/rmoe_tiny.toml", [
        "model.d_model=32", "model.moe.n_experts=4", "model.moe.router_hidden=8", "model.moe.aux_loss_coef=0.05",
    ], {2: [0, 2], 4: [0, 1, 2, 3]}),
    # cuts inside blocks: the MoE aux loss, load sums and GRU state of the FFN halves cross them;
    # at 4 stages stage 0 holds no FFN half (so no GRU copy: stage 1 holds the first), and under
    # 'zbv' rank 1 holds both halves of block 1 in its two stages
    "rmoe_mid_block": ("configs/rmoe_tiny.toml", [
        "model.d_model=32", "model.moe.n_experts=4", "model.moe.router_hidden=8", "model.moe.aux_loss_coef=0.05",
    ], {2: [0, "1.ffn"], 4: [0, "0.ffn", "1.ffn", "2.ffn"]}),
    # cut right after the mixer half of 'mamba_mem' (4, the GMU memory), of 'attn_kv' (5, the
    # shared K/V) and of 'gmu' (6, which reads them): they cross inside blocks
    "sambay_mid_block": ("configs/sambay_tiny.toml", [
        "model.d_model=32", "model.attention.window=5", "model.mamba.d_state=4",
    ], {2: [0, "5.ffn"], 4: [0, "4.ffn", "5.ffn", "6.ffn"]}),
    # Mamba, GLA, SWA and attention, GRU-routed MoE in blocks 0 and 2: at 4 stages the GRU is on
    # stages 0 and 2 only, and the router state passes through stage 1
    "hybrid_mix": ("configs/hybrid_mix.toml", [
        "model.d_model=32", "model.n_layers=4", "model.moe.n_experts=4", "model.moe.router_hidden=8",
        "model.moe.aux_loss_coef=0.05", "model.attention.window=5", "model.mamba.d_state=4",
    ], {2: [0, 3], 4: [0, 1, 2, 3]}),
}
SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2), ("zero_bubble", 2), ("zbv", 2)]


def _config(name: str, n_stages: int = 2):
    from pretrain.config import load_config

    path, overrides, cuts = CASES[name]
    cfg = load_config(path, [f"model.vocab_size={VOCAB}", *overrides])
    return cfg.model, cuts[n_stages]


def _batch():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    position_ids = torch.arange(SEQ).repeat(BATCH, 1)
    for row in range(BATCH):  # two documents per row, split at a different place in each
        cut = 2 + 3 * row
        position_ids[row, cut:] = torch.arange(SEQ - cut)
    return tokens[:, :-1], tokens[:, 1:], position_ids


def _reference(name: str) -> dict:
    """One process: accumulate (loss_i / n).backward() over the micro-batches, as the trainer."""
    from pretrain.models import build_model
    from pretrain.train.trainer import lm_loss

    cfg, _ = _config(name)
    torch.manual_seed(SEED)
    model = build_model(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    inputs, labels, pos = _batch()
    n = BATCH // MICRO
    out: dict = {"losses": []}
    for step in range(2):
        total = 0.0
        for i in range(n):
            rows = slice(i * MICRO, (i + 1) * MICRO)
            logits, aux = model(inputs[rows], position_ids=pos[rows], return_aux=True)
            loss = lm_loss(logits, labels[rows]) + aux.get("aux_loss", 0.0)
            (loss / n).backward()
            total += loss.item() / n
            for k, v in aux.items():
                out.setdefault("aux", {}).setdefault(k, []).append(v.detach().float())
        out["losses"].append(total)
        if step == 0:
            out["grads"] = {k: p.grad.clone() for k, p in model.named_parameters()}
        out.setdefault("norms", []).append(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).item())
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step == 0:  # validation between the steps
            with torch.no_grad():
                evals = [
                    (model(inputs[rows], position_ids=pos[rows], return_aux=True), labels[rows])
                    for rows in (slice(i * MICRO, (i + 1) * MICRO) for i in range(n))
                ]
            out["eval"] = sum((lm_loss(lg, y) + aux.get("aux_loss", 0.0)).item() for (lg, aux), y in evals) / n
    return out


def _pipeline(name: str, schedule: str, virtual: int, rank: int, pp: int) -> dict:
    """This rank's share of the pipeline run of case ``name``: its losses (last stage only),
    the first step's gradients, the clipped norms, the validation loss between the steps and the
    weights after the second step, by parameter name."""
    from parallel.pipeline.schedule import (
        PipelineLoss, build_schedule, evaluate, pipeline_stage, stage_ranks, stages_of_rank, step,
    )
    from parallel.pipeline.stage import SharedParamSync, build_stage, clip_grad_norm_, shared_holders

    n_stages = pp * virtual
    cfg, cuts = _config(name, n_stages)
    local = [build_stage(cfg, cuts, s, SEED) for s in stages_of_rank(schedule, rank, pp, virtual)]
    stages = [pipeline_stage(m, torch.device("cpu")) for m in local]
    last = next((m for m in local if m.is_last), None)
    loss_fn = PipelineLoss(last.out_keys if last is not None else [], BATCH // MICRO)
    sched = build_schedule(schedule, stages, BATCH // MICRO, loss_fn)
    sync = SharedParamSync(local, shared_holders(cfg, cuts, stage_ranks(schedule, pp, virtual)))
    params = [p for m in local for p in m.parameters()]
    opt = torch.optim.SGD(params, lr=LR)
    inputs, labels, pos = _batch()
    # only the first stage's rank feeds the tokens and only the last stage's the labels
    ids = inputs if any(m.is_first for m in local) else None
    targets = labels if last is not None else None
    out: dict = {"losses": [], "grads": {}}
    for i in range(2):
        records = step(sched, loss_fn, ids, targets, pos)
        if records:
            n = len(records)
            out["losses"].append(sum((r["lm_loss"] + r.get("aux_loss", 0.0)).item() for r in records) / n)
            out.setdefault("aux", {})
            for r in records:
                for k, v in r.items():
                    if k != "lm_loss":
                        out["aux"].setdefault(k, []).append(v)
        sync.sync()
        if i == 0:
            for m in local:
                for k, p in m.model.named_parameters():
                    out["grads"].setdefault(k, []).append(p.grad.clone())
        out.setdefault("norms", []).append(clip_grad_norm_(local, CLIP).item())
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i == 0:  # validation between the steps: torch switches the stages to eval and back
            if schedule == "zbv":
                with pytest.raises(NotImplementedError, match="zbv"):
                    evaluate(sched, loss_fn, inputs, labels, pos)
                records = []
            else:
                records = evaluate(sched, loss_fn, ids, targets, pos)
            if records:
                out["eval"] = sum((r["lm_loss"] + r.get("aux_loss", 0.0)).item() for r in records) / len(records)
    out["weights"] = {}
    for m in local:
        for k, p in m.model.named_parameters():
            out["weights"].setdefault(k, []).append(p.detach().clone())
    return out


def _rank_main(rank: int, world: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    results = {}
    for name in CASES:
        for schedule, virtual in SCHEDULES:
            results[name, schedule] = _pipeline(name, schedule, virtual, rank, world)
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    end_spawned_rank()


def _grads_by_name(parts: list[dict]) -> dict[str, list[torch.Tensor]]:
    """Every rank's gradients of each parameter name (several: copies of a shared parameter)."""
    grads: dict[str, list[torch.Tensor]] = {}
    for p in parts:
        for k, gs in p["grads"].items():
            grads.setdefault(k, []).extend(gs)
    return grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def test_pipeline_equals_single_process(tmp_path):
    mp.start_processes(_rank_main, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name in CASES:
        ref = _reference(name)
        for schedule, virtual in SCHEDULES:
            worst = 0.0
            parts = [r[name, schedule] for r in ranks]
            losses = [loss for p in parts for loss in p["losses"]]
            assert len(losses) == 2, (name, schedule)
            for got, want in zip(losses, ref["losses"]):
                assert abs(got - want) <= 1e-5 * abs(want), (name, schedule, got, want)
            grads = _grads_by_name(parts)
            assert sorted(grads) == sorted(ref["grads"]), (name, schedule)
            for k, want in ref["grads"].items():
                for got in grads[k]:
                    worst = max(worst, _rel(got, want))
                    assert _rel(got, want) <= 1e-5, (name, schedule, k, _rel(got, want))
                # copies of a shared parameter: equal gradients, and equal weights after two steps
                assert all(torch.equal(g, grads[k][0]) for g in grads[k]), (name, schedule, k)
                weights = [w for p in parts for w in p["weights"].get(k, [])]
                assert all(torch.equal(w, weights[0]) for w in weights), (name, schedule, k)
            evals = [p["eval"] for p in parts if "eval" in p]  # forward-only through the pipeline
            if schedule != "zbv":  # refused (see parallel.pipeline.schedule.evaluate)
                assert len(evals) == 1 and abs(evals[0] - ref["eval"]) <= 1e-5 * ref["eval"], (name, schedule)
            for part in parts:  # the global norm, the same on both ranks, clipped both steps
                assert part["norms"] == parts[0]["norms"] and ref["norms"][0] > CLIP, (name, schedule)
                for got, want in zip(part["norms"], ref["norms"]):
                    assert abs(got - want) <= 1e-5 * want, (name, schedule, got, want)
            # aux loss and metrics of every micro-batch of both steps reach the last stage
            aux = next(p["aux"] for p in parts if p["losses"])
            assert sorted(aux) == sorted(ref.get("aux", {})), (name, schedule)
            for k, want in ref.get("aux", {}).items():
                torch.testing.assert_close(torch.stack(aux[k]), torch.stack(want), rtol=1e-5, atol=0, msg=k)
            n_stages = 2 * virtual
            cfg, cuts = _config(name, n_stages)
            assert len(grads["embed.weight"]) == (2 if cfg.tie_embeddings else 1)  # tied: the head's copy
            if name == "rmoe_both_sides":
                assert len(grads["router_gru.weight_ih"]) == n_stages  # a GRU copy on every stage
            if name == "rmoe_mid_block":  # on the stages with an FFN half: not stage 0 of 4
                assert len(grads["router_gru.weight_ih"]) == (2 if n_stages == 2 else 3)
            print(f"{name} {schedule}: max relative gradient error {worst:.2e}")


def test_stage_layouts():
    from parallel.pipeline.schedule import stage_ranks, stages_of_rank

    assert [stages_of_rank("gpipe", r, 4) for r in range(4)] == [[0], [1], [2], [3]]
    assert stages_of_rank("interleaved_1f1b", 1, 4, 3) == [1, 5, 9]  # the loop: s on rank s % pp
    assert stage_ranks("zero_bubble", 2, 2) == [0, 1, 0, 1]
    assert stage_ranks("zbv", 3, 2) == [0, 1, 2, 2, 1, 0]  # the V: rank 0 holds first and last
    for schedule, virtual in [("1f1b", 2), ("zbv", 3), ("interleaved_1f1b", 1), ("pipedream", 1)]:
        with pytest.raises(ValueError, match="schedule"):
            stages_of_rank(schedule, 0, 2, virtual)


def test_carry_keys_and_names_of_a_split():
    """The SambaY cut after 'attn_kv' sends the shared K/V and the GMU memory; stage modules keep
    the single-process parameter names and together hold every parameter once (plus the tied
    embedding's copy)."""
    from parallel.pipeline.stage import build_stage, stage_layers

    cfg, cuts = _config("sambay_kv_cut")
    first, last = (build_stage(cfg, cuts, s, SEED) for s in range(2))
    assert first.in_keys == [] and first.out_keys == last.in_keys == ["gmu_memory", "shared_k", "shared_v"]
    assert last.out_keys == []  # no auxiliary loss or metrics in SambaY
    torch.manual_seed(SEED)
    from pretrain.models import build_model

    whole = dict(build_model(cfg).named_parameters())
    names = [dict(m.model.named_parameters()) for m in (first, last)]
    assert sorted(set(names[0]) | set(names[1])) == sorted(whole)
    assert set(names[0]) & set(names[1]) == {"embed.weight"}
    for part in names:
        for k, p in part.items():
            assert torch.equal(p, whole[k]), k
    # cut inside block 5 ('attn_kv'): its mixer half makes the K/V on stage 0, its FFN half is stage 1's
    mid = [build_stage(cfg, [0, "5.ffn"], s, SEED) for s in range(2)]
    assert mid[0].out_keys == mid[1].in_keys == ["gmu_memory", "shared_k", "shared_v"]
    for module, half in zip(mid, ({"norm1", "mixer"}, {"norm2", "ffn"})):
        assert {k.split(".")[2] for k, _ in module.model.named_parameters() if k.startswith("blocks.5.")} == half
    for bad in ([1, 4], [0, 4, 4], [0, 8], [0, "8.ffn"], [0, "4.ffn", 4], [0, "4.mlp"]):
        with pytest.raises(ValueError, match="cuts"):
            stage_layers(bad, cfg.n_layers, 0)


FAMILIES = [
    "tiny", "llama_tiny", "gla_tiny", "mamba2_tiny", "sambay_tiny", "titans_mac_tiny", "rmoe_tiny", "hybrid_mix",
]


@pytest.mark.parametrize("family", FAMILIES)
def test_chained_stages_equal_whole_model(family):
    """Every family's stages, cut between blocks and inside them, chained in one process
    through their packed carry (the tuples the pipeline sends), give the whole model's logits,
    auxiliary loss, metrics and, with the copies of shared parameters summed, every gradient."""
    from parallel.pipeline.stage import SHARED_PARAMS, build_stage
    from pretrain.config import load_config
    from pretrain.models import build_model
    from pretrain.train.trainer import lm_loss

    small = [] if family in ("rmoe_tiny", "hybrid_mix") else ["model.d_model=32"]
    cfg = load_config(f"configs/{family}.toml", [f"model.vocab_size={VOCAB}", *small]).model
    inputs, labels, pos = (t[:2, :8] for t in _batch())
    torch.manual_seed(SEED)
    whole = build_model(cfg)
    logits, aux = whole(inputs, position_ids=pos, return_aux=True)
    (lm_loss(logits, labels) + aux.get("aux_loss", 0.0)).backward()
    n = cfg.n_layers
    inside = [[0, "0.ffn", f"{n // 2}.ffn"]] if cfg.pattern()[0][1] != "none" else []  # cuts inside blocks
    for cuts in ([0, n // 2], [0, 1, n - 1], *inside):
        stages = [build_stage(cfg, cuts, s, SEED) for s in range(len(cuts))]
        out = (inputs,)
        for stage in stages:
            out = stage(*out, position_ids=pos)
        got = dict(zip(stages[-1].out_keys, out[1:]))
        torch.testing.assert_close(out[0], logits, rtol=1e-5, atol=1e-6)
        assert sorted(got) == sorted(aux), cuts
        for k, v in aux.items():
            torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-7, msg=k)
        (lm_loss(out[0], labels) + got.get("aux_loss", 0.0)).backward()
        grads: dict[str, torch.Tensor] = {}
        for stage in stages:
            for k, p in stage.model.named_parameters():
                assert k in SHARED_PARAMS or k not in grads, k  # only shared parameters have copies
                grads[k] = grads[k] + p.grad if k in grads else p.grad
        assert sorted(grads) == sorted(k for k, _ in whole.named_parameters())
        for k, p in whole.named_parameters():
            torch.testing.assert_close(grads[k], p.grad, rtol=1e-5, atol=1e-7, msg=f"{cuts} {k}")
