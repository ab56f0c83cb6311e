"""Context parallelism on CPU/gloo: the distributed split's exchanges against the one-process
:class:`~pretrain.models.sequence_split.LocalSplit` (values and gradients), and every family's
loss and gradients at cp 2 (load-balanced and contiguous), cp 4 and cp 2 x tp 2 against one
process on whole sequences (float32, rel <= 1e-5), with full attention all-gathered or as a
ring (cp 2 x tp 2 too: each tensor-parallel rank rings its own heads' keys/values with its cp
peer; the ring's saved tensors and visiting blocks are counted too). One group of four
processes for all."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pretrain.models.sequence_split import LocalSplit
from tests.conftest import end_spawned_rank
from tests.models.test_context_parallel_models import FAMILIES

pytestmark = pytest.mark.usefixtures("one_thread")

B, T, D = 2, 24, 3


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, D, generator=g)
    a = torch.rand(B, T, D, generator=g)
    w = torch.randn(4, B, T, D, generator=g)  # weights of the scalar losses
    return x, a, w


def _exchanges(split, x_rows: torch.Tensor, a_rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every exchange of ``split`` on this process's rows; outputs as rows or whole tensors."""
    tails = split.tails(x_rows, 5) * 1.0
    gathered = split.gather(x_rows * 2.0)  # [B, T, D]
    decay, state = a_rows.prod(dim=1), (x_rows * a_rows).sum(dim=1)
    s_in = split.pass_states(decay, state)  # [rows, D]
    total = split.all_sum((x_rows ** 2).sum())

    def step(j, st):
        prev = torch.zeros(B, D) if st is None else st[0]
        rows = split.slot(x_rows, j)  # [B, s, D]
        out = torch.tanh(rows + prev[:, None])
        return out, (out[:, -1] * 0.5 + prev,)

    relayed = split.attach(split.relay(step, (torch.zeros(B, D),)))
    return {"tails": tails, "gathered": gathered, "s_in": s_in, "total": total, "relayed": relayed}


def _loss(out: dict, w: torch.Tensor, split) -> torch.Tensor:
    """A scalar of every output; each row output weighted by this process's rows of weights
    drawn per global segment."""
    def rows(t, i):
        g = torch.Generator().manual_seed(i)
        weights = torch.randn(B, split.n_segments, *t.shape[1:], generator=g)
        return weights[:, list(split.local)].flatten(0, 1)
    loss = out["total"] + (out["gathered"] * w[0]).sum()
    for i, key in enumerate(("tails", "s_in", "relayed"), start=1):
        loss = loss + (out[key] * rows(out[key], i)).sum()
    return loss


def _primitives(split):
    x, a, w = _inputs()
    x.requires_grad_(True)
    out = _exchanges(split, split.shard(x), split.shard(a))
    _loss(out, w, split).backward()
    return {k: v.detach() for k, v in out.items()}, x.grad


def _model_grads(family: str, split, tp_mesh=None, **kw) -> tuple[torch.Tensor, dict]:
    """Loss and full gradients of ``family`` (tests/models/test_context_parallel_models.py) on
    this rank's rows; with ``tp_mesh`` tensor-parallel (sequence parallel) as well."""
    from tests.models.cp_reference import loss_and_grads
    from tests.models.test_context_parallel_models import model_and_batch

    model, ids, labels, pos = model_and_batch(family, **kw)
    if tp_mesh is not None:
        from parallel.tensor.region import apply_tp

        apply_tp(model, tp_mesh, True)
    loss, grads = loss_and_grads(model, ids, labels, pos, split)
    return loss, {k: g.full_tensor() if hasattr(g, "full_tensor") else g for k, g in grads.items()}


MODEL_CASES = {  # name -> (families, world of the split, load balance, model keywords, tp, ring attention)
    "cp2": (sorted(FAMILIES), 2, True, {}, 1, False),
    "cp2_contiguous": (["sambay", "gla", "titans", "mamba2"], 2, False, {"doc_masking": False}, 1, False),
    "cp4": (["sambay", "mamba", "titans"], 4, True, {"window": 14, "starts": (6, 20)}, 1, False),
    "cp2_tp2": (["sambay", "gla", "llama"], 2, True, {}, 2, False),
    "cp2_ring": (["llama", "sambay"], 2, True, {}, 1, True),
    "cp2_tp2_ring": (["llama", "sambay", "diff"], 2, True, {}, 2, True),
    "cp2_ring_contiguous": (["llama"], 2, False, {"doc_masking": False}, 1, True),
    "cp4_ring": (["llama", "sambay", "diff"], 4, True, {"window": 14, "starts": (6, 20)}, 1, True),
}


def _ring_memory(group) -> dict[str, int]:
    """One ring attention forward and backward of bfloat16 rows (2 samples, 4 query / 2 KV heads
    of 8) on this rank: the bytes of the storages it saves for the backward
    (``saved_tensors_hooks``) beside those of its local q, k, v, output and float32
    log-sum-exp; the most received key/value blocks (bfloat16) and gradient accumulators
    (float32) alive at any hop; for contrast, what the all-gather path saves and the size of
    the gathered keys/values."""
    import weakref

    from parallel.context import DistributedSplit
    from pretrain.models.context import SegmentMasks, attention_mask
    from pretrain.models.layers.attention import exchange_kv, segment_sdpa

    class Watched(DistributedSplit):
        def __init__(self, *args) -> None:
            super().__init__(*args)
            self.received: list = []
            self.peak: dict[torch.dtype, int] = {}

        def ring_exchange(self, send):
            alive = sum(1 for r in self.received if r() is not None and r().dtype == send.dtype)
            self.peak[send.dtype] = max(self.peak.get(send.dtype, 0), alive + 1)  # + the one arriving
            arrived = super().ring_exchange(send)

            def watched():
                recv = arrived()
                self.received.append(weakref.ref(recv))
                return recv

            return watched

    def saved(fn):
        seen: dict[int, int] = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
        return sum(seen.values()), out

    split = Watched(group, True)
    split.start_forward()
    rows, s, h, h_kv, d = B * split.slots, 6, 4, 2, 8
    g = torch.Generator().manual_seed(dist.get_rank())
    q, k, v = (torch.randn(rows, s, n, d, generator=g).bfloat16().requires_grad_() for n in (h, h_kv, h_kv))
    doc_start = torch.zeros(rows, s, dtype=torch.long)
    nbytes, out = saved(lambda: split.ring_attention(q, k, v, doc_start))
    split.attach(out).float().square().sum().backward()
    local = sum(t.numel() * t.element_size() for t in (q, k, v, out, doc_start)) + rows * s * h * 4
    ag = DistributedSplit(group, True)
    ag.start_forward()
    positions = ag.positions(rows, s, torch.device("cpu"))
    masks = SegmentMasks(tuple(attention_mask(ag.slot(positions, j), start, None, False)
                               for j, start in enumerate(ag.starts(s).tolist())))
    ag_bytes, _ = saved(lambda: segment_sdpa(q, *exchange_kv(k, v, ag, None), masks))
    return {"saved": nbytes, "local": local, "allgather_saved": ag_bytes,
            "gathered": B * ag.n_segments * s * h_kv * 2 * d * 2,
            "peak_kv": split.peak[torch.bfloat16], "peak_dkv": split.peak[torch.float32]}


def _rank_main(rank: int, world: int, store: str, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from parallel.context import DistributedSplit

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    everyone = dist.new_group(list(range(world)))
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    pair = pairs[rank // 2]
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("cp", "tp"))
    results = {}
    for lb in (False, True):
        for name, group in (("cp4", everyone), ("cp2", pair)):
            split = DistributedSplit(group, lb)
            split.start_forward()
            results[("primitives", name, lb)] = _primitives(split)
    for name, group in (("cp4", everyone), ("cp2", pair)):
        results[("ring_memory", name)] = _ring_memory(group)
    for case, (families, cp, lb, kw, tp, ring) in MODEL_CASES.items():
        group = everyone if cp == 4 else mesh["cp"].get_group() if tp > 1 else pair
        for family in families:
            split = DistributedSplit(group, lb)
            split.ring = ring
            results[(case, family)] = _model_grads(family, split, mesh["tp"] if tp > 1 else None, **kw)
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    end_spawned_rank()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """The results of every rank of one 4-process gloo group (the pairs 0-1 and 2-3 are cp 2
    groups; with tensor parallelism, cp pairs 0-2 and 1-3)."""
    tmp = tmp_path_factory.mktemp("cp")
    mp.start_processes(_rank_main, args=(4, str(tmp / "store"), str(tmp)), nprocs=4, start_method="spawn")
    return [torch.load(tmp / f"rank{r}.pt") for r in range(4)]


@pytest.mark.parametrize("world", [2, 4])
def test_distributed_split_equals_local_split(ranks, world):
    """tails, gather, pass_states, all_sum and relay: each rank's outputs are its rows of the
    one-process split's, and the gradient of a loss summed over ranks equals the one-process
    gradient (all_sum's value counted once per rank: its gradient is the world's sum)."""
    name = f"cp{world}"
    for lb in (False, True):
        local = LocalSplit.like(world, lb)
        ref, _ = _primitives(local)
        slots = local.slots // world
        for first in range(0, 4, world):  # each cp group of the four ranks
            grads = torch.zeros(B, T, D)
            for r in range(world):
                out, grad = ranks[first + r][("primitives", name, lb)]
                for key in ("tails", "s_in", "relayed"):
                    mine = ref[key].unflatten(0, (B, local.slots))[:, r * slots : (r + 1) * slots].flatten(0, 1)
                    torch.testing.assert_close(out[key], mine, msg=f"{key} rank {r} lb={lb}")
                torch.testing.assert_close(out["gathered"], ref["gathered"])
                torch.testing.assert_close(out["total"], ref["total"])
                grads += grad
            # the reference: one loss over all rows, with the replicated terms counted once per rank
            x, a, w = _inputs()
            x.requires_grad_(True)
            out = _exchanges(local, local.shard(x), local.shard(a))
            extra = (world - 1) * (out["total"] + (out["gathered"] * w[0]).sum())
            (_loss(out, w, local) + extra).backward()
            torch.testing.assert_close(grads, x.grad, msg=f"gradient lb={lb}")


@pytest.mark.parametrize("world", [2, 4])
def test_ring_attention_keeps_only_local_blocks(ranks, world):
    """Ring attention saves for its backward exactly its rank's q, k, v, output and log-sum-exp
    (the all-gather path, measured the same way, saves the gathered keys/values: the
    measurement sees them), and no rank ever holds more than two visiting key/value blocks or
    two gradient accumulators."""
    for r in range(4):
        m = ranks[r][("ring_memory", f"cp{world}")]
        assert m["saved"] == m["local"], f"rank {r}: saved {m['saved']} bytes, its own blocks are {m['local']}"
        assert m["allgather_saved"] >= m["gathered"] > 0
        assert m["peak_kv"] <= 2 and m["peak_dkv"] <= 2, f"rank {r}: {m}"


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_every_family_equals_one_process(ranks, case):
    """Each cp group's mean loss and mean gradients (what FSDP's averaging over the cp ranks
    gives) equal the single process on whole sequences (rel <= 1e-5)."""
    from tests.models.cp_reference import loss_and_grads
    from tests.models.test_context_parallel_models import assert_grads_match, model_and_batch

    families, cp, lb, kw, tp, ring = MODEL_CASES[case]
    groups = [[0, 1, 2, 3]] if cp == 4 else [[0, 2], [1, 3]] if tp > 1 else [[0, 1], [2, 3]]
    for family in families:
        model, *batch = model_and_batch(family, **kw)
        ref_loss, ref = loss_and_grads(model, *batch)
        _, exact = loss_and_grads(model.double(), *batch)
        local = LocalSplit.like(cp, lb)
        local.ring = ring
        _, exact_split = loss_and_grads(model, *batch, local)  # float64 too
        for group in groups:
            loss = sum(ranks[r][(case, family)][0] for r in group) / cp
            torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0, msg=f"{case} {family} loss")
            grads = {name: sum(ranks[r][(case, family)][1][name] for r in group) / cp for name in ref}
            assert_grads_match(grads, ref, exact, exact_split, f"{case} {family} ")
