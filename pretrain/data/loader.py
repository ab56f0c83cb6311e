"""Packed, blended, resumable batches from prepared token shards.

A dataset's documents (each ending with eos) form one token stream, cut Megatron-GPT style into
samples of ``seq_len + 1`` tokens with stride ``seq_len``: sample i is ``stream[i*T : i*T+T+1]``,
inputs are its first T tokens and labels its last T. Samples are blended over datasets and
shuffled per epoch by :class:`~pretrain.data.blend.BlendedSampler`, whose order does not depend
on the number of data-parallel ranks: a run resumes exactly, on any number of ranks, from
``consumed_samples`` alone.
"""

from __future__ import annotations

import numpy as np
import torch

from pretrain.data import indexed
from pretrain.data.blend import ORDERS, BlendedSampler
from pretrain.data.errors import DataError
from pretrain.data.meta import prepared_datasets

Batch = dict[str, torch.Tensor]


class PackedDataset:
    """Fixed-length samples of one indexed dataset's token stream.

    ``ds[i]`` is ``int64 [seq_len + 1]``. The last incomplete sample is dropped; a stream with
    fewer than ``seq_len + 1`` tokens (a tiny validation split) is repeated cyclically into one
    sample, so every non-empty dataset has at least one.
    """

    def __init__(self, prefix: str, seq_len: int):
        if seq_len <= 0:
            raise ValueError(f"seq_len must be > 0, got {seq_len}")
        if not indexed.exists(prefix):
            raise DataError(f"{prefix}.bin/.idx: no such indexed dataset")
        self.prefix = prefix
        self.seq_len = seq_len
        self._data = indexed.open_dataset(prefix)
        lengths = np.asarray(self._data.sequence_lengths, dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(lengths)])  # [docs + 1] stream offset of each document
        self.n_tokens = int(self._starts[-1])
        if self.n_tokens == 0:
            raise DataError(f"{prefix}: the dataset holds no tokens")
        self._len = max(1, (self.n_tokens - 1) // seq_len)

    def __len__(self) -> int:
        return self._len

    def _span(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens [length] of the cyclic stream from ``start`` and each token's offset in its
        document [length]; megatron's ``get(doc, offset, n)`` reads each document piece."""
        tokens = np.empty(length, dtype=np.int64)
        offsets = np.empty(length, dtype=np.int64)
        pos, done = start % self.n_tokens, 0
        while done < length:
            doc = int(np.searchsorted(self._starts, pos, side="right")) - 1
            off = pos - int(self._starts[doc])
            take = min(length - done, int(self._starts[doc + 1]) - pos)
            tokens[done : done + take] = self._data.get(doc, off, take)
            offsets[done : done + take] = np.arange(off, off + take)
            done += take
            pos = (pos + take) % self.n_tokens
        return tokens, offsets

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens ``int64 [seq_len + 1]`` and position ids ``int64 [seq_len]`` of sample i.

        Position t counts the tokens since the last document start within the sample (0 at the
        sample's first token and after every document end). Taken from the index's document
        boundaries, so it equals the eos rule on our data and stays right for corpora without eos.
        """
        if not 0 <= i < self._len:
            raise IndexError(f"sample {i} of {self._len}")
        tokens, offsets = self._span(i * self.seq_len, self.seq_len + 1)
        return tokens, np.minimum(offsets[:-1], np.arange(self.seq_len))

    def __getitem__(self, i: int) -> np.ndarray:
        return self.sample(i)[0]


def position_ids_from_eos(input_ids: np.ndarray, eos_id: int) -> np.ndarray:
    """Position ids ``[..., T]`` of input ids ``[..., T]``: 0 at the first token and after each eos."""
    x = np.asarray(input_ids)
    t = np.arange(x.shape[-1])
    start = np.zeros(x.shape, dtype=bool)
    start[..., 0] = True
    start[..., 1:] = x[..., :-1] == eos_id
    last_start = np.maximum.accumulate(np.where(start, t, 0), axis=-1)
    return t - last_start


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """flash-attn varlen boundaries of a packed batch ``[B, T]`` flattened to ``[B*T]``:
    ``cu_seqlens`` int32 ``[n_segments + 1]`` (segment starts, then B*T) and the longest segment.
    Every row starts a segment, so segments never cross rows. ``max_len`` syncs with the device."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).reshape(-1)
    end = torch.tensor([flat.numel()], device=flat.device, dtype=starts.dtype)
    cu = torch.cat([starts, end]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max().item())


class PackedLoader:
    """Global batches of the blended sample order, sliced for one data-parallel rank.

    Step s covers global samples ``[consumed, consumed + global_batch_size)``; rank r takes the
    contiguous ``r``-th of ``dp_size`` slices and splits it into micro-batches. The order is
    independent of ``global_batch_size``, ``dp_size`` and ``micro_batch_size``, so a restored
    ``consumed_samples`` continues exactly under any batch size and layout: no sample is skipped
    or repeated. It does depend on the datasets, ``seq_len``, the weights and ``seed``: under
    other values the same count names other tokens (a resume changing them is refused, see
    :func:`pretrain.train.resume_checks.check_data_order`).

    Args:
        datasets: ``(path prefix, weight)`` per dataset (see ``prepared_datasets``).
        seq_len: tokens per sample T.
        seed: data-order seed.
        global_batch_size: samples per optimizer step over all ranks.
        micro_batch_size: samples per forward on one rank.
        dp_rank, dp_size: this rank and the number of data-parallel ranks.
        consumed_samples: samples of the blended order already used (resumption).
    """

    def __init__(
        self,
        datasets: list[tuple[str, float]],
        seq_len: int,
        seed: int,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        consumed_samples: int = 0,
    ):
        if not datasets:
            raise ValueError("PackedLoader needs at least one dataset")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} is not in [0, dp_size={dp_size})")
        if micro_batch_size <= 0 or global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(
                f"global_batch_size={global_batch_size} is not a multiple of "
                f"micro_batch_size*dp_size={micro_batch_size}*{dp_size}"
            )
        self.datasets = [PackedDataset(prefix, seq_len) for prefix, _ in datasets]
        self._weights = [w for _, w in datasets]
        self.sampler = BlendedSampler([len(d) for d in self.datasets], self._weights, seed)
        self.seq_len = seq_len
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.grad_accum = global_batch_size // (micro_batch_size * dp_size)
        self.consumed_samples = int(consumed_samples)

    def sample(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens [T + 1] and position ids [T] of global sample g."""
        d, i = self.sampler[g]
        return self.datasets[d].sample(i)

    def batch(self, samples: range | list[int]) -> Batch:
        """A micro-batch of global samples: input_ids, labels, position_ids, each int64 [mb, T],
        each its own storage (a caller may mask labels in place)."""
        tokens, positions = zip(*(self.sample(g) for g in samples))
        x = torch.from_numpy(np.stack(tokens))  # [mb, T + 1]
        # copies: with one row both slices are already contiguous, and .contiguous() would
        # return views sharing x's storage (masking labels then rewrote the inputs)
        return {
            "input_ids": x[:, :-1].clone(memory_format=torch.contiguous_format),
            "labels": x[:, 1:].clone(memory_format=torch.contiguous_format),
            "position_ids": torch.from_numpy(np.stack(positions)),
        }

    def next_step(self) -> list[Batch]:
        """This rank's micro-batches of the next optimizer step (``grad_accum`` of them)."""
        per_rank = self.global_batch_size // self.dp_size
        first = self.consumed_samples + self.dp_rank * per_rank
        mb = self.micro_batch_size
        out = [self.batch(range(first + a * mb, first + (a + 1) * mb)) for a in range(self.grad_accum)]
        self.consumed_samples += self.global_batch_size
        return out

    def state_dict(self) -> dict:
        """The data position: samples of the global order consumed so far (not steps or epochs),
        and the per-epoch shuffle that order uses (see :data:`~pretrain.data.blend.ORDERS`)."""
        return {"consumed_samples": self.consumed_samples, "order": self.sampler.order}

    def load_state_dict(self, state: dict) -> None:
        """Continue at ``state``'s position in ``state``'s order: a checkpoint written before
        the order was recorded used the stored NumPy permutation, so it keeps that one."""
        order = state.get("order", "permutation")
        if order not in ORDERS:
            raise DataError(f"the checkpoint's data order {order!r} is unknown (known: {', '.join(ORDERS)})")
        if order != self.sampler.order:
            self.sampler = BlendedSampler(self.sampler.sizes, self._weights, self.sampler.seed, order)
        self.consumed_samples = int(state["consumed_samples"])


VALID_SEED = 0
"""Seed of the validation sample order: fixed, so every evaluation scores the same samples."""


def validation_batches(
    data_dir: str,
    seq_len: int,
    n_samples: int,
    micro_batch_size: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    weights: list[float] | None = None,
) -> list[Batch]:
    """This rank's validation micro-batches (the same on every call), each as
    :meth:`PackedLoader.batch` (input_ids, labels, position_ids, int64 ``[micro_batch_size, T]``).

    The validation set is the first ``N = min(n_samples, available)`` samples of the split's
    blended order under the fixed :data:`VALID_SEED`, whatever ``dp_size`` and
    ``micro_batch_size``: rank r scores samples ``r, r + dp_size, ...`` (Megatron's strided
    split), then rows of padding (a sample's inputs with every label -100, so they count no
    token) up to ``ceil(ceil(N / dp_size) / micro_batch_size)`` micro-batches, so that every rank
    runs the same number of equally shaped forwards (collectives must match). The loss over the
    set is ``sum(token losses) / counted tokens`` summed over ranks (see
    :meth:`pretrain.train.trainer.Trainer.evaluate`). Weights default to token shares.

    Raises ValueError for ``n_samples``, ``micro_batch_size`` or ``dp_size`` <= 0 or ``dp_rank``
    outside ``[0, dp_size)``; DataError for a data directory without a validation split.
    """
    if n_samples <= 0:
        raise ValueError(f"n_samples must be > 0, got {n_samples}")
    if micro_batch_size <= 0:
        raise ValueError(f"micro_batch_size must be > 0, got {micro_batch_size}")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} is not in [0, dp_size={dp_size})")
    valid = prepared_datasets(data_dir, "valid", weights)
    valid = [(p, w) for p, w in valid if w > 0]
    # only .batch() is used: the global/micro batch arguments do not matter
    loader = PackedLoader(valid, seq_len, VALID_SEED, micro_batch_size, micro_batch_size)
    n = min(n_samples, sum(len(d) for d in loader.datasets))
    own = list(range(dp_rank, n, dp_size))
    per_rank = -(-(-(-n // dp_size)) // micro_batch_size) * micro_batch_size
    rows = own + [None] * (per_rank - len(own))  # None: a padding row
    return [_masked_batch(loader, rows[i : i + micro_batch_size]) for i in range(0, per_rank, micro_batch_size)]


def _masked_batch(loader: PackedLoader, rows: list[int | None]) -> Batch:
    """:meth:`PackedLoader.batch` of ``rows`` where each None row is global sample 0 with every
    label -100: shaped like the others, it counts no token in the loss."""
    batch = loader.batch([0 if g is None else g for g in rows])
    pad = torch.tensor([g is None for g in rows])
    batch["labels"][pad] = -100
    return batch
