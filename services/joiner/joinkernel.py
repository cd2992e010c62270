"""The compiled core of ``ColumnJoin``: the rules of ``services/joiner/eventjoin.py`` over arrays, in numba.

``EventJoin`` is the reference: these functions apply the same rules to the same events and give the same
samples and counters (``tests/services/test_joiner_columnjoin.py`` checks them against the same reference
model). Only the order of windows that fire at the same millisecond may differ: here they fire by slot,
there by key.

The state lives in slots (one per key that has a window or buffered actions: arrays ``s_*``), a hash
table from key to slot (open addressing, linear probing, backward-shift deletion), a binary heap of
timers, and a pool of buffered actions. A key is (request, item): the caller numbers request ids
(``rid``) and keeps their strings; each slot counts towards its request's ``r_refs``. A new key takes a
slot from the free stack ``fs`` (the caller keeps at least as many there as the call has events); a slot
that becomes free leaves the table at once and is listed in ``released``, and the caller puts it back
on the free stack after the call (so a slot is never reused within a call, and the output can still
name its key).

Timers are (due ms, kind, slot). CLOSE and ORPHAN timers are in the heap; FORGET timers, due ``retention``
after their window's close, are scheduled as windows close, i.e. in order of their due times, so they
wait in a FIFO ring (``q_at``, ``q_slot``) instead: the heap holds open windows only, however long keys
are remembered. Removed timers are not searched for: a timer that no longer applies (its slot closed,
forgotten or taken by another key) finds its slot in another state or with another due time, and does
nothing (see ``fire``).
"""

from __future__ import annotations

import numba
import numpy as np

# Slot states
FREE, BUFFER, OPEN, CLOSED = 0, 1, 2, 3
# Timer kinds, in firing order at the same due time (as EventJoin's "c" < "f" < "o")
T_CLOSE, T_FORGET, T_ORPHAN = 0, 1, 2
# Event kinds (as freshet.eventcolumns)
K_IMPRESSION, K_ACTION = 1, 2
DWELL = 4
# Counters, in services.joiner.eventjoin.COUNTERS order
C_IMPRESSIONS, C_ACTIONS, C_POSITIVES, C_UPDATES, C_CORRECTIONS, C_NEGATIVES, C_DOWNSAMPLED = range(7)
C_DUP_IMPRESSIONS, C_LATE_IMPRESSIONS, C_DUP_ACTIONS, C_OUT_OF_WINDOW, C_LATE_ACTIONS = range(7, 12)
C_BUFFERED, C_ORPHANS, C_FORGOTTEN = range(12, 15)
# Scalars (``sc``, int64)
S_HAS_WM, S_WM, S_HAS_MAX, S_MAX, S_HEAP, S_POOL_FREE, S_POOL_NEXT = range(7)
S_DIRTY, S_OUT, S_RELEASED, S_ARRIVALS, S_FREE, S_LIVE, S_QHEAD, S_QLEN = range(7, 15)
SCALARS = 15
EMPTY = -1  # an empty hash table entry


@numba.njit(cache=True, inline="always")
def _mix(rid, item):
    x = np.uint64(rid) * np.uint64(0x9E3779B97F4A7C15) ^ np.uint64(item)
    x ^= x >> np.uint64(31)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(29)
    return x


@numba.njit(cache=True, inline="always")
def find_or_add(ht, s_rid, s_item, fs, r_refs, sc, rid, item):
    """The slot of key (rid, item); a new key takes a slot off the free stack (its state stays FREE)."""
    mask = np.uint64(ht.shape[0] - 1)
    h = _mix(rid, item) & mask
    while True:
        slot = ht[h]
        if slot == EMPTY:
            n = sc[S_FREE] - 1
            sc[S_FREE] = n
            slot = fs[n]
            ht[h] = slot
            s_rid[slot], s_item[slot] = rid, item
            r_refs[rid] += 1
            sc[S_LIVE] += 1
            return slot
        if s_rid[slot] == rid and s_item[slot] == item:
            return slot
        h = (h + np.uint64(1)) & mask


@numba.njit(cache=True, inline="always")
def _remove(ht, s_rid, s_item, slot):
    """Takes slot out of the table, shifting back the entries after it that probed past it."""
    mask = np.uint64(ht.shape[0] - 1)
    i = _mix(s_rid[slot], s_item[slot]) & mask
    while ht[i] != slot:
        i = (i + np.uint64(1)) & mask
    j = i
    while True:
        j = (j + np.uint64(1)) & mask
        other = ht[j]
        if other == EMPTY:
            break
        k = _mix(s_rid[other], s_item[other]) & mask
        if (i <= j and i < k <= j) or (i > j and (k > i or k <= j)):
            continue  # its probe starts after the hole: it stays
        ht[i] = other
        i = j
    ht[i] = EMPTY


@numba.njit(cache=True)
def rehash(ht, state, s_rid, s_item):
    """Fills an empty table with every slot in use."""
    mask = np.uint64(ht.shape[0] - 1)
    for slot in range(state.shape[0]):
        if state[slot] != FREE:
            h = _mix(s_rid[slot], s_item[slot]) & mask
            while ht[h] != EMPTY:
                h = (h + np.uint64(1)) & mask
            ht[h] = slot


@numba.njit(cache=True)
def add_keys(ht, s_rid, s_item, fs, r_refs, sc, rids, items, out):
    """Slots for new keys (restoring a state): ``out[i]`` is the slot of (rids[i], items[i])."""
    for i in range(rids.shape[0]):
        out[i] = find_or_add(ht, s_rid, s_item, fs, r_refs, sc, rids[i], items[i])


@numba.njit(cache=True, inline="always")
def _less(h_at, h_kind, h_slot, a, b):
    if h_at[a] != h_at[b]:
        return h_at[a] < h_at[b]
    if h_kind[a] != h_kind[b]:
        return h_kind[a] < h_kind[b]
    return h_slot[a] < h_slot[b]


@numba.njit(cache=True, inline="always")
def _swap(h_at, h_kind, h_slot, a, b):
    h_at[a], h_at[b] = h_at[b], h_at[a]
    h_kind[a], h_kind[b] = h_kind[b], h_kind[a]
    h_slot[a], h_slot[b] = h_slot[b], h_slot[a]


@numba.njit(cache=True, inline="always")
def heap_push(h_at, h_kind, h_slot, sc, at, kind, slot):
    """Adds a timer; the caller keeps the heap arrays longer than any call can fill them."""
    i = sc[S_HEAP]
    sc[S_HEAP] = i + 1
    h_at[i], h_kind[i], h_slot[i] = at, kind, slot
    while i > 0:
        parent = (i - 1) >> 1
        if not _less(h_at, h_kind, h_slot, i, parent):
            break
        _swap(h_at, h_kind, h_slot, i, parent)
        i = parent


@numba.njit(cache=True, inline="always")
def ring_push(q_at, q_slot, sc, at, slot):
    """Appends a FORGET timer (due no earlier than any before it; the caller keeps room in the ring)."""
    i = (sc[S_QHEAD] + sc[S_QLEN]) % q_at.shape[0]
    q_at[i], q_slot[i] = at, slot
    sc[S_QLEN] += 1


@numba.njit(cache=True, inline="always")
def _heap_pop(h_at, h_kind, h_slot, sc):
    n = sc[S_HEAP] - 1
    sc[S_HEAP] = n
    _swap(h_at, h_kind, h_slot, 0, n)
    i = 0
    while True:
        left = 2 * i + 1
        if left >= n:
            break
        child = left
        if left + 1 < n and _less(h_at, h_kind, h_slot, left + 1, left):
            child = left + 1
        if not _less(h_at, h_kind, h_slot, child, i):
            break
        _swap(h_at, h_kind, h_slot, i, child)
        i = child
    return h_at[n], h_kind[n], h_slot[n]


@numba.njit(cache=True, inline="always")
def _mark_dirty(dirty, dirty_list, sc, slot):
    if not dirty[slot]:
        dirty[slot] = 1
        dirty_list[sc[S_DIRTY]] = slot
        sc[S_DIRTY] += 1


@numba.njit(cache=True, inline="always")
def _release(state, ht, s_rid, s_item, r_refs, released, sc, slot):
    state[slot] = FREE
    _remove(ht, s_rid, s_item, slot)
    r_refs[s_rid[slot]] -= 1
    sc[S_LIVE] -= 1
    released[sc[S_RELEASED]] = slot
    sc[S_RELEASED] += 1


@numba.njit(cache=True, inline="always")
def _emit(
    slot, version, weight, correction,
    s_user, s_pos, s_time, s_ctx, s_labels, s_rid, s_item,
    o_rid, o_item, o_version, o_weight, o_correction, o_user, o_pos, o_time, o_ctx, o_labels, sc,
):  # fmt: skip
    """A sample of slot's window as it is now (copied: the slot may change later in the call)."""
    j = sc[S_OUT]
    sc[S_OUT] = j + 1
    o_rid[j], o_item[j] = s_rid[slot], s_item[slot]
    o_version[j], o_weight[j], o_correction[j] = version, weight, correction
    o_user[j], o_pos[j], o_time[j], o_ctx[j] = s_user[slot], s_pos[slot], s_time[slot], s_ctx[slot]
    for c in range(4):
        o_labels[j, c] = s_labels[slot, c]


@numba.njit(cache=True)
def fire(
    window_ms, retention_ms, negative_rate,
    state, s_user, s_pos, s_time, s_close, s_ctx, s_labels, s_types, s_version, s_keep, s_bhead, s_btail,
    s_rid, s_item, ht, fs, r_refs,
    b_type, b_value, b_time, b_next,
    h_at, h_kind, h_slot, q_at, q_slot, counters, sc, dirty, dirty_list, released,
    o_rid, o_item, o_version, o_weight, o_correction, o_user, o_pos, o_time, o_ctx, o_labels,
):  # fmt: skip
    """Fires every timer due at the watermark, in (due, kind) order (``EventJoin._fire``); the ring's
    FORGET timers go between the heap's CLOSE and ORPHAN timers of the same due time."""
    if not sc[S_HAS_WM]:
        return
    wm = sc[S_WM]
    cap = q_at.shape[0]
    while True:
        heap_due = sc[S_HEAP] > 0 and h_at[0] <= wm
        head = sc[S_QHEAD]
        ring_due = sc[S_QLEN] > 0 and q_at[head] <= wm
        if not heap_due and not ring_due:
            break
        if ring_due and (not heap_due or q_at[head] < h_at[0] or (q_at[head] == h_at[0] and h_kind[0] > T_FORGET)):
            at, kind, slot = q_at[head], T_FORGET, q_slot[head]
            sc[S_QHEAD] = (head + 1) % cap
            sc[S_QLEN] -= 1
        else:
            at, kind, slot = _heap_pop(h_at, h_kind, h_slot, sc)
        if kind == T_CLOSE:
            if state[slot] != OPEN or s_close[slot] != at:
                continue  # stale: closed already, forgotten, or the slot holds another key
            if s_version[slot] == 0:
                if s_keep[slot]:
                    counters[C_NEGATIVES] += 1
                    _emit(
                        slot, 1, 1.0 / negative_rate, False, s_user, s_pos, s_time, s_ctx, s_labels, s_rid, s_item,
                        o_rid, o_item, o_version, o_weight, o_correction, o_user, o_pos, o_time, o_ctx, o_labels, sc,
                    )  # fmt: skip
                else:
                    counters[C_DOWNSAMPLED] += 1
                s_version[slot] = 1
            state[slot] = (
                CLOSED  # not written: a stored open window whose close <= the committed watermark is closed
            )
            ring_push(q_at, q_slot, sc, at + retention_ms, slot)
        elif kind == T_FORGET:
            if state[slot] != CLOSED or s_close[slot] + retention_ms != at:
                continue
            counters[C_FORGOTTEN] += 1
            _release(state, ht, s_rid, s_item, r_refs, released, sc, slot)
        else:
            if state[slot] != BUFFER:
                continue  # its impression came (the buffer went into the window), or the slot was freed
            kept_head, kept_tail, dropped = -1, -1, 0
            a = s_bhead[slot]
            while a >= 0:
                after = b_next[a]
                if b_time[a] + window_ms > wm:
                    if kept_tail < 0:
                        kept_head = a
                    else:
                        b_next[kept_tail] = a
                    kept_tail = a
                else:
                    dropped += 1
                    b_next[a] = sc[S_POOL_FREE]
                    sc[S_POOL_FREE] = a
                a = after
            if dropped:
                counters[C_ORPHANS] += dropped
                if kept_tail >= 0:
                    b_next[kept_tail] = -1
                s_bhead[slot], s_btail[slot] = kept_head, kept_tail
                if kept_head < 0:
                    _release(state, ht, s_rid, s_item, r_refs, released, sc, slot)
                else:
                    _mark_dirty(dirty, dirty_list, sc, slot)


@numba.njit(cache=True)
def join_events(
    window_ms, lateness_ms, retention_ms, negative_rate, correct_late,
    e_kind, e_rid, e_item, e_time, e_user, e_pos, e_ctx, e_type, e_value, e_keep,
    state, s_user, s_pos, s_time, s_close, s_ctx, s_labels, s_types, s_version, s_keep, s_bhead, s_btail,
    s_rid, s_item, ht, fs, r_refs,
    b_type, b_value, b_time, b_next,
    h_at, h_kind, h_slot, q_at, q_slot, counters, sc, dirty, dirty_list, released,
    o_rid, o_item, o_version, o_weight, o_correction, o_user, o_pos, o_time, o_ctx, o_labels,
):  # fmt: skip
    """Joins events in order (``EventJoin.on_events``); samples go to the ``o_*`` arrays from ``sc[S_OUT]``.

    Each event is handled against the watermark before it, then raises the watermark and fires what is due.
    Returns the number of events handled: all of them (events of kind 0 are never passed).
    """
    n = e_kind.shape[0]
    for i in range(n):
        slot = find_or_add(ht, s_rid, s_item, fs, r_refs, sc, e_rid[i], e_item[i])
        t = e_time[i]
        has_wm, wm = sc[S_HAS_WM], sc[S_WM]
        st = state[slot]
        if e_kind[i] == K_IMPRESSION:
            counters[C_IMPRESSIONS] += 1
            close = t + window_ms
            if st == OPEN or st == CLOSED:
                counters[C_DUP_IMPRESSIONS] += 1
            elif has_wm and close <= wm:
                counters[C_LATE_IMPRESSIONS] += 1
            else:
                s_user[slot], s_pos[slot], s_time[slot], s_close[slot] = e_user[i], e_pos[i], t, close
                s_ctx[slot], s_keep[slot], s_types[slot], s_version[slot] = e_ctx[i], e_keep[i], 0, 0
                for c in range(4):
                    s_labels[slot, c] = 0.0
                if st == BUFFER:
                    a = s_bhead[slot]
                    while a >= 0:  # buffered actions join in arrival order, as if they arrived now
                        kind = b_type[a]
                        if not (t <= b_time[a] < close):
                            counters[C_OUT_OF_WINDOW] += 1
                        elif s_types[slot] >> kind & 1:
                            counters[C_DUP_ACTIONS] += 1
                        else:
                            s_labels[slot, kind - 1] = b_value[a] if kind == DWELL else 1.0
                            s_types[slot] |= 1 << kind
                        after = b_next[a]
                        b_next[a] = sc[S_POOL_FREE]
                        sc[S_POOL_FREE] = a
                        a = after
                    s_bhead[slot], s_btail[slot] = -1, -1
                state[slot] = OPEN
                if s_types[slot]:
                    s_version[slot] = 1
                    counters[C_POSITIVES] += 1
                    _emit(
                        slot, 1, 1.0, False, s_user, s_pos, s_time, s_ctx, s_labels, s_rid, s_item,
                        o_rid, o_item, o_version, o_weight, o_correction, o_user, o_pos, o_time, o_ctx, o_labels, sc,
                    )  # fmt: skip
                heap_push(h_at, h_kind, h_slot, sc, close, T_CLOSE, slot)
                _mark_dirty(dirty, dirty_list, sc, slot)
        else:
            counters[C_ACTIONS] += 1
            kind = e_type[i]
            if st == FREE or st == BUFFER:
                deadline = t + window_ms
                if has_wm and deadline <= wm:
                    counters[C_ORPHANS] += 1
                else:
                    counters[C_BUFFERED] += 1
                    a = sc[S_POOL_FREE]
                    if a >= 0:
                        sc[S_POOL_FREE] = b_next[a]
                    else:
                        a = sc[S_POOL_NEXT]
                        sc[S_POOL_NEXT] = a + 1
                    b_type[a], b_value[a], b_time[a], b_next[a] = kind, e_value[i], t, -1
                    if st == FREE:
                        state[slot] = BUFFER
                        s_bhead[slot] = a
                    else:
                        b_next[s_btail[slot]] = a
                    s_btail[slot] = a
                    heap_push(h_at, h_kind, h_slot, sc, deadline, T_ORPHAN, slot)
                    _mark_dirty(dirty, dirty_list, sc, slot)
            elif not (s_time[slot] <= t < s_close[slot]):
                counters[C_OUT_OF_WINDOW] += 1
            elif s_types[slot] >> kind & 1:
                counters[C_DUP_ACTIONS] += 1
            elif st == CLOSED and not correct_late:
                counters[C_LATE_ACTIONS] += 1
            else:
                s_labels[slot, kind - 1] = e_value[i] if kind == DWELL else 1.0
                s_types[slot] |= 1 << kind
                version = s_version[slot] + 1
                s_version[slot] = version
                if st == CLOSED:
                    counters[C_LATE_ACTIONS] += 1
                    counters[C_CORRECTIONS] += 1
                elif version == 1:
                    counters[C_POSITIVES] += 1
                else:
                    counters[C_UPDATES] += 1
                _emit(
                    slot, version, 1.0, st == CLOSED, s_user, s_pos, s_time, s_ctx, s_labels, s_rid, s_item,
                    o_rid, o_item, o_version, o_weight, o_correction, o_user, o_pos, o_time, o_ctx, o_labels, sc,
                )  # fmt: skip
                _mark_dirty(dirty, dirty_list, sc, slot)
        if state[slot] == FREE:  # a new key the event did not keep (late, orphaned, ...)
            _release(state, ht, s_rid, s_item, r_refs, released, sc, slot)
        # observe the event
        sc[S_ARRIVALS] += 1
        if not sc[S_HAS_MAX] or t > sc[S_MAX]:
            sc[S_HAS_MAX], sc[S_MAX] = 1, t
        if not has_wm or t - lateness_ms > wm:
            sc[S_HAS_WM], sc[S_WM] = 1, t - lateness_ms
        if (sc[S_HEAP] > 0 and h_at[0] <= sc[S_WM]) or (sc[S_QLEN] > 0 and q_at[sc[S_QHEAD]] <= sc[S_WM]):
            fire(
                window_ms, retention_ms, negative_rate,
                state, s_user, s_pos, s_time, s_close, s_ctx, s_labels, s_types, s_version, s_keep, s_bhead,
                s_btail, s_rid, s_item, ht, fs, r_refs, b_type, b_value, b_time, b_next,
                h_at, h_kind, h_slot, q_at, q_slot, counters, sc, dirty, dirty_list, released,
                o_rid, o_item, o_version, o_weight, o_correction, o_user, o_pos, o_time, o_ctx, o_labels,
            )  # fmt: skip
    return n
