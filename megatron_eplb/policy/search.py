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

    Change it only through :meth:`apply_swap` and :meth:`apply_repoint`: they keep ``counts``, ``has``, the
    per-copy loads and the rank loads current (``rank_loads`` is a look-up, exactly the sum over the slots).
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
        # Kept current by the moves: load of one copy of each expert, load of each rank.
        self._per_copy = self._copy_loads(np.arange(self.num_layers))
        self._rank_loads = self._layer_loads(np.arange(self.num_layers))

    # ------------------------------------------------------------------ helpers
    def _count(self, p: np.ndarray) -> np.ndarray:
        width = self.num_experts + 1
        flat = np.arange(self.num_layers)[:, None] * width + np.where(p >= 0, p, self.num_experts)
        return np.bincount(flat.ravel(), minlength=self.num_layers * width).reshape(self.num_layers, width)

    def _holdings(self, p: np.ndarray) -> np.ndarray:
        """uint ``[L, N, E + 1]`` copies of each expert on each rank (column ``E`` counts empty slots).

        In the narrowest unsigned type that holds ``S`` (a big table is slow to allocate and touch).
        """
        width = self.num_experts + 1
        cell = np.arange(self.num_layers)[:, None] * self.num_ranks + self.slot_rank[None, :]
        flat = (cell * width + np.where(p >= 0, p, self.num_experts)).reshape(-1, self.spr)  # [L * N, S]
        out = np.zeros(self.num_layers * self.num_ranks * width, dtype=np.min_scalar_type(self.spr))
        for s in range(self.spr):  # slot s of every rank: distinct cells, so a plain fancy add counts
            out[flat[:, s]] += 1
        return out.reshape(self.num_layers, self.num_ranks, width)

    def _gather(self, table: np.ndarray, experts: np.ndarray, layers: np.ndarray | None = None) -> np.ndarray:
        """``table[l, e]`` for ``experts`` ``[A, ...]`` (``-1`` -> -1 / 0)."""
        layers = np.arange(self.num_layers) if layers is None else layers
        idx = layers.reshape((-1,) + (1,) * (experts.ndim - 1))
        safe = np.where(experts >= 0, experts, 0)
        out = table[idx, safe]
        return np.where(experts >= 0, out, -1 if out.dtype.kind == "i" else 0)

    def _held(self, layers, ranks, experts) -> np.ndarray:
        """``has[layers, ranks, experts]`` (broadcast int arrays, experts in ``[0, E]``) by flat index: several
        times faster than numpy's three-array fancy indexing."""
        return self.has.ravel()[(layers * self.num_ranks + ranks) * (self.num_experts + 1) + experts]

    def _copy_loads(self, layers: np.ndarray) -> np.ndarray:
        """float ``[A, E + 1]`` load of one copy of each expert (column ``E``: empty slot, 0)."""
        counts = self.counts[layers, : self.num_experts]
        w = np.divide(self.weight[layers], counts, out=np.zeros(counts.shape), where=counts > 0)
        return np.concatenate([w, np.zeros((len(layers), 1))], axis=1)

    def _sum_slots(self, layers: np.ndarray, ranks: np.ndarray) -> np.ndarray:
        """float ``[T]``: load of rank ``ranks[t]`` in layer ``layers[t]``, summed over its slots in order."""
        S, width = self.spr, self.num_experts + 1
        slots = self.slot_e.ravel()[((layers * self.num_ranks + ranks) * S)[:, None] + np.arange(S)]  # [T, S]
        experts = np.where(slots >= 0, slots, width - 1)
        return self._per_copy.ravel()[(layers * width)[:, None] + experts].sum(axis=1)

    def _layer_loads(self, layers: np.ndarray) -> np.ndarray:
        """float ``[A, N]``: load of every rank of ``layers``."""
        num_ranks = self.num_ranks
        cells = layers.repeat(num_ranks), np.tile(np.arange(num_ranks), len(layers))
        return self._sum_slots(*cells).reshape(len(layers), num_ranks)

    def per_copy(self, layers: np.ndarray) -> np.ndarray:
        """float ``[A, E + 1]`` load of one copy of each expert (column ``E``: empty slot, 0)."""
        return self._per_copy[layers]

    def rank_loads(self, layers: np.ndarray) -> np.ndarray:
        """float ``[A, N]`` load of each rank."""
        return self._rank_loads[layers]

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
        if partners is not None and partners < self.num_ranks:
            cold = np.argsort(np.where(self.rank_active[None, :], rl, np.inf), axis=1, kind="stable")
            ranks_b = cold[:, :partners]
        else:
            ranks_b = np.broadcast_to(np.arange(self.num_ranks), (n_a, self.num_ranks))
        slot_b = (ranks_b[:, :, None] * S + np.arange(S)).reshape(n_a, -1)  # [A, B] partner slots
        eb = self.slot_e[A[:, None], slot_b]
        rb = slot_b // S
        ea_s = np.where(ea >= 0, ea, E)
        eb_s = np.where(eb >= 0, eb, E)
        # Slots that cannot move at all weigh -inf (hot) / +inf (partner): their swaps get gain -inf.
        movable_b = (eb >= 0) & (rb != h[:, None])
        if not self.allow_duplicates:
            movable_b &= self._held(A[:, None], h[:, None], eb_s) == 0
        wa = np.where(ea >= 0, per_copy[ar[:, None], ea_s], -np.inf)
        wb = np.where(movable_b, per_copy[ar[:, None], eb_s], np.inf)
        d = wa[:, :, None] - wb[:, None, :]
        rlb = np.take_along_axis(rl, rb, axis=1)
        # Gain = the cut of the hottest rank, as long as its partner stays below the old peak.
        gain = peak[:, None, None] - np.maximum(peak[:, None, None] - d, rlb[:, None, :] + d)
        valid = gain >= min_gain[:, None, None]
        if (min_gain <= 0).any():  # (a positive least gain implies d > 0)
            valid &= d > 0
        if not self.allow_duplicates:  # the partner rank must not hold the hot slot's expert
            free = self._held(A[:, None, None], ranks_b[:, None, :], ea_s[:, :, None]) == 0  # [A, S, ranks]
            valid &= np.repeat(free, S, axis=2)
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
        valid &= self._held(A[:, None, None], r[:, None, :], y_s[:, :, None]) == 0
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
        ea_s, eb_s = np.where(ea >= 0, ea, E), np.where(eb >= 0, eb, E)
        # Each call's (layer, rank, expert) cells are distinct (one swap per rank), so plain fancy adds do.
        has = self.has.ravel()
        at_h, at_r = (A * self.num_ranks + h) * (E + 1), (A * self.num_ranks + r) * (E + 1)
        has[at_h + ea_s] -= 1
        has[at_h + eb_s] += 1
        has[at_r + eb_s] -= 1
        has[at_r + ea_s] += 1
        self._home_delta(A, ea, h, r)
        self._home_delta(A, eb, r, h)
        np.add.at(self.moves, A, 2)
        layers, ranks = np.concatenate([A, A]), np.concatenate([h, r])
        self._rank_loads[layers, ranks] = self._sum_slots(layers, ranks)

    def best_pair_swaps(self, A, rl, per_copy, tol):
        """One swap per (i-th hottest, i-th coldest) rank pair, all pairs of a layer at once.

        Returns (layer, slot_a, slot_b) arrays of the swaps that lower their pair's hotter rank by > ``tol``
        (``>= 0``).  Without node constraints, or relaxed; strict layouts use :meth:`best_swap` only.
        """
        n_a = len(A)
        S, E = self.spr, self.num_experts
        act = np.nonzero(self.rank_active)[0]
        k = len(act) // 2
        if k == 0:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, empty
        order = act[np.argsort(rl[:, act], axis=1, kind="stable")]
        cold = order[:, :k]
        hot = order[:, ::-1][:, :k]
        ar = np.arange(n_a)[:, None]
        rank_slots = self.slot_e[A].reshape(n_a, self.num_ranks, S)
        ea, eb = rank_slots[ar, hot], rank_slots[ar, cold]  # [A, k, S]
        ea_s, eb_s = np.where(ea >= 0, ea, E), np.where(eb >= 0, eb, E)
        # Which hot slots may go to the cold rank, and which cold slots to the hot rank: [A, k, S] each.
        movable_a, movable_b = ea >= 0, eb >= 0
        la = A[:, None, None]
        if not self.allow_duplicates:
            movable_a &= self._held(la, cold[:, :, None], ea_s) == 0
            movable_b &= self._held(la, hot[:, :, None], eb_s) == 0
        if self.locality == "relaxed":
            node_h = self.rank_node[hot][:, :, None]
            node_c = self.rank_node[cold][:, :, None]
            home_a = self._gather(self.home, ea, A)
            home_b = self._gather(self.home, eb, A)
            # Two pairs of one layer may each take a copy of one expert off its home node in the same
            # round, so a copy leaves home only if two others stay there.
            movable_a &= (node_h != home_a) | (node_c == node_h) | (self.home_cnt[la, ea_s] >= 3)
            movable_b &= (node_c != home_b) | (node_c == node_h) | (self.home_cnt[la, eb_s] >= 3)
        # Slots that may not move weigh -inf (hot) / +inf (cold): their swaps get gain -inf.
        wa = np.where(movable_a, per_copy[ar[:, :, None], ea_s], -np.inf)
        wb = np.where(movable_b, per_copy[ar[:, :, None], eb_s], np.inf)
        best, gain = _best_pair_swap(
            wa.reshape(n_a * k, S), wb.reshape(n_a * k, S), rl[ar, hot].ravel(), rl[ar, cold].ravel()
        )
        ok = (gain > np.repeat(tol, k)).reshape(n_a, k)
        i, j = np.divmod(best.reshape(n_a, k), S)
        layer = np.broadcast_to(A[:, None], ok.shape)[ok]
        slot_a, slot_b = (hot * S + i)[ok], (cold * S + j)[ok]
        if self.locality == "relaxed" and len(layer):
            keep = self._keep_a_home_copy(layer, slot_a, slot_b)
            layer, slot_a, slot_b = layer[keep], slot_a[keep], slot_b[keep]
        return layer, slot_a, slot_b

    def _keep_a_home_copy(self, layer, slot_a, slot_b) -> np.ndarray:
        """bool ``[W]``: the swaps of one round that may go together without taking the last home copy of an
        expert off its node (each swap alone may; several of a layer may take copies of one expert away)."""
        E = self.num_experts
        node_a, node_b = self.rank_node[self.slot_rank[slot_a]], self.rank_node[self.slot_rank[slot_b]]
        moved, cell = [], []
        for slot, node, other in ((slot_a, node_a, node_b), (slot_b, node_b, node_a)):
            e = self.slot_e[layer, slot]
            leaves = (e >= 0) & (self._gather(self.home, e, layer) == node) & (other != node)
            moved.append(np.nonzero(leaves)[0])
            cell.append(layer[leaves] * (E + 1) + e[leaves])
        moved, cell = np.concatenate(moved), np.concatenate(cell)
        keep = np.ones(len(layer), dtype=bool)
        if len(cell) == 0:
            return keep
        order = np.argsort(cell, kind="stable")
        cell, moved = cell[order], moved[order]
        first = np.concatenate([[0], np.nonzero(np.diff(cell))[0] + 1])
        nth = np.arange(len(cell)) - np.repeat(first, np.diff(np.append(first, len(cell))))
        keep[moved[nth >= self.home_cnt.ravel()[cell] - 1]] = False
        return keep

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
        # Copy counts changed: every rank of these layers may have changed.
        self._per_copy[A] = self._copy_loads(A)
        self._rank_loads[A] = self._layer_loads(A)


def pair_rounds(state: SearchState, layers: np.ndarray, tol: np.ndarray, max_rounds: int = 32) -> SearchState:
    """Swap rounds between the i-th hottest and i-th coldest ranks (all pairs at once), until none pays.

    Args:
        state: working placement (no strict node locality).
        layers: int ``[A]``; tol: float ``[L]`` (``>= 0``) least cut of a pair's hotter rank.
    """
    A = np.asarray(layers, dtype=np.int64)
    for _ in range(max_rounds):
        if len(A) == 0:
            break
        layer, slot_a, slot_b = state.best_pair_swaps(A, state.rank_loads(A), state.per_copy(A), tol[A])
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
        per_copy, rl = state.per_copy(A), state.rank_loads(A)
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


def _best_pair_swap(wa: np.ndarray, wb: np.ndarray, hot: np.ndarray, cold: np.ndarray):
    """The best swap of each (hot rank, cold rank) pair: slot ``i`` of the hot rank for slot ``j`` of the cold.

    Gain = the cut of the hot rank's load, as long as the cold one stays below its old load:
    ``hot - max(hot - d, cold + d)`` with ``d = wa[i] - wb[j]`` (``d <= 0`` gives gain ``<= 0``).

    Args:
        wa, wb: float ``[B, S]`` slot loads of the hot / cold rank of each pair (``-inf`` / ``+inf``: the slot
            may not move); hot, cold: float ``[B]`` rank loads.
    Returns:
        int64 ``[B]`` best ``i * S + j`` (the first of equals), float64 ``[B]`` its gain.
    """
    num_pairs, S = wa.shape
    best, best_gain = np.empty(num_pairs, dtype=np.int64), np.empty(num_pairs)
    # Pairs at a time: the [chunk, S, S] temporaries stay under 128 KiB (malloc reuses such blocks; bigger
    # ones may come as fresh pages each call, which costs more than the extra numpy calls).
    chunk = max(1, 15000 // (S * S))
    for start in range(0, num_pairs, chunk):
        part = slice(start, start + chunk)
        h, c = hot[part, None, None], cold[part, None, None]
        d = wa[part, :, None] - wb[part, None, :]
        gain = h - d
        np.maximum(gain, np.add(c, d, out=d), out=gain)
        gain = np.subtract(h, gain, out=gain).reshape(len(d), S * S)
        best[part] = gain.argmax(axis=1)
        best_gain[part] = gain[np.arange(len(d)), best[part]]
    return best, best_gain


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
    score = gain if cost is None else gain / np.maximum(cost, 0.5)
    score = np.where(valid, score, -np.inf).reshape(n_a, -1)
    best = score.argmax(axis=1)
    i, j = np.divmod(best, width)
    best_cost = np.zeros(n_a, dtype=np.int64) if cost is None else cost.reshape(n_a, -1)[ar, best]
    return score[ar, best], gain.reshape(n_a, -1)[ar, best], i, j, best_cost
