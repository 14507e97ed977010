"""Batches: the pad token, the collator (dynamic padding), seeded and length-grouped samplers, loaders."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..lm import IGNORE, ensure_pad_token


def _round_up(n: int, multiple: int | None, cap: int | None = None) -> int:
    """`n` rounded up to a multiple of `multiple`, but not past `cap` (unless `n` itself is past it)."""
    up = n if not multiple else -(-n // multiple) * multiple
    return max(n, min(up, cap)) if cap else up


class Collator:
    """Pad tokenized examples (right padding) into a batch of LongTensors.

    Returns ``input_ids`` (padded with the pad id), ``attention_mask`` and ``labels`` (padded with
    -100). For seq2seq the labels have their own width; the model builds ``decoder_input_ids``
    from them. Packed rows (``data.packing``) also give ``position_ids``, restarting at 0 for each
    example and for the padding; the loss then calls the model without the attention mask (kept to
    count tokens), so transformers masks attention per example from the positions.

    Args:
        tokenizer: gives the pad id (see :func:`ensure_pad_token`, which this calls).
        seq2seq: labels are targets of their own length rather than aligned with ``input_ids``.
        pad_to_multiple_of: round the widths up (e.g. 8 for tensor cores; ``data.pad_to_multiple_of``:
            fewer distinct batch shapes, so the CPU kernels' per-shape caches stay small).
        max_width: with `pad_to_multiple_of`, never round the input width past this (``data.max_length``:
            the widest batch stays the one the memory planner simulates).
        max_label_width: the same for seq2seq labels (``data.max_target_length``).
    """

    def __init__(self, tokenizer: Any, *, seq2seq: bool, pad_to_multiple_of: int | None = None,
                 max_width: int | None = None, max_label_width: int | None = None):
        self.pad_token_id = ensure_pad_token(tokenizer)
        self.seq2seq = seq2seq
        self.pad_to_multiple_of = pad_to_multiple_of
        self.max_width, self.max_label_width = max_width, max_label_width

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return self.collate(features)

    def collate(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """The batch of `features` (what calling the collator returns; the memory planner calls this
        directly to look at a run's first batches without taking them from the run's loader)."""
        ids = [torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features]
        labels = [torch.as_tensor(f.get("labels", f["input_ids"]), dtype=torch.long) for f in features]
        width = _round_up(max((len(x) for x in ids), default=0), self.pad_to_multiple_of, self.max_width)
        label_width = _round_up(max((len(x) for x in labels), default=0), self.pad_to_multiple_of,
                                self.max_label_width)
        if not self.seq2seq:
            label_width = width
        input_ids = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
        label_batch = torch.full((len(ids), label_width), IGNORE, dtype=torch.long)
        for i, (x, y) in enumerate(zip(ids, labels, strict=True)):
            input_ids[i, : len(x)] = x
            attention_mask[i, : len(x)] = 1
            label_batch[i, : len(y)] = y
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_batch}
        if features and "position_ids" in features[0]:
            positions = torch.zeros((len(ids), width), dtype=torch.long)
            for i, f in enumerate(features):  # the padding: a segment of its own
                positions[i, : len(f["position_ids"])] = torch.as_tensor(f["position_ids"])
                positions[i, len(f["position_ids"]):] = torch.arange(width - len(f["position_ids"]))
            batch["position_ids"] = positions
        return batch


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # mixed so that (seed, epoch + 1) and (seed + 1, epoch) give different orders
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))


class SeededRandomSampler:
    """A shuffled order that is a function of (seed, epoch) only, so a resumed run sees the same order.

    Call :meth:`set_epoch` before each epoch (Accelerate's loader does); without it, each pass
    over the sampler moves on to the next epoch by itself.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Use the order of `epoch` for the next pass."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        g = _epoch_generator(self.seed, self.epoch)
        self.epoch += 1
        return iter(torch.randperm(self.n, generator=g).tolist())


def _grouped_order(lengths: torch.Tensor, batch_size: int, g: torch.Generator, mega: int = 50) -> list[int]:
    """Indices such that each consecutive `batch_size` run holds examples of similar length."""
    perm = torch.randperm(len(lengths), generator=g)
    chunks: list[torch.Tensor] = []
    for start in range(0, len(perm), mega * batch_size):
        idx = perm[start: start + mega * batch_size]
        idx = idx[torch.argsort(lengths[idx], descending=True, stable=True)]
        chunks += list(idx.split(batch_size))
    # only the last mega-batch can leave a short chunk: keep it last so batches stay aligned
    full = [c for c in chunks if len(c) == batch_size]
    short = [c for c in chunks if len(c) < batch_size]
    full = [full[i] for i in torch.randperm(len(full), generator=g).tolist()]
    if full:  # longest batch first, as transformers does: an out-of-memory shows at once
        first = max(range(len(full)), key=lambda i: int(lengths[full[i][0]]))
        full[0], full[first] = full[first], full[0]
    return torch.cat(full + short).tolist() if full or short else []


class LengthGroupedSampler(SeededRandomSampler):
    """Shuffle, then sort by length within mega-batches of ``50 * batch_size`` and shuffle the batches.

    Like transformers' LengthGroupedSampler: batches hold examples of similar length (less
    padding) while the order stays random and seeded; each epoch has its own order.

    Args:
        lengths: the length of each example.
        batch_size: the DataLoader's batch size (batches are cut at its multiples).
        seed: the run's seed.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int):
        super().__init__(len(lengths), seed)
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[int]:
        g = _epoch_generator(self.seed, self.epoch)
        self.epoch += 1
        return iter(_grouped_order(self.lengths, self.batch_size, g))


class _Loader(DataLoader):
    """A DataLoader with ``set_epoch`` (forwarded to its sampler), as Accelerate's loaders have."""

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)


def _lengths(dataset: Any) -> list[int]:
    if "length" in getattr(dataset, "column_names", ()):
        return list(dataset["length"])
    return [len(x["input_ids"]) for x in dataset]


def make_dataloader(
    dataset: Any,
    collator: Collator,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    group_by_length: bool = False,
    num_workers: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader over a tokenized dataset with a reproducible order.

    Args:
        dataset: tokenized examples (``input_ids``, ``labels``, optionally ``length``).
        collator: pads examples into batches.
        batch_size: examples per batch.
        shuffle: a seeded random order (else the dataset's order).
        seed: seeds the order; the order of epoch e depends only on (seed, e).
        group_by_length: with `shuffle`, batch examples of similar length (see
            :class:`LengthGroupedSampler`); ignored without `shuffle`.
        num_workers: DataLoader worker processes.
        drop_last: drop a last, short batch (nothing is dropped otherwise).

    Returns:
        A DataLoader with ``set_epoch(epoch)``.
    """
    sampler = None
    if shuffle:
        if group_by_length:
            sampler = LengthGroupedSampler(_lengths(dataset), batch_size, seed)
        else:
            sampler = SeededRandomSampler(len(dataset), seed)
    return _Loader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collator,
                   num_workers=num_workers, drop_last=drop_last)


def estimate_padding(lengths: Sequence[int], batch_size: int, *, group_by_length: bool = False, seed: int = 0) -> float:
    """The fraction of padding in one epoch of batches drawn as :func:`make_dataloader` draws them."""
    if not lengths:
        return 0.0
    t = torch.as_tensor(list(lengths), dtype=torch.long)
    g = _epoch_generator(seed, 0)
    order = _grouped_order(t, batch_size, g) if group_by_length else torch.randperm(len(t), generator=g).tolist()
    real = padded = 0
    for start in range(0, len(order), batch_size):
        batch = t[order[start: start + batch_size]]
        real += int(batch.sum())
        padded += int(batch.max()) * len(batch)
    return 1 - real / padded if padded else 0.0
