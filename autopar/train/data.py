"""Training data: token sources, a deterministic sample order, and each data-parallel rank's share.

A *source* is a sequence of fixed-size samples addressed by index (``len(source)``, ``source.get(i)`` ->
a dict of tensors without a batch dim). Token sources pack a flat token stream into samples of
``seq_len + 1`` consecutive tokens (input and next-token labels). :class:`Loader` fixes the order: epoch
``e`` visits the samples in ``randperm(len, seed + e)``; step ``s`` takes global samples
``[s * B, (s + 1) * B)``; dp rank ``r`` takes rows ``[r * B/dp, (r + 1) * B/dp)`` of them and splits them into
micro-batches. Only that rank's samples are read (a memory-mapped token file is never read whole). The
position is the step: a checkpoint stores it and a resumed run continues with the next sample.

Must not: know about models, plans or process groups.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from autopar.core.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["Loader", "SyntheticTokens", "TokenFile", "TokenStream", "build_source", "documents", "load_tokenizer",
           "tokenize_corpus"]


class Source(Protocol):
    def __len__(self) -> int: ...

    def get(self, index: int) -> dict[str, torch.Tensor]: ...


class TokenStream:
    """Samples of ``seq_len + 1`` consecutive tokens of a flat token array (a tensor or a numpy memmap)."""

    tokens_per_sample: int

    def __init__(self, tokens, seq_len: int, what: str):
        self.tokens, self.seq_len = tokens, seq_len
        self.tokens_per_sample = seq_len
        self.n = (len(tokens) - 1) // seq_len
        if self.n < 1:
            raise ConfigError(f"{what}: {len(tokens)} tokens hold no sample of data.seq_len + 1 = {seq_len + 1} "
                              f"tokens; add data or lower data.seq_len")

    def __len__(self) -> int:
        return self.n

    def get(self, index: int) -> dict[str, torch.Tensor]:
        lo = index * self.seq_len
        window = self.tokens[lo:lo + self.seq_len + 1]
        return {"tokens": torch.as_tensor(np.asarray(window).astype(np.int64))}


class SyntheticTokens(TokenStream):
    """A seeded stream: a repeated random phrase with 10 % random tokens mixed in (so the loss can fall)."""

    def __init__(self, *, vocab_size: int, seq_len: int, num_sequences: int, seed: int):
        gen = torch.Generator().manual_seed(10_000 + seed)
        n = num_sequences * seq_len + 1
        phrase = torch.randint(0, vocab_size, (61,), generator=gen)
        stream = phrase.repeat(n // len(phrase) + 1)[:n]
        noise = torch.rand(n, generator=gen) < 0.1
        stream = torch.where(noise, torch.randint(0, vocab_size, (n,), generator=gen), stream)
        super().__init__(stream.numpy(), seq_len, "synthetic data")


class TokenFile(TokenStream):
    """A pre-tokenized flat binary file of ``uint16`` / ``uint32`` ids, memory-mapped (read per sample)."""

    def __init__(self, path: Path, dtype: str, seq_len: int):
        super().__init__(np.memmap(path, dtype=np.dtype(dtype), mode="r"), seq_len, f"data.tokens_path {str(path)!r}")


def load_tokenizer(directory: Path):
    """An HF tokenizer from a local directory (``tokenizer.json``), via ``tokenizers`` (no network)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ConfigError("data.kind = \"text\" needs the 'tokenizers' package: pip install tokenizers") from None
    f = Path(directory) / "tokenizer.json"
    if not f.is_file():
        raise ConfigError(f"data.tokenizer: {str(directory)!r} has no tokenizer.json (save an HF tokenizer there "
                          f"with tokenizer.save_pretrained(dir))")
    return Tokenizer.from_file(str(f))


def documents(paths: list[Path], text_key: str):
    files: list[Path] = []
    for p in paths:
        files.extend(sorted(q for q in p.rglob("*") if q.suffix in (".txt", ".jsonl")) if p.is_dir() else [p])
    if not files:
        raise ConfigError(f"data.paths {[str(p) for p in paths]}: no .txt or .jsonl files")
    for f in files:
        if f.suffix == ".jsonl":
            for i, line in enumerate(f.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{f}:{i}: not a JSON line: {e.msg}") from None
                if not isinstance(rec, dict) or not isinstance(rec.get(text_key), str):
                    raise ConfigError(f"{f}:{i}: no string field {text_key!r} (data.text_key)")
                yield rec[text_key]
        else:
            yield f.read_text()


def tokenize_corpus(paths: list[Path], tokenizer_dir: Path, text_key: str = "text") -> np.ndarray:
    """Every document's ids, an end-of-text id (the tokenizer's ``</s>`` / ``<|endoftext|>`` / ``<eos>``
    when it has one) after each, concatenated in file order."""
    tok = load_tokenizer(tokenizer_dir)
    eos = next((tok.token_to_id(t) for t in ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>")
                if tok.token_to_id(t) is not None), None)
    ids: list[int] = []
    for text in documents(paths, text_key):
        ids.extend(tok.encode(text, add_special_tokens=False).ids)
        if eos is not None:
            ids.append(eos)
    dtype = np.uint32 if tok.get_vocab_size() > 65535 else np.uint16
    return np.asarray(ids, dtype=dtype)


def build_source(cfg, vocab_size: int) -> TokenStream:
    """The token source ``cfg.data`` names (``cfg`` a TrainConfig)."""
    d = cfg.data
    if d.kind == "synthetic":
        v = d.vocab_size or vocab_size
        if d.vocab_size and vocab_size and d.vocab_size > vocab_size:
            raise ConfigError(f"data.vocab_size = {d.vocab_size} exceeds the model's vocabulary ({vocab_size})")
        return SyntheticTokens(vocab_size=v, seq_len=d.seq_len, num_sequences=d.num_sequences, seed=d.seed)
    if d.kind == "tokens":
        return TokenFile(cfg.path(d.tokens_path), d.tokens_dtype, d.seq_len)
    tok_dir = cfg.path(d.tokenizer or cfg.model.source)
    ids = tokenize_corpus([cfg.path(p) for p in d.paths], tok_dir, d.text_key)
    if vocab_size and len(ids) and int(ids.max()) >= vocab_size:
        raise ConfigError(f"data.tokenizer {str(tok_dir)!r} produces id {int(ids.max())} but the model's vocabulary "
                          f"has {vocab_size} entries: use the model's tokenizer")
    log.info("tokenized corpus: %d tokens", len(ids))
    return TokenStream(ids, d.seq_len, f"data.paths {d.paths}")


class Loader:
    """Which samples each step, dp rank and micro-batch reads; the position is the next step."""

    def __init__(self, source: Source, *, global_batch: int, dp: int, dp_rank: int, micro_batch: int,
                 grad_accum: int, seed: int):
        if global_batch != dp * micro_batch * grad_accum:
            raise ConfigError(f"global batch {global_batch} != dp {dp} x micro-batch {micro_batch} x "
                              f"accumulation {grad_accum}")
        self.source, self.B, self.dp, self.dp_rank = source, global_batch, dp, dp_rank
        self.mb, self.accum, self.seed = micro_batch, grad_accum, seed
        self.step = 0
        self._perm: tuple[int, torch.Tensor] | None = None

    def _order(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, torch.randperm(len(self.source), generator=torch.Generator().manual_seed(
                self.seed * 1_000_003 + epoch)))
        return self._perm[1]

    def sample_ids(self, step: int) -> list[int]:
        """The global sample indices this dp rank reads at ``step`` (micro-batches in order)."""
        n = len(self.source)
        per_rank = self.B // self.dp
        out = []
        for j in range(step * self.B + self.dp_rank * per_rank, step * self.B + (self.dp_rank + 1) * per_rank):
            out.append(int(self._order(j // n)[j % n]))
        return out

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches (dicts of ``[micro_batch, ...]`` tensors) for the next step."""
        ids = self.sample_ids(self.step)
        self.step += 1
        batches = []
        for m in range(self.accum):
            rows = [self.source.get(i) for i in ids[m * self.mb:(m + 1) * self.mb]]
            batches.append({k: torch.stack([r[k] for r in rows]) for k in rows[0]})
        return batches

    def state_dict(self) -> dict:
        return {"step": self.step, "samples": self.step * self.B, "global_batch": self.B, "seed": self.seed,
                "num_samples": len(self.source)}

    def load_state_dict(self, state: dict) -> None:
        for key, have in (("global_batch", self.B), ("seed", self.seed), ("num_samples", len(self.source))):
            if state.get(key) != have:
                raise ConfigError(f"the checkpoint's data position was saved with {key} = {state.get(key)!r} but "
                                  f"this job has {have!r}: resuming would not continue the same data order; use "
                                  f"a new checkpoint.dir or the original settings")
        self.step = int(state["step"])
