"""Feature ids ("fids"): int64 with the feature slot in the high bits, a hashed value below.

This is Monolith's layout: one table can hold many slots, and per-slot policies stay
possible because the slot is recoverable from the fid. Fids are always non-negative.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

SLOT_BITS = 15
VALUE_BITS = 48
MAX_SLOT = (1 << SLOT_BITS) - 1
VALUE_MASK = (1 << VALUE_BITS) - 1

# Fixed slots of the built-in features; context features hash their name into [64, MAX_SLOT].
SLOT_USER = 1
SLOT_ITEM = 2
SLOT_POSITION = 3
_FIRST_CONTEXT_SLOT = 64


def make_fid(slot: int, value_hash: int) -> int:
    """Combines a slot and a value hash into a fid."""
    if not 0 <= slot <= MAX_SLOT:
        raise ValueError(f"slot {slot} outside [0, {MAX_SLOT}]")
    return (slot << VALUE_BITS) | (value_hash & VALUE_MASK)


def slot_of(fid: int | np.ndarray) -> int | np.ndarray:
    """The slot a fid (or an int64 array of fids) belongs to."""
    return fid >> VALUE_BITS


def hash_value(value: int | str | bytes) -> int:
    """A stable 64-bit hash of a feature value (blake2b; stable across processes, unlike hash())."""
    if isinstance(value, int):
        value = value.to_bytes(8, "little", signed=True)
    elif isinstance(value, str):
        value = value.encode()
    return int.from_bytes(hashlib.blake2b(value, digest_size=8).digest(), "little")


def context_slot(name: str) -> int:
    """The slot of a named context feature, stable across processes."""
    return _FIRST_CONTEXT_SLOT + hash_value(name) % (MAX_SLOT - _FIRST_CONTEXT_SLOT + 1)


def int_fids(slot: int, values: np.ndarray) -> np.ndarray:
    """Vectorised fids for integer ids (splitmix64 mixing), int64 [n] for int64 [n]."""
    if not 0 <= slot <= MAX_SLOT:
        raise ValueError(f"slot {slot} outside [0, {MAX_SLOT}]")
    x = np.asarray(values, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return ((np.uint64(slot) << np.uint64(VALUE_BITS)) | (x & np.uint64(VALUE_MASK))).astype(np.int64)


def example_fids(
    user_id: int, item_ids: np.ndarray, position: int, context: dict[str, str] | None = None
) -> np.ndarray:
    """The fids of one user's candidate items: int64 [n_items, n_features].

    Column order: user, item, position, then context features sorted by name. The joiner
    (training) and the predictor (serving) both call this, so features cannot skew.
    """
    item_ids = np.asarray(item_ids, dtype=np.int64)
    n = item_ids.shape[0]
    user = int_fids(SLOT_USER, np.array([user_id]))[0]
    pos = int_fids(SLOT_POSITION, np.array([position]))[0]
    columns = [np.full(n, user, np.int64), int_fids(SLOT_ITEM, item_ids), np.full(n, pos, np.int64)]
    for name in sorted(context or {}):
        columns.append(np.full(n, context_fid(name, context[name]), np.int64))
    return np.stack(columns, axis=1) if n else np.zeros((0, len(columns)), np.int64)


@lru_cache(maxsize=1 << 16)
def context_fid(name: str, value: str) -> int:
    """The fid of one context feature (memoised: context vocabularies are small and hot)."""
    return make_fid(context_slot(name), hash_value(value))


def batch_example_fids(
    user_ids: np.ndarray,
    item_ids: np.ndarray,
    positions: np.ndarray,
    contexts: Sequence[Sequence[tuple[str, str]]],
) -> tuple[np.ndarray, np.ndarray]:
    """The fids of many (user, item, position, context) examples at once: (fids int64 [T], lengths int32 [B]).

    Example ``i`` owns ``fids[sum(lengths[:i]):][:lengths[i]]``, equal to
    ``example_fids(user_ids[i], [item_ids[i]], positions[i], dict(contexts[i]))[0]``; each context is
    (name, value) pairs sorted by name.
    """
    n = len(item_ids)
    ids = np.empty((n, 3), np.int64)
    ids[:, 0], ids[:, 1], ids[:, 2] = user_ids, item_ids, positions
    base = _mixed_fids(ids, _BASE_SLOTS)  # [n, 3]: the three int_fids columns in one pass
    extra = [len(ctx) for ctx in contexts]
    width = extra[0] if n else 0
    if extra.count(width) == n:  # every example has as many context features (the common case)
        if width == 0:
            return base.reshape(-1), np.full(n, 3, np.int32)
        try:
            context = np.fromiter(itertools.chain.from_iterable(map(_context_fids, contexts)), np.int64, n * width)
        except TypeError:  # contexts given as lists, which cannot key the memo
            context = np.fromiter((context_fid(k, v) for ctx in contexts for k, v in ctx), np.int64, n * width)
        fids = np.concatenate([base, context.reshape(n, width)], axis=1)
        return fids.reshape(-1), np.full(n, 3 + width, np.int32)
    lengths = np.asarray(extra, np.int32) + 3
    starts = np.zeros(n, np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    fids = np.empty(int(lengths.sum()), np.int64)
    for column in range(3):
        fids[starts + column] = base[:, column]
    context = np.fromiter((context_fid(k, v) for ctx in contexts for k, v in ctx), np.int64, sum(extra))
    counts = np.asarray(extra, np.int64)
    first = np.repeat(starts + 3 - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    fids[first + np.arange(len(context))] = context
    return fids, lengths


_BASE_SLOTS = np.array([SLOT_USER, SLOT_ITEM, SLOT_POSITION], np.uint64) << np.uint64(VALUE_BITS)


def _mixed_fids(values: np.ndarray, slot_bits: np.ndarray) -> np.ndarray:
    """``int_fids`` of each column of int64 [n, k] values with its own slot (``slot_bits``: uint64 [k], the
    slots shifted into place): int64 [n, k]."""
    x = values.astype(np.uint64)
    with np.errstate(over="ignore"):
        x += np.uint64(0x9E3779B97F4A7C15)
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    x &= np.uint64(VALUE_MASK)
    x |= slot_bits
    return x.view(np.int64)


@lru_cache(maxsize=1 << 14)
def _context_fids(context: tuple[tuple[str, str], ...]) -> tuple[int, ...]:
    """The fids of one example's context, in its order (memoised: whole contexts repeat too)."""
    return tuple(context_fid(name, value) for name, value in context)


def shard_of(fids: np.ndarray, num_shards: int) -> np.ndarray:
    """The store shard owning each fid: int64 [n] in [0, num_shards). Every client and shard agrees."""
    x = np.asarray(fids, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(31))) * np.uint64(0x7FB5D329728EA185)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x81DADEF4BC2DD44D)
        x = x ^ (x >> np.uint64(33))
    return (x % np.uint64(num_shards)).astype(np.int64)
