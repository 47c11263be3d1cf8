"""Local search over a placement: swaps between the hottest rank and the others, and re-pointed replicas.

Used as the refinement pass after packing (greedy, hierarchical) and as the whole of ``low_churn``.  One
iteration makes at most one move per layer, for all layers at once (numpy over ``[layers, candidates]``).

Moves (slots per rank never change):

- **swap**: the expert in slot ``a`` of the hottest rank ``h`` and the expert in slot ``b`` of rank ``r``
  change places (2 moved slots).
- **re-point**: slot ``s`` on rank ``r`` whose expert ``x`` has another copy elsewhere is given a new copy of
  an expert ``y`` held by ``h`` (1 moved slot): every holder of ``y`` sheds load, every other holder of ``x``
  takes some.

A move is taken only if it lowers the layer's hottest rank by at least ``min_gain``; the best gain per
moved slot goes first.  Node locality: ``strict`` keeps every copy on its expert's home node, ``relaxed``
keeps at least one copy there.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SearchState", "local_search", "pair_rounds"]

_MAX_REPOINT_SLOTS = 96


class SearchState:
    """Mutable working copy of a placement for the search (internal; the policies stay pure).

    Args:
        weight: float64 ``[L, E]`` load per logical expert.
        phy2log: int64 ``[L, P]`` (``-1`` empty).
        num_ranks: ``N``.
        home: optional int64 ``[L, E]`` home node of each expert; rank_node: int64 ``[N]``.
        locality: ``"none"``, ``"strict"`` or ``"relaxed"``.
        original: optional int64 ``[L, P]``, the placement churn is counted against.
        allow_duplicates: accept two copies of one expert on a rank (only when unavoidable).
    """

    def __init__(
        self,
        weight: np.ndarray,
        phy2log: np.ndarray,
        num_ranks: int,
        *,
        home: np.ndarray | None = None,
        rank_node: np.ndarray | None = None,
        locality: str = "none",
        original: np.ndarray | None = None,
        allow_duplicates: bool = False,
    ) -> None:
        self.weight = np.asarray(weight, dtype=np.float64)
        self.slot_e = np.array(phy2log, dtype=np.int64)
        self.num_layers, self.num_slots = self.slot_e.shape
        self.num_experts = self.weight.shape[1]
        self.num_ranks = num_ranks
        self.spr = self.num_slots // num_ranks
        self.slot_rank = np.arange(self.num_slots) // self.spr
        self.rank_active = (self.slot_e.reshape(self.num_layers, num_ranks, self.spr) >= 0).any(axis=(0, 2))
        self.allow_duplicates = allow_duplicates
        self.locality = locality if home is not None else "none"
        self.home = home
        self.rank_node = rank_node if rank_node is not None else np.zeros(num_ranks, dtype=np.int64)
        self.counts = self._count(self.slot_e)
        self.has = self._holdings(self.slot_e)
        if self.home is not None:
            at_home = (self.rank_node[self.slot_rank][None, :] == self._gather(self.home, self.slot_e)) & (
                self.slot_e >= 0
            )
            self.home_cnt = np.zeros((self.num_layers, self.num_experts + 1), dtype=np.int64)
            rows = np.broadcast_to(np.arange(self.num_layers)[:, None], self.slot_e.shape)
            np.add.at(self.home_cnt, (rows[at_home], self.slot_e[at_home]), 1)
        self.orig_has = self._holdings(original) > 0 if original is not None else None
        self.moves = np.zeros(self.num_layers, dtype=np.int64)

    # ------------------------------------------------------------------ helpers
    def _count(self, p: np.ndarray) -> np.ndarray:
        width = self.num_experts + 1
        flat = np.arange(self.num_layers)[:, None] * width + np.where(p >= 0, p, self.num_experts)
        return np.bincount(flat.ravel(), minlength=self.num_layers * width).reshape(self.num_layers, width)

    def _holdings(self, p: np.ndarray) -> np.ndarray:
        """int ``[L, N, E + 1]`` copies of each expert on each rank (column ``E`` counts empty slots)."""
        width = self.num_experts + 1
        cell = np.arange(self.num_layers)[:, None] * self.num_ranks + self.slot_rank[None, :]
        flat = cell * width + np.where(p >= 0, p, self.num_experts)
        size = self.num_layers * self.num_ranks * width
        return np.bincount(flat.ravel(), minlength=size).reshape(self.num_layers, self.num_ranks, width)

    def _gather(self, table: np.ndarray, experts: np.ndarray, layers: np.ndarray | None = None) -> np.ndarray:
        """``table[l, e]`` for ``experts`` ``[A, ...]`` (``-1`` -> -1 / 0)."""
        layers = np.arange(self.num_layers) if layers is None else layers
        idx = layers.reshape((-1,) + (1,) * (experts.ndim - 1))
        safe = np.where(experts >= 0, experts, 0)
        out = table[idx, safe]
        return np.where(experts >= 0, out, -1 if out.dtype.kind == "i" else 0)

    def per_copy(self, layers: np.ndarray) -> np.ndarray:
        """float ``[A, E + 1]`` load of one copy of each expert (column ``E``: empty slot, 0)."""
        counts = self.counts[layers, : self.num_experts]
        w = np.divide(self.weight[layers], counts, out=np.zeros(counts.shape), where=counts > 0)
        return np.concatenate([w, np.zeros((len(layers), 1))], axis=1)

    def rank_loads(self, layers: np.ndarray, per_copy: np.ndarray | None = None) -> np.ndarray:
        """float ``[A, N]``."""
        per_copy = self.per_copy(layers) if per_copy is None else per_copy
        slot_e = self.slot_e[layers]
        slot_w = np.take_along_axis(per_copy, np.where(slot_e >= 0, slot_e, self.num_experts), axis=1)
        return slot_w.reshape(len(layers), self.num_ranks, self.spr).sum(axis=2)

    def mean_load(self, layers: np.ndarray) -> np.ndarray:
        return self.rank_loads(layers)[:, self.rank_active].mean(axis=1)

    # --------------------------------------------------------------- candidates
    def _moved(self, layers, ranks, experts):
        """1 where expert on rank would count as moved against the original placement (else 0)."""
        return (~self.orig_has[layers, ranks, np.where(experts >= 0, experts, self.num_experts)]).astype(
            np.int64
        )

    def best_swap(self, A, rl, per_copy, min_gain, partners: int | None, use_cost: bool):
        """Best swap of each layer in ``A`` -> (score, gain, slot_a, slot_b, cost), each ``[A]``."""
        n_a = len(A)
        S, E = self.spr, self.num_experts
        ar = np.arange(n_a)
        rl_max = np.where(self.rank_active[None, :], rl, -np.inf)
        h = rl_max.argmax(axis=1)
        peak = rl_max[ar, h]
        slot_a = h[:, None] * S + np.arange(S)[None, :]
        ea = self.slot_e[A[:, None], slot_a]
        wa = np.take_along_axis(per_copy, np.where(ea >= 0, ea, E), axis=1)
        if partners is not None and partners < self.num_ranks:
            cold = np.argsort(np.where(self.rank_active[None, :], rl, np.inf), axis=1, kind="stable")[
                :, :partners
            ]
            slot_b = (cold[:, :, None] * S + np.arange(S)).reshape(n_a, -1)
        else:
            slot_b = np.broadcast_to(np.arange(self.num_slots), (n_a, self.num_slots))
        eb = self.slot_e[A[:, None], slot_b]
        rb = slot_b // S
        wb = np.take_along_axis(per_copy, np.where(eb >= 0, eb, E), axis=1)
        d = wa[:, :, None] - wb[:, None, :]
        rlb = np.take_along_axis(rl, rb, axis=1)
        # Gain = the cut of the hottest rank, as long as its partner stays below the old peak.
        gain = peak[:, None, None] - np.maximum(peak[:, None, None] - d, rlb[:, None, :] + d)
        valid = (eb >= 0)[:, None, :] & (rb != h[:, None])[:, None, :] & (d > 0) & (ea >= 0)[:, :, None]
        ea_s = np.where(ea >= 0, ea, E)
        eb_s = np.where(eb >= 0, eb, E)
        if not self.allow_duplicates:
            valid &= self.has[A[:, None, None], rb[:, None, :], ea_s[:, :, None]] == 0
            valid &= (self.has[A[:, None], h[:, None], eb_s] == 0)[:, None, :]
        if self.locality != "none":
            node_h = self.rank_node[h][:, None, None]
            node_b = self.rank_node[rb][:, None, :]
            if self.locality == "strict":
                valid &= node_b == node_h
            else:
                home_a = self._gather(self.home, ea, A)[:, :, None]
                home_b = self._gather(self.home, eb, A)[:, None, :]
                cnt_a = self.home_cnt[A[:, None], ea_s][:, :, None]
                cnt_b = self.home_cnt[A[:, None], eb_s][:, None, :]
                valid &= (node_h != home_a) | (node_b == node_h) | (cnt_a >= 2)
                valid &= (node_b != home_b) | (node_b == node_h) | (cnt_b >= 2)
        valid &= gain >= min_gain[:, None, None]
        if use_cost:
            hh = h[:, None, None]
            la = A[:, None, None]
            cost = (
                self._moved(la, hh, eb[:, None, :])
                - self._moved(la, hh, ea[:, :, None])
                + self._moved(la, rb[:, None, :], ea[:, :, None])
                - self._moved(la, rb[:, None, :], eb[:, None, :])
            )
        else:
            cost = None
        score, gain, i, j, cost = _best_move(gain, cost, valid, slot_b.shape[1])
        return score, gain, slot_a[ar, i], slot_b[ar, j], cost

    def best_repoint(self, A, rl, per_copy, min_gain, use_cost: bool):
        """Best re-point of each layer in ``A`` -> (score, gain, slot, new_expert, cost), each ``[A]``."""
        n_a = len(A)
        S, E, N = self.spr, self.num_experts, self.num_ranks
        ar = np.arange(n_a)
        rl_max = np.where(self.rank_active[None, :], rl, -np.inf)
        h = rl_max.argmax(axis=1)
        peak = rl_max[ar, h]
        y = self.slot_e[A[:, None], h[:, None] * S + np.arange(S)[None, :]]  # [A, S]
        y_s = np.where(y >= 0, y, E)
        cy = self.counts[A[:, None], y_s].astype(np.float64)
        wy = np.where(y >= 0, self.weight[A[:, None], np.where(y >= 0, y, 0)], 0.0)
        shed = wy / np.maximum(cy, 1) - wy / (cy + 1)  # each holder of y loses this
        new_copy = wy / (cy + 1)
        # Candidate slots: their expert has another copy; on another rank; coldest ranks first.
        slot_counts = self.counts[A[:, None], np.where(self.slot_e[A] >= 0, self.slot_e[A], E)]
        ok_slot = (self.slot_e[A] >= 0) & (slot_counts >= 2) & (self.slot_rank[None, :] != h[:, None])
        if self.locality == "relaxed":
            x_all = self.slot_e[A]
            at_home = self.rank_node[self.slot_rank][None, :] == self._gather(self.home, x_all, A)
            ok_slot &= ~at_home | (self.home_cnt[A[:, None], np.where(x_all >= 0, x_all, E)] >= 2)
        k = int(min(ok_slot.sum(axis=1).max(initial=0), _MAX_REPOINT_SLOTS))
        if k == 0:
            zeros = np.zeros(n_a, dtype=np.int64)
            return np.full(n_a, -np.inf), np.zeros(n_a), zeros, zeros, zeros
        key = np.where(ok_slot, rl[:, self.slot_rank], np.inf)
        slot = np.argsort(key, axis=1, kind="stable")[:, :k]
        slot_ok = np.take_along_axis(ok_slot, slot, axis=1)
        x = self.slot_e[A[:, None], slot]
        x_s = np.where(x >= 0, x, E)
        r = slot // S
        cx = self.counts[A[:, None], x_s].astype(np.float64)
        wx = np.where(x >= 0, self.weight[A[:, None], np.where(x >= 0, x, 0)], 0.0)
        take = np.where(cx >= 2, wx / np.maximum(cx - 1, 1) - wx / cx, 0.0)  # each other holder of x gains
        holds_y = self.has[A[:, None], :, y_s] > 0  # [A, S, N]
        holds_x = self.has[A[:, None], :, x_s] > 0  # [A, K, N]
        on_r = r[:, :, None] == np.arange(N)[None, None, :]  # [A, K, N]
        new = (
            rl[:, None, None, :]
            - shed[:, :, None, None] * holds_y[:, :, None, :]
            + (take[:, :, None] * (holds_x & ~on_r))[:, None, :, :]
            + (
                (new_copy[:, :, None] - (wx / np.maximum(cx, 1))[:, None, :])[:, :, :, None]
                * on_r[:, None, :, :]
            )
        )
        # Gain = the cut of the hottest rank, as long as no rank that changes ends above the old peak.
        changed = holds_y[:, :, None, :] | (holds_x | on_r)[:, None, :, :]
        new = np.where(changed & self.rank_active[None, None, None, :], new, -np.inf)
        gain = peak[:, None, None] - new.max(axis=3)
        valid = slot_ok[:, None, :] & (y >= 0)[:, :, None]
        valid &= self.has[A[:, None, None], r[:, None, :], y_s[:, :, None]] == 0
        if self.locality == "strict":
            valid &= self.rank_node[r][:, None, :] == self._gather(self.home, y, A)[:, :, None]
        valid &= gain >= min_gain[:, None, None]
        if use_cost:
            la = A[:, None, None]
            cost = self._moved(la, r[:, None, :], y[:, :, None]) - self._moved(
                la, r[:, None, :], x[:, None, :]
            )
        else:
            cost = None
        score, gain, i, j, cost = _best_move(gain, cost, valid, k)
        return score, gain, slot[ar, j], y[ar, i], cost

    # ------------------------------------------------------------------- moves
    def _home_delta(self, A, experts, rank_from, rank_to):
        if self.home is None:
            return
        home = self._gather(self.home, experts, A)
        delta = (self.rank_node[rank_to] == home).astype(np.int64) - (self.rank_node[rank_from] == home)
        np.add.at(self.home_cnt, (A, np.where(experts >= 0, experts, self.num_experts)), delta)

    def apply_swap(self, A, slot_a, slot_b) -> None:
        """Swap slot_a and slot_b in layers A (several swaps per layer allowed if their ranks differ)."""
        E = self.num_experts
        ea, eb = self.slot_e[A, slot_a], self.slot_e[A, slot_b]
        h, r = self.slot_rank[slot_a], self.slot_rank[slot_b]
        self.slot_e[A, slot_a], self.slot_e[A, slot_b] = eb, ea
        eb_s = np.where(eb >= 0, eb, E)
        np.add.at(self.has, (A, h, ea), -1)
        np.add.at(self.has, (A, h, eb_s), 1)
        np.add.at(self.has, (A, r, eb_s), -1)
        np.add.at(self.has, (A, r, ea), 1)
        self._home_delta(A, ea, h, r)
        self._home_delta(A, eb, r, h)
        np.add.at(self.moves, A, 2)

    def best_pair_swaps(self, A, rl, per_copy, tol):
        """One swap per (i-th hottest, i-th coldest) rank pair, all pairs of a layer at once.

        Returns (layer, slot_a, slot_b) arrays of the swaps that lower their pair's hotter rank by > ``tol``.
        Without node constraints, or relaxed; strict layouts use :meth:`best_swap` only.
        """
        n_a = len(A)
        S, E = self.spr, self.num_experts
        act = np.nonzero(self.rank_active)[0]
        n_act = len(act)
        k = n_act // 2
        if k == 0:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, empty
        order = act[np.argsort(rl[:, act], axis=1, kind="stable")]
        cold = order[:, :k]
        hot = order[:, ::-1][:, :k]
        ar = np.arange(n_a)[:, None]
        slot_h = hot[:, :, None] * S + np.arange(S)  # [A, k, S]
        slot_c = cold[:, :, None] * S + np.arange(S)
        ea = self.slot_e[A[:, None, None], slot_h]
        eb = self.slot_e[A[:, None, None], slot_c]
        ea_s, eb_s = np.where(ea >= 0, ea, E), np.where(eb >= 0, eb, E)
        wa = per_copy[ar[:, :, None], ea_s]
        wb = per_copy[ar[:, :, None], eb_s]
        d = wa[:, :, :, None] - wb[:, :, None, :]  # [A, k, S, S]
        lh = rl[ar, hot][:, :, None, None]
        lc = rl[ar, cold][:, :, None, None]
        gain = lh - np.maximum(lh - d, lc + d)
        valid = (d > 0) & (ea >= 0)[:, :, :, None] & (eb >= 0)[:, :, None, :]
        la = A[:, None, None]
        if not self.allow_duplicates:
            valid &= (self.has[la, cold[:, :, None], ea_s] == 0)[:, :, :, None]
            valid &= (self.has[la, hot[:, :, None], eb_s] == 0)[:, :, None, :]
        if self.locality == "relaxed":
            node_h = self.rank_node[hot][:, :, None, None]
            node_c = self.rank_node[cold][:, :, None, None]
            home_a = self._gather(self.home, ea, A)[:, :, :, None]
            home_b = self._gather(self.home, eb, A)[:, :, None, :]
            cnt_a = self.home_cnt[la, ea_s][:, :, :, None]
            cnt_b = self.home_cnt[la, eb_s][:, :, None, :]
            # Two pairs of one layer may each take a copy of one expert off its home node in the same
            # round, so a copy leaves home only if two others stay there.
            valid &= (node_h != home_a) | (node_c == node_h) | (cnt_a >= 3)
            valid &= (node_c != home_b) | (node_c == node_h) | (cnt_b >= 3)
        score = np.where(valid & (gain > tol[:, None, None, None]), gain, -np.inf).reshape(n_a, k, S * S)
        best = score.argmax(axis=2)
        ok = np.isfinite(np.take_along_axis(score, best[:, :, None], axis=2)[:, :, 0])
        i, j = np.divmod(best, S)
        layer = np.broadcast_to(A[:, None], ok.shape)[ok]
        return (
            layer,
            np.take_along_axis(slot_h, i[:, :, None], axis=2)[:, :, 0][ok],
            np.take_along_axis(slot_c, j[:, :, None], axis=2)[:, :, 0][ok],
        )

    def apply_repoint(self, A, slot, y) -> None:
        E = self.num_experts
        x = self.slot_e[A, slot]
        r = self.slot_rank[slot]
        x_s = np.where(x >= 0, x, E)
        self.slot_e[A, slot] = y
        self.counts[A, x_s] -= 1
        self.counts[A, y] += 1
        self.has[A, r, x_s] -= 1
        self.has[A, r, y] += 1
        if self.home is not None:
            home_x = self._gather(self.home, x, A)
            np.add.at(self.home_cnt, (A, x_s), -(self.rank_node[r] == home_x).astype(np.int64))
            np.add.at(self.home_cnt, (A, y), (self.rank_node[r] == self.home[A, y]).astype(np.int64))
        np.add.at(self.moves, A, 1)


def pair_rounds(state: SearchState, layers: np.ndarray, tol: np.ndarray, max_rounds: int = 32) -> SearchState:
    """Swap rounds between the i-th hottest and i-th coldest ranks (all pairs at once), until none pays.

    Args:
        state: working placement (no strict node locality).
        layers: int ``[A]``; tol: float ``[L]`` least cut of a pair's hotter rank.
    """
    A = np.asarray(layers, dtype=np.int64)
    for _ in range(max_rounds):
        if len(A) == 0:
            break
        per_copy = state.per_copy(A)
        rl = state.rank_loads(A, per_copy)
        layer, slot_a, slot_b = state.best_pair_swaps(A, rl, per_copy, tol[A])
        if len(layer) == 0:
            break
        state.apply_swap(layer, slot_a, slot_b)
        A = np.unique(layer)
    return state


def local_search(
    state: SearchState,
    layers: np.ndarray,
    min_gain: np.ndarray,
    *,
    repoint: bool = False,
    use_cost: bool = False,
    partners: int | None = None,
    max_iters: int = 1000,
) -> SearchState:
    """Improve ``state`` in place, one move per layer per iteration, until no layer has a move left.

    Args:
        state: the working placement.
        layers: int ``[A]`` layers to work on.
        min_gain: float ``[L]`` least cut of the hottest rank's load a move must make.
        repoint: also consider re-pointing replicas (changes copy counts).
        use_cost: rank moves by gain per moved slot against ``state``'s original placement.
        partners: swap only with the slots of this many coldest ranks (speed); None = all.
        max_iters: iteration cap.
    """
    A = np.asarray(layers, dtype=np.int64)
    for _ in range(max_iters):
        if len(A) == 0:
            break
        per_copy = state.per_copy(A)
        rl = state.rank_loads(A, per_copy)
        thr = min_gain[A]
        s_score, s_gain, slot_a, slot_b, _ = state.best_swap(A, rl, per_copy, thr, partners, use_cost)
        if repoint:
            r_score, r_gain, slot, y, _ = state.best_repoint(A, rl, per_copy, thr, use_cost)
        else:
            r_score = np.full(len(A), -np.inf)
        use_r = r_score > s_score
        use_s = ~use_r & np.isfinite(s_score)
        if use_s.any():
            state.apply_swap(A[use_s], slot_a[use_s], slot_b[use_s])
        if use_r.any():
            state.apply_repoint(A[use_r], slot[use_r], y[use_r])
        A = A[use_s | use_r]
    return state


def _best_move(gain: np.ndarray, cost: np.ndarray | None, valid: np.ndarray, width: int):
    """The best valid candidate of each layer: the largest gain per moved slot (gain alone without ``cost``).

    Args:
        gain: float ``[A, a, width]`` cut of the hottest rank's load per candidate move.
        cost: int ``[A, a, width]`` slots each candidate moves, or None (moves are free).
        valid: bool, broadcastable to ``gain``.
    Returns:
        score, gain, index along ``a``, index along ``width``, cost — each ``[A]`` (score ``-inf``: none valid).
    """
    n_a = gain.shape[0]
    ar = np.arange(n_a)
    if cost is None:
        cost = np.zeros(gain.shape, dtype=np.int64)
        score = gain
    else:
        score = gain / np.maximum(cost, 0.5)
    score = np.where(valid, score, -np.inf).reshape(n_a, -1)
    best = score.argmax(axis=1)
    i, j = np.divmod(best, width)
    return score[ar, best], gain.reshape(n_a, -1)[ar, best], i, j, cost.reshape(n_a, -1)[ar, best]
