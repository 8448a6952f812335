"""The running batch's tensors, in buffers with a row per batch slot.

Row i of every buffer (keys and values of each layer, attention mask, penalty state) belongs to
the engine's i-th running sequence; rows [0, n) are live and the engine's views cover just them,
so a step costs what n rows cost. Admitting writes the newcomers into the free rows after n;
dropping moves the last live rows into the holes. Neither touches the other rows: a copy of the
whole batch happens only when the columns must be laid out anew (a newcomer longer than the
columns in use, or the cache out of columns), and the buffers grow to ``max_rows`` once.

Every row's tokens sit right-aligned at the cache's position ``pos`` (all rows write their next
key at the same column); which columns are real for a row is its mask row, and positions come
from the mask, so where a row's columns start changes nothing.
"""

from __future__ import annotations

import torch

from workers.model.transformer import KVCache


class BatchState:
    """Buffers of ``capacity`` rows and ``max_len`` columns; :attr:`cache`, :attr:`mask`,
    :attr:`counts` and :attr:`seen` are views of the live rows."""

    def __init__(self, cache: KVCache, mask: torch.Tensor, counts: torch.Tensor, seen: torch.Tensor):
        self.k, self.v = cache.k, cache.v      # per layer (capacity, n_kv_head, max_len, hs)
        self._mask = mask                      # (capacity, max_len) bool: real columns of each row
        self._counts = counts                  # (capacity, V) float: generated-token counts
        self._seen = seen                      # (capacity, V) bool: prompt + generated tokens
        self.n = cache.batch_size
        self._view(cache.pos)

    def _view(self, pos: int) -> None:
        n = self.n
        self.cache = KVCache([t[:n] for t in self.k], [t[:n] for t in self.v])
        self.cache.pos = pos
        self.mask, self.counts, self.seen = self._mask[:n], self._counts[:n], self._seen[:n]

    @property
    def pos(self) -> int:
        return self.cache.pos

    @property
    def capacity(self) -> int:
        return self.k[0].size(0)

    @property
    def max_len(self) -> int:
        return self.k[0].size(2)

    def _buffers(self) -> list[torch.Tensor]:
        return [*self.k, *self.v, self._mask, self._counts, self._seen]

    def _set_buffers(self, bufs: list[torch.Tensor]) -> None:
        L = len(self.k)
        self.k, self.v = bufs[:L], bufs[L:2 * L]
        self._mask, self._counts, self._seen = bufs[2 * L:]

    def reserve(self, rows: int, max_rows: int) -> None:
        """Room for ``rows`` more live rows: the buffers grow to ``max_rows`` rows (once)."""
        if self.n + rows <= self.capacity:
            return
        cap = max(self.n + rows, max_rows)
        grown = []
        for t in self._buffers():
            g = t.new_empty((cap, *t.shape[1:]))
            g[:self.n] = t[:self.n]
            grown.append(g)
        self._set_buffers(grown)
        self._view(self.pos)

    def append(self, cache: KVCache, mask: torch.Tensor, counts: torch.Tensor, seen: torch.Tensor,
               width: int) -> None:
        """Add rows prefilled at their own ``width`` (``cache``/``mask`` of that many columns)
        into the free rows, their columns placed at [pos - width, pos). Call :meth:`reserve` and
        :meth:`make_room` first."""
        P, a, b = self.pos, self.n, self.n + cache.batch_size
        for mine, theirs in ((self.k, cache.k), (self.v, cache.v)):
            for t, new in zip(mine, theirs):
                # masked columns are still multiplied (0 * NaN = NaN): none may hold stale bits
                t[a:b, :, :P - width] = 0
                t[a:b, :, P - width:P] = new[:, :, :width]
        self._mask[a:b] = False
        self._mask[a:b, P - width:P] = mask[:, :width]
        self._counts[a:b] = counts
        self._seen[a:b] = seen
        self.n = b
        self._view(P)

    def keep(self, rows: list[int]) -> list[int]:
        """Keep live rows ``rows`` (ascending), dropping the others: the last kept rows move into
        the holes. Returns the new order: new row i is old row ``order[i]``."""
        n = len(rows)
        kept = set(rows)
        holes = [i for i in range(n) if i not in kept]
        movers = [i for i in rows if i >= n]
        if holes:
            dst = torch.tensor(holes, dtype=torch.long, device=self._mask.device)
            src = torch.tensor(movers, dtype=torch.long, device=self._mask.device)
            pos = self.pos
            for t in (*self.k, *self.v):
                t[dst, :, :pos] = t[src, :, :pos]
            for t in (self._mask, self._counts, self._seen):
                t[dst] = t[src]
        order = list(range(n))
        for h, m in zip(holes, movers):
            order[h] = m
        self.n = n
        self._view(self.pos)
        return order

    def _start(self) -> int:
        """The first column any live row uses (the position when none does)."""
        used = self.mask[:, :self.pos].any(0)
        return int(used.to(torch.int8).argmax()) if bool(used.any()) else self.pos

    def make_room(self, width: int, extra: int, block_size: int) -> bool | None:
        """Lay the columns out, without prefilling anything again, so that rows of up to
        ``width`` tokens fit right-aligned at the position and ``extra`` more columns follow (up
        to ``block_size``): drop the leading columns no row uses any more, add empty ones on the
        left for a longer newcomer, grow geometrically. None when it cannot fit (the caller
        rebuilds the batch); else whether the columns moved."""
        pos = self.pos
        if width <= pos and pos + extra <= self.max_len:
            return False
        start = self._start()
        left = max(0, width - (pos - start))
        new_pos = pos - start + left
        if new_pos >= block_size:
            return None
        need = min(block_size, new_pos + extra)
        self._relayout(start, left, self.max_len if need <= self.max_len else
                       min(block_size, max(need, 2 * self.max_len)))
        return True

    def trim(self) -> bool:
        """Drop the leading columns no live row uses once they are a quarter of the position:
        every step attends over all columns, a copy of the live ones costs about one step's
        reads. Whether the columns moved."""
        start = self._start()
        if start < max(16, self.pos // 4):
            return False
        self._relayout(start, 0, self.max_len)
        return True

    def _relayout(self, start: int, left: int, max_len: int) -> None:
        """Columns [start, pos) move to [left, left + pos - start) of buffers ``max_len`` wide."""
        pos, n = self.pos, self.n
        new_pos = pos - start + left
        moved = []
        for t in (*self.k, *self.v):
            new = t.new_empty((*t.shape[:2], max_len, t.shape[3]))
            new[:n, :, :left] = 0  # never uninitialised under a mask (see append)
            new[:n, :, left:new_pos] = t[:n, :, start:pos]
            moved.append(new)
        mask = self._mask.new_zeros((self._mask.size(0), max_len))
        mask[:n, left:new_pos] = self._mask[:n, start:pos]
        L = len(self.k)
        self.k, self.v, self._mask = moved[:L], moved[L:], mask
        self._view(new_pos)


__all__ = ["BatchState"]
