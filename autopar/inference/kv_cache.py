"""The paged KV cache: a block manager (block tables, reference counts, prefix sharing, copy-on-write,
accounting) that touches no tensors, and the per-layer K/V block pools it indexes.

A sequence's token ``t`` lives in block ``table[t // block_size]`` at offset ``t % block_size``. Blocks are
taken from a free list as sequences grow and go back when the last sequence holding them ends. Full
blocks of computed prompt tokens are registered under their exact content (the previous block's id plus
the token ids), so a later prompt with the same prefix takes a reference instead of a copy and skips
computing those tokens; :meth:`BlockManager.fork` shares a whole table (parallel sampling). A write
into a block with more than one holder first copies it (copy-on-write): :meth:`BlockManager.reserve`
returns the ``(src, dst)`` block copies the model runner must make before writing.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from autopar.inference.errors import CacheConfigError


@dataclass(frozen=True, kw_only=True)
class CacheUsage:
    """Token slots: ``used`` hold a token; ``allocated`` belong to blocks some sequence holds."""
    used_slots: int
    allocated_slots: int
    used_blocks: int
    total_blocks: int

    @property
    def waste(self) -> float:
        return 0.0 if self.allocated_slots == 0 else 1.0 - self.used_slots / self.allocated_slots


class BlockManager:
    """Owns block tables and reference counts; never touches tensors."""

    def __init__(self, num_blocks: int, block_size: int, *, prefix_sharing: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise CacheConfigError(f"need at least one block of at least one token (got {num_blocks} x {block_size})")
        self.num_blocks, self.block_size, self.prefix_sharing = num_blocks, block_size, prefix_sharing
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.refcount = [0] * num_blocks
        self.fill = [0] * num_blocks                    # slots of the block that hold a token
        self.tables: dict[int, list[int]] = {}
        self.num_tokens: dict[int, int] = {}           # slots reserved per sequence
        self._by_content: dict[tuple, int] = {}         # (previous block or -1, token ids) -> full block
        self._content_of: dict[int, tuple] = {}
        self._registered: dict[int, int] = {}           # sequence -> full blocks registered so far
        self._used = 0                                  # sum of fill over live blocks (kept current: O(1) usage)

    # --- queries --------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def needed(self, seq_id: int, total_tokens: int) -> int:
        """New blocks :meth:`reserve` would take to cover ``total_tokens`` (growth plus copy-on-write)."""
        table = self.tables.get(seq_id, [])
        have = self.num_tokens.get(seq_id, 0)
        grow = max(0, self.blocks_for(total_tokens) - len(table))
        first, last = have // self.block_size, (total_tokens - 1) // self.block_size
        cow = sum(1 for i in range(first, min(last + 1, len(table))) if self.refcount[table[i]] > 1)
        return grow + cow

    def slots(self, seq_id: int, start: int, stop: int) -> list[int]:
        table, bs = self.tables[seq_id], self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, stop)]

    def usage(self) -> CacheUsage:
        live = self.num_blocks - len(self.free_blocks)
        return CacheUsage(used_slots=self._used, allocated_slots=live * self.block_size, used_blocks=live,
                          total_blocks=self.num_blocks)

    # --- changes --------------------------------------------------------------------------------
    def _take(self) -> int:
        b = self.free_blocks.popleft()
        self.refcount[b], self.fill[b] = 1, 0
        return b

    def _release(self, b: int) -> None:
        self.refcount[b] -= 1
        if self.refcount[b] == 0:
            key = self._content_of.pop(b, None)
            if key is not None:
                del self._by_content[key]
            self._used -= self.fill[b]
            self.fill[b] = 0
            self.free_blocks.append(b)

    def share_prefix(self, seq_id: int, token_ids: list[int]) -> int:
        """Start a table for a new sequence, taking references to registered full blocks of its prompt
        (never the block of the last prompt token, which must be computed for its logits). Returns the
        number of prompt tokens whose K/V are already in the cache."""
        assert seq_id not in self.tables, f"sequence {seq_id} already has a block table"
        table: list[int] = []
        if self.prefix_sharing:
            prev, bs = -1, self.block_size
            for i in range((len(token_ids) - 1) // bs):
                b = self._by_content.get((prev, tuple(token_ids[i * bs:(i + 1) * bs])))
                if b is None:
                    break
                self.refcount[b] += 1
                table.append(b)
                prev = b
        self.tables[seq_id] = table
        self.num_tokens[seq_id] = len(table) * self.block_size
        self._registered[seq_id] = len(table)
        return self.num_tokens[seq_id]

    def reserve(self, seq_id: int, total_tokens: int) -> list[tuple[int, int]]:
        """Cover ``total_tokens`` slots for the sequence, copying shared blocks the new slots fall in.
        Returns the ``(src, dst)`` block copies to make before writing. Caller checks :meth:`needed`."""
        if self.needed(seq_id, total_tokens) > self.num_free:
            raise CacheConfigError("internal: reserve() without enough free blocks (check needed() first)")
        table = self.tables.setdefault(seq_id, [])
        have = self.num_tokens.get(seq_id, 0)
        copies = []
        bs = self.block_size
        for i in range(have // bs, min((total_tokens - 1) // bs + 1, len(table))):
            if self.refcount[table[i]] > 1:             # copy-on-write
                new = self._take()
                self.fill[new] = self.fill[table[i]]
                self._used += self.fill[new]
                copies.append((table[i], new))
                self.refcount[table[i]] -= 1
                table[i] = new
        while len(table) < self.blocks_for(total_tokens):
            table.append(self._take())
        for p in range(have, total_tokens):
            b = table[p // bs]
            if p % bs + 1 > self.fill[b]:
                self._used += p % bs + 1 - self.fill[b]
                self.fill[b] = p % bs + 1
        self.num_tokens[seq_id] = max(have, total_tokens)
        return copies

    def register_computed(self, seq_id: int, token_ids: list[int], num_computed: int) -> None:
        """Record the sequence's full blocks whose tokens are all computed, for later prompts to share."""
        if not self.prefix_sharing:
            return
        table, bs = self.tables[seq_id], self.block_size
        done = self._registered.get(seq_id, 0)
        for i in range(done, num_computed // bs):
            prev = table[i - 1] if i else -1
            key = (prev, tuple(token_ids[i * bs:(i + 1) * bs]))
            b = table[i]
            if key not in self._by_content and b not in self._content_of:
                self._by_content[key] = b
                self._content_of[b] = key
        self._registered[seq_id] = max(done, num_computed // bs)

    def fork(self, parent: int, child: int) -> None:
        """The child shares every block of the parent (its next write into a shared block copies it)."""
        self.tables[child] = list(self.tables[parent])
        for b in self.tables[child]:
            self.refcount[b] += 1
        self.num_tokens[child] = self.num_tokens[parent]
        self._registered[child] = self._registered.get(parent, 0)

    def free(self, seq_id: int) -> None:
        for b in self.tables.pop(seq_id, []):
            self._release(b)
        self.num_tokens.pop(seq_id, None)
        self._registered.pop(seq_id, None)


def bytes_per_block(*, num_layers: int, kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype) -> int:
    """K and V of one block in every layer."""
    return 2 * num_layers * kv_heads * block_size * head_dim * torch.empty((), dtype=dtype).element_size()


def blocks_from_budget(budget: float, *, per_block: int, device: torch.device) -> int:
    """Blocks that fit ``budget``: bytes when an int, else a fraction in (0, 1] of the device's free memory."""
    if isinstance(budget, float):
        if not 0 < budget <= 1:
            raise CacheConfigError(f"kv cache fraction must be in (0, 1], got {budget}")
        if device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
        else:
            try:
                with open("/proc/meminfo") as f:
                    free = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemAvailable:"))
            except (OSError, StopIteration) as e:
                raise CacheConfigError("cannot read free host memory: give the kv cache budget in bytes") from e
        budget = int(free * budget)
    n = int(budget) // per_block
    if n < 1:
        raise CacheConfigError(f"kv cache budget {budget} bytes is below one block ({per_block} bytes): "
                               "raise it or lower block_size")
    return n


class KVCache:
    """Per-layer K and V block pools ``[num_blocks, kv_heads, block_size, head_dim]``."""

    def __init__(self, *, num_layers: int, num_blocks: int, kv_heads: int, head_dim: int, block_size: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        shape = (num_blocks, kv_heads, block_size, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.block_size = block_size

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.k[0].device)
        dst = torch.tensor([d for _, d in copies], device=self.k[0].device)
        for pool in (*self.k, *self.v):
            pool[dst] = pool[src]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))


__all__ = ["BlockManager", "CacheUsage", "KVCache", "blocks_from_budget", "bytes_per_block"]
