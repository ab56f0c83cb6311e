from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import pytest
import torch

from pretrain.data import DataError, PackedLoader, cu_seqlens_from_position_ids, prepared_datasets, validation_batches
from pretrain.data import indexed
from pretrain.data.blend import PERIOD, BlendedSampler, quantize_weights
from pretrain.data.loader import VALID_SEED, PackedDataset, position_ids_from_eos

EOS = 2


def stream(prefix: str) -> np.ndarray:
    """The naive token stream: all documents concatenated."""
    data = indexed.open_dataset(prefix)
    return np.concatenate([data[i] for i in range(len(data))]).astype(np.int64)


def naive_positions(input_ids: np.ndarray) -> list[int]:
    out, pos = [], 0
    for t, token in enumerate(input_ids):
        out.append(pos)
        pos = 0 if token == EOS else pos + 1
    return out


@pytest.fixture(scope="module")
def train(corpus: dict) -> list[tuple[str, float]]:
    return prepared_datasets(corpus["cfg"].dir, "train")


@pytest.mark.parametrize("seq_len", [7, 64])
def test_samples_are_slices_of_the_stream(train: list, seq_len: int) -> None:
    for prefix, _ in train:
        ref = stream(prefix)
        ds = PackedDataset(prefix, seq_len)
        n = (len(ref) - 1) // seq_len
        assert len(ds) == max(n, 1)
        for i in range(n):
            tokens, positions = ds.sample(i)
            assert tokens.dtype == np.int64
            np.testing.assert_array_equal(tokens, ref[i * seq_len : i * seq_len + seq_len + 1])
            assert positions.tolist() == naive_positions(tokens[:-1])
            np.testing.assert_array_equal(positions, position_ids_from_eos(tokens[:-1], EOS))


def test_tiny_dataset_wraps_into_one_sample(corpus: dict) -> None:
    prefix = prepared_datasets(corpus["cfg"].dir, "valid")[1][0]  # the one held-out .txt document
    ref = stream(prefix)
    ds = PackedDataset(prefix, 3 * len(ref))
    assert len(ds) == 1
    tokens, positions = ds.sample(0)
    np.testing.assert_array_equal(tokens, np.resize(ref, 3 * len(ref) + 1))
    assert positions.tolist() == naive_positions(tokens[:-1])
    with pytest.raises(IndexError):
        ds[1]


def test_blend_equals_megatron() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import helpers_cpp

    for weights in ([0.5, 0.3, 0.2], [1.0, 1e-6, 2.0]):
        q = quantize_weights(weights)
        n = 3 * PERIOD  # beyond the precomputed stretch
        ds_index, ds_sample = np.zeros(n, np.int16), np.zeros(n, np.int64)
        helpers_cpp.build_blending_indices(ds_index, ds_sample, q / PERIOD, len(q), n, False)
        sampler = BlendedSampler([1 << 40] * len(q), weights, seed=0)
        mine = np.array([sampler.blend(g) for g in range(0, n, 7)])
        np.testing.assert_array_equal(mine[:, 0], ds_index[::7])
        np.testing.assert_array_equal(mine[:, 1], ds_sample[::7])


def test_blend_proportions_epochs_and_determinism() -> None:
    weights = [0.6, 0.3, 0.1]
    a, b = BlendedSampler([50, 40, 7], weights, seed=1), BlendedSampler([50, 40, 7], weights, seed=1)
    draws = [a[g] for g in range(5000)]
    assert draws == [b[g] for g in range(5000)]
    counts = np.bincount([d for d, _ in draws], minlength=3)
    np.testing.assert_allclose(counts / 5000, weights, atol=2 / 5000)
    small = [i for d, i in draws if d == 2]
    epochs = [small[k : k + 7] for k in range(0, 70, 7)]
    assert all(sorted(e) == list(range(7)) for e in epochs)  # each epoch visits every sample once
    assert len({tuple(e) for e in epochs}) > 1  # and is reshuffled
    other_seed = BlendedSampler([50, 40, 7], weights, seed=2)
    reseeded = [other_seed[g] for g in range(5000)]
    assert [d for d, _ in reseeded] == [d for d, _ in draws] and reseeded != draws  # same blend, new shuffle
    far = 10**12 + 3  # random access far ahead, no replay
    assert a.blend(far) == b.blend(far) and 0 <= a[far][1] < [50, 40, 7][a[far][0]]


def make_loader(train: list, dp_size: int = 1, dp_rank: int = 0, consumed: int = 0, mb: int = 2) -> PackedLoader:
    return PackedLoader(train, 16, 7, 8, mb, dp_rank, dp_size, consumed)


def test_batches(train: list) -> None:
    loader = make_loader(train)
    step = loader.next_step()
    assert len(step) == loader.grad_accum == 4 and loader.state_dict() == {"consumed_samples": 8, "order": "feistel"}
    for batch in step:
        assert {k: (v.dtype, tuple(v.shape)) for k, v in batch.items()} == {
            k: (torch.int64, (2, 16)) for k in ("input_ids", "labels", "position_ids")
        }
        torch.testing.assert_close(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    first = loader.sample(0)
    torch.testing.assert_close(step[0]["input_ids"][0], torch.from_numpy(first[0][:-1]))


def test_dp_ranks_partition_the_global_batch(train: list) -> None:
    single = make_loader(train)
    ranks = [make_loader(train, 2, r, mb=1) for r in range(2)]
    for _ in range(3):
        want = torch.cat([b["input_ids"] for b in single.next_step()])
        got = torch.cat([b["input_ids"] for r in ranks for b in r.next_step()])
        torch.testing.assert_close(got, want)


def test_resume_equals_uninterrupted(train: list) -> None:
    straight = make_loader(train)
    for _ in range(3):
        straight.next_step()
    state = straight.state_dict()
    resumed = make_loader(train)
    resumed.load_state_dict(state)
    regrouped = [make_loader(train, 4, r, consumed=state["consumed_samples"], mb=1) for r in range(4)]
    for _ in range(2):
        want = straight.next_step()
        got = resumed.next_step()
        for w, g in zip(want, got):
            for key in w:
                torch.testing.assert_close(g[key], w[key])
        on_four = torch.cat([b["position_ids"] for r in regrouped for b in r.next_step()])
        torch.testing.assert_close(on_four, torch.cat([b["position_ids"] for b in want]))


def test_bad_batch_sizes(train: list) -> None:
    with pytest.raises(ValueError, match="global_batch_size=8 is not a multiple of micro_batch_size\\*dp_size=3\\*1"):
        PackedLoader(train, 16, 0, 8, 3)
    with pytest.raises(ValueError, match="dp_rank=2"):
        PackedLoader(train, 16, 0, 8, 2, dp_rank=2, dp_size=2)


def test_cu_seqlens() -> None:
    pos = torch.tensor([[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]])
    cu, max_len = cu_seqlens_from_position_ids(pos)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 5, 6, 10] and max_len == 4


def _reference_validation_set(root: str, seq_len: int, n_samples: int) -> Counter:
    """The first ``min(n_samples, available)`` samples of the blended validation order, each as
    its ``seq_len + 1`` tokens sliced from the naive stream."""
    valid = prepared_datasets(root, "valid")
    streams = [stream(p) for p, _ in valid]
    sizes = [max(1, (len(s) - 1) // seq_len) for s in streams]
    sampler = BlendedSampler(sizes, [w for _, w in valid], VALID_SEED)
    rows = Counter()
    for g in range(min(n_samples, sum(sizes))):
        d, i = sampler[g]
        rows[tuple(streams[d][i * seq_len : (i + 1) * seq_len + 1].tolist())] += 1
    return rows


@pytest.mark.parametrize("n_samples", [2, 7, 10**6])
def test_validation_set_does_not_depend_on_the_layout(corpus: dict, n_samples: int) -> None:
    root, seq_len = corpus["cfg"].dir, 16
    want = _reference_validation_set(root, seq_len, n_samples)
    n = sum(want.values())
    assert n == min(n_samples, sum(len(PackedDataset(p, seq_len)) for p, _ in prepared_datasets(root, "valid")))
    for dp in (1, 2, 3):
        for mbs in (1, 2, 3):
            ranks = [validation_batches(root, seq_len, n_samples, mbs, r, dp) for r in range(dp)]
            # every rank runs the same, smallest number of micro-batches holding its share
            assert {len(b) for b in ranks} == {-(-(-(-n // dp)) // mbs)}, (dp, mbs)
            got, padding = Counter(), 0
            for batches in ranks:
                for batch in batches:
                    assert batch["input_ids"].shape == batch["labels"].shape == (mbs, seq_len)
                    for x, y in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
                        if all(t == -100 for t in y):  # padding: a real sample's inputs, no label
                            assert min(x) >= 0 and batch["input_ids"].data_ptr() != batch["labels"].data_ptr()
                            padding += 1
                            continue
                        assert x[1:] == y[:-1]
                        got[tuple(x + y[-1:])] += 1
            assert got == want, (dp, mbs)
            assert padding == dp * len(ranks[0]) * mbs - n


def test_validation_batches_are_fixed(corpus: dict) -> None:
    root = corpus["cfg"].dir
    a = validation_batches(root, 16, 10, 2, dp_rank=1, dp_size=2)
    b = validation_batches(root, 16, 10, 2, dp_rank=1, dp_size=2)
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        for key in x:
            torch.testing.assert_close(x[key], y[key])


def test_not_prepared(tmp_path) -> None:
    with pytest.raises(DataError, match="is not prepared: run `pretrain prepare CONFIG`"):
        validation_batches(str(tmp_path), 16, 4, 1)


def test_feistel_order_is_a_uniform_permutation() -> None:
    """Every size, small to odd to a power of two plus one, gives a bijection of range(n); keys
    of another seed or epoch give another order; positions look uniform (the mean jump between
    consecutive positions is n/3 and the rank correlation with i is near 0, as for a random
    permutation: an identity or a stride would fail both)."""
    from pretrain.data.blend import feistel_keys, feistel_permute

    for n in (1, 2, 3, 7, 64, 65, 1000, 4097):
        keys = feistel_keys(0, 1, 2)
        assert sorted(feistel_permute(i, n, keys) for i in range(n)) == list(range(n)), n
    n = 20000
    a = np.array([feistel_permute(i, n, feistel_keys(5, 0, 0)) for i in range(n)])
    b = np.array([feistel_permute(i, n, feistel_keys(5, 0, 1)) for i in range(n)])
    assert (a != b).mean() > 0.99
    assert abs(np.abs(np.diff(a)).mean() / n - 1 / 3) < 0.01
    assert abs(np.corrcoef(np.arange(n), a)[0, 1]) < 0.03
    with pytest.raises(IndexError):
        feistel_permute(n, n, feistel_keys(5, 0, 0))


def test_feistel_epochs_and_huge_datasets() -> None:
    """The default order visits each sample once per epoch, reshuffles per epoch, and indexes a
    244M-sample dataset (a trillion tokens at 4096) with no stored index: the sampler holds only
    a few round keys."""
    sampler = BlendedSampler([13], [1.0], seed=3)
    epochs = [[sampler[g][1] for g in range(e * 13, (e + 1) * 13)] for e in range(3)]
    assert all(sorted(e) == list(range(13)) for e in epochs) and epochs[0] != epochs[1]
    big = BlendedSampler([244_000_000, 5], [0.9, 0.1], seed=0)
    draws = [big[g] for g in range(10**9, 10**9 + 200)]
    assert all(0 <= i < (244_000_000, 5)[d] for d, i in draws)
    assert all(isinstance(v, tuple) and len(v) == 6 for v in big._perms.values())


def test_checkpoint_without_order_keeps_the_permutation_order(train: list) -> None:
    """A checkpoint written before the order was recorded ({"consumed_samples"} only) resumes in
    the stored-permutation order it was trained with, and keeps recording it."""
    old = make_loader(train)
    old.sampler = BlendedSampler(old.sampler.sizes, old._weights, old.sampler.seed, "permutation")
    old.next_step()
    resumed = make_loader(train)
    resumed.load_state_dict({"consumed_samples": old.consumed_samples})
    for w, g in zip(old.next_step(), resumed.next_step()):
        torch.testing.assert_close(g["input_ids"], w["input_ids"])
    assert resumed.state_dict()["order"] == "permutation"
    fresh = make_loader(train)
    fresh.load_state_dict({"consumed_samples": 8, "order": "feistel"})
    assert fresh.state_dict()["order"] == "feistel"
    with pytest.raises(DataError, match="data order 'shuffle9'"):
        fresh.load_state_dict({"consumed_samples": 8, "order": "shuffle9"})
