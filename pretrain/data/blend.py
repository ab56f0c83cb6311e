"""A deterministic, random-access order of samples drawn from several datasets by weight.

Global sample ``g`` maps to (dataset ``d``, local draw ``j``) by Megatron's greedy blend: at
every position pick the dataset whose realised share lags its weight the most (the first on
ties); the ``j``-th draw from ``d`` then reads sample ``perm_e[j % n_d]`` of epoch
``e = j // n_d``, where ``perm_e`` is a pseudo-random permutation keyed by ``(seed, d, e)``.

The permutation is stateless (:func:`feistel_permute`): a keyed Feistel network on the smallest
even power of two >= n_d, walked until it lands inside [0, n_d). Each index costs a few integer
operations and nothing is stored, so a trillion-token run (about 244M samples of 4096 tokens)
starts at once and holds no per-epoch index; Megatron instead builds and caches a shuffle index
on disk. ``order="permutation"`` keeps the earlier ``default_rng([seed, d, e]).permutation(n_d)``
(an int64 array per dataset and epoch, rebuilt at start), for checkpoints written with it.

Random access without replaying the blend: weights are quantised to integers ``q_d`` summing to
``PERIOD`` (a power of two, so ``q_d / PERIOD`` are exact doubles and the decisions equal
Megatron's ``build_blending_indices`` on those weights). From position ``PERIOD`` on, the
greedy state repeats every ``PERIOD`` positions (checked, not assumed), so one precomputed
stretch answers any ``g`` in O(1).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

PERIOD = 1 << 16
"""Weights are resolved to 1/PERIOD; also the length of one precomputed stretch."""

ORDERS = ("feistel", "permutation")
"""Shuffles of one dataset's samples per epoch: the stateless Feistel permutation (the default)
and the stored NumPy permutation of earlier checkpoints."""

FEISTEL_ROUNDS = 6
_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """SplitMix64's finaliser: a bijective 64-bit hash with full avalanche."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
    return x ^ (x >> 31)


def feistel_keys(seed: int, *stream: int) -> tuple[int, ...]:
    """The round keys of the permutation for ``(seed, *stream)`` (e.g. dataset and epoch)."""
    ss = np.random.SeedSequence([int(seed), *map(int, stream)])
    return tuple(int(k) for k in ss.generate_state(FEISTEL_ROUNDS, dtype=np.uint64))


def feistel_permute(i: int, n: int, keys: tuple[int, ...]) -> int:
    """Position ``i`` of a pseudo-random permutation of ``range(n)`` (a bijection for fixed
    ``n`` and ``keys``), computed without storing it.

    A balanced Feistel network over ``2h`` bits, ``4**h >= n``, with ``len(keys)`` rounds of a
    keyed SplitMix64 round function, is a permutation of ``range(4**h)``; cycle walking (apply it
    again while the result is >= n) restricts it to ``range(n)`` (Black and Rogaway, "Ciphers with
    arbitrary finite domains", 2002). ``4**h < 4n``, so a walk takes fewer than 4 applications on
    average. Raises IndexError unless 0 <= i < n."""
    if not 0 <= i < n:
        raise IndexError(f"index {i} of a permutation of {n}")
    if n == 1:
        return 0
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = (1 << half) - 1
    x = i
    while True:
        left, right = x >> half, x & mask
        for k in keys:
            left, right = right, left ^ (_mix64(right ^ k) & mask)
        x = (left << half) | right
        if x < n:
            return x


def quantize_weights(weights: list[float], total: int = PERIOD) -> np.ndarray:
    """Integers proportional to ``weights`` summing to ``total`` (largest remainders; a positive
    weight never rounds to zero)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"blend weights must be non-negative with a positive sum, got {list(weights)}")
    if (w > 0).sum() > total:
        raise ValueError(f"at most {total} datasets can be blended")
    exact = w / w.sum() * total
    q = np.floor(exact).astype(np.int64)
    q[(w > 0) & (q == 0)] = 1
    order = np.argsort(-(exact - q), kind="stable")
    i = 0
    while q.sum() < total:
        q[order[i % len(q)]] += 1
        i += 1
    while q.sum() > total:  # only after raising tiny weights to 1: take from the largest
        q[np.argmax(q)] -= 1
    return q


def greedy_blend(q: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Megatron's greedy blend of ``size`` positions: dataset index [size] and the number of
    earlier draws from that dataset [size]. Integer arithmetic: error_d * total = q_d *
    max(k, 1) - c_d * total (the ``max`` is Megatron's)."""
    total = int(q.sum())
    qs = [int(x) for x in q]
    counts = [0] * len(qs)
    ds = np.empty(size, dtype=np.int32)
    js = np.empty(size, dtype=np.int64)
    for k in range(size):
        kk = max(k, 1)
        best, best_err = 0, qs[0] * kk - counts[0] * total
        for d in range(1, len(qs)):
            err = qs[d] * kk - counts[d] * total
            if err > best_err:
                best, best_err = d, err
        ds[k] = best
        js[k] = counts[best]
        counts[best] += 1
    return ds, js


class BlendedSampler:
    """``sampler[g] -> (dataset index, sample index)`` for any global position g >= 0.

    Args:
        sizes: samples in each dataset (all > 0 where the weight is > 0).
        weights: blend weights (normalised here).
        seed: the data-order seed.
        order: the per-epoch shuffle, one of :data:`ORDERS`.
    """

    def __init__(self, sizes: list[int], weights: list[float], seed: int, order: str = "feistel"):
        if len(sizes) != len(weights):
            raise ValueError(f"{len(sizes)} datasets but {len(weights)} weights")
        if order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
        self.order = order
        self.sizes = [int(s) for s in sizes]
        self.seed = int(seed)
        self.q = quantize_weights(weights)
        if any(s <= 0 for s, q in zip(self.sizes, self.q) if q > 0):
            raise ValueError(f"a dataset with positive weight has no samples (sizes {self.sizes})")
        self._build_blend()
        self._perms: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def _build_blend(self) -> None:
        total = int(self.q.sum())
        if np.count_nonzero(self.q) == 1:  # one dataset: position g is its draw g
            self._ds = np.full(total, int(np.argmax(self.q)), dtype=np.int32)
            self._js = np.arange(total, dtype=np.int64)
            self._base, self._period = 0, total
            return
        # decisions at k >= 1 depend only on k mod total and the state q*m - c(m*total) at the
        # last multiple of total, so the blend repeats from the first multiple whose state recurs
        for m in range(2, 17):
            ds, js = greedy_blend(self.q, m * total)
            onehot = np.zeros((m * total, len(self.q)), dtype=np.int64)
            onehot[np.arange(m * total), ds] = 1
            counts = onehot.reshape(m, total, -1).sum(1).cumsum(0)  # [m, datasets] draws by j*total
            states = (np.arange(1, m + 1)[:, None] * self.q[None, :] - counts).tolist()
            if states[-1] in states[:-1]:
                j = states.index(states[-1]) + 1
                self._ds, self._js = ds, js
                self._base, self._period = j * total, (m - j) * total
                return
        raise RuntimeError(f"blend of weights {self.q.tolist()} did not become periodic")

    def blend(self, g: int) -> tuple[int, int]:
        """(dataset, draw number within that dataset) of global position g."""
        if g < 0:
            raise IndexError(g)
        if g < len(self._ds):
            return int(self._ds[g]), int(self._js[g])
        cycles, r = divmod(g - self._base, self._period)
        k = self._base + r
        d = int(self._ds[k])
        # every full cycle draws period * q_d / total samples from dataset d
        per_cycle = self._period // int(self.q.sum()) * int(self.q[d])
        return d, int(self._js[k]) + cycles * per_cycle

    def _perm(self, d: int, epoch: int):
        """The round keys (``feistel``) or the stored permutation (``permutation``) of dataset
        ``d``'s epoch; the last few are kept (a batch spans at most 2 epochs per dataset)."""
        key = (d, epoch)
        if key not in self._perms:
            if self.order == "feistel":
                self._perms[key] = feistel_keys(self.seed, d, epoch)
            else:
                self._perms[key] = np.random.default_rng([self.seed, d, epoch]).permutation(self.sizes[d])
            if len(self._perms) > 2 * len(self.sizes) + 2:
                self._perms.popitem(last=False)
        else:
            self._perms.move_to_end(key)
        return self._perms[key]

    def __getitem__(self, g: int) -> tuple[int, int]:
        d, j = self.blend(g)
        epoch, i = divmod(j, self.sizes[d])
        perm = self._perm(d, epoch)
        if self.order == "feistel":
            return d, feistel_permute(i, self.sizes[d], perm)
        return d, int(perm[i])
