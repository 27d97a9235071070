"""Micro-batches that are full: length-bucketed token budgets, and packing that keeps rows apart.

Each forward pass costs a fixed amount whatever it holds (measured on the full gpt-oss-20b shape under Unsloth:
~0.27 s a pass plus ~2.7e-5 s a token), so a chat of 2,300 tokens in a pass sized for 8,192 pays for four. Two
ways to fill a pass, chosen by the profile:

- token budget (`token_budget`, `packing = false`): rows are sorted by length and cut greedily into micro-batches
  of as many rows as fit `rows x longest row <= token_budget`; rows of similar length sit together, so padding
  stays small. The number of rows per micro-batch varies.
- packing (`token_budget`, `packing = true`): rows are packed best-fit-decreasing into sequences of at most
  `max_seq_length` tokens, each filled up to that length, and a pass holds `token_budget // max_seq_length` of them
  (h100: one sequence of 8,192; rtx4090: two of 8,192, the shape its unpacked 2 x 8,192 passes have, which
  Unsloth's offloaded recomputation runs at full speed). Position ids restart at 0 for every row; the
  attention implementation (backends) builds a mask that keeps each row to itself, sliding window and sinks
  included, so every row computes exactly what it computes alone (tests/test_batching.py proves it).

The batches are fixed for the run (they depend only on the row lengths and --seed); their order is shuffled per
epoch with `seed + epoch`. So a resumed run, which skips the batches already trained in its epoch, continues with
exactly the next batch an uninterrupted run would have taken.

Loss normalisation: transformers' Trainer counts the trained tokens of all micro-batches of an optimizer step
(`num_items_in_batch`) and gpt-oss's loss divides its sum by that count, so a step's gradient is the mean over its
trained tokens however the rows are spread over micro-batches (tested: equal to the rows one at a time).
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass

IGNORE = -100


@dataclass(frozen=True)
class BatchPlan:
    """What the batches of one epoch hold; printed before training and stored in run.json."""

    mode: str                 # "fixed" | "budget" | "packed"
    rows: int
    micro_batches: int
    tokens: int               # real tokens of the kept rows
    padded_tokens: int        # tokens the passes compute, padding included
    token_budget: int | None  # None for "fixed"; the tokens a pass can hold (packed: sequences x their length)
    max_rows_per_batch: int
    sequences_per_pass: int = 1  # packed: sequences of `sequence_length` tokens in a pass
    sequence_length: int | None = None

    @property
    def padding_fraction(self) -> float:
        return 0.0 if not self.padded_tokens else 1.0 - self.tokens / self.padded_tokens

    @property
    def fill_fraction(self) -> float | None:
        """Real tokens per pass over the budget: how full the passes are."""
        if not self.token_budget or not self.micro_batches:
            return None
        return self.tokens / (self.micro_batches * self.token_budget)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "rows": self.rows, "micro_batches": self.micro_batches, "tokens": self.tokens,
                "padded_tokens": self.padded_tokens, "token_budget": self.token_budget,
                "max_rows_per_batch": self.max_rows_per_batch,
                "sequences_per_pass": self.sequences_per_pass, "sequence_length": self.sequence_length,
                "padding_fraction": round(self.padding_fraction, 4),
                "fill_fraction": None if self.fill_fraction is None else round(self.fill_fraction, 4)}


def budget_batches(lengths: list[int], budget: int, seed: int) -> list[list[int]]:
    """Rows sorted by length (ties broken by a seeded shuffle), cut greedily so that rows x longest <= budget."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: lengths[i])  # stable: equal lengths keep the shuffled order
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        n = lengths[i]
        if n > budget:
            raise ValueError(f"row {i} has {n} tokens, more than the token budget {budget}")
        if current and (len(current) + 1) * max(longest, n) > budget:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        batches.append(current)
    return batches


def packed_sequences(profile) -> tuple[int, int]:
    """(sequences per pass, tokens per sequence) of a packed profile: sequences as long as max_seq_length (no row is
    longer), as many as the token budget holds."""
    length = min(profile.token_budget, profile.max_seq_length)
    return max(1, profile.token_budget // length), length


def packed_batches(lengths: list[int], budget: int, seed: int, sequences: int = 1) -> list[list[int]]:
    """Best-fit decreasing: each row, longest first, goes into the fullest sequence of `budget` tokens it still fits
    in; a batch is `sequences` such sequences, their rows listed sequence by sequence (PackedCollator splits them
    again)."""
    bins = _best_fit_decreasing(lengths, budget, seed)
    return [[i for b in bins[k:k + sequences] for i in b] for k in range(0, len(bins), sequences)]


def _best_fit_decreasing(lengths: list[int], budget: int, seed: int) -> list[list[int]]:
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    # (free tokens, bin index), sorted: the first entry with free >= n is the best fit
    free: list[tuple[int, int]] = []
    for i in order:
        n = lengths[i]
        if n > budget:
            raise ValueError(f"row {i} has {n} tokens, more than the token budget {budget}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, b = free.pop(k)
            bins[b].append(i)
            bisect.insort(free, (room - n, b))
        else:
            bins.append([i])
            bisect.insort(free, (budget - n, len(bins) - 1))
    return bins


class EpochBatchSampler:
    """A batch sampler over fixed batches whose order is shuffled per epoch (`set_epoch`, called by the Trainer).

    Under data parallel (`num_replicas` processes) it is this rank's share: the epoch's order is the same on every
    rank, and round k gives rank r the batch k * num_replicas + r, so the passes of an optimizer step are disjoint
    across ranks and together are the passes one process with num_replicas times the accumulation takes in that
    step. When the epoch's batches do not divide by num_replicas, the ranks left without one in the last round take
    a filler pass (index `filler`, which `WithFiller` turns into a row with no trained token): every rank takes the
    same number of passes, as DDP needs, and nothing is trained twice (accelerate's own sharding would repeat the
    epoch's first batches instead)."""

    def __init__(self, batches: list[list[int]], seed: int, num_replicas: int = 1, rank: int = 0,
                 filler: int | None = None):
        self.batches = batches
        self.seed = seed
        self.epoch = 0
        self.num_replicas, self.rank, self.filler = num_replicas, rank, filler

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self, epoch: int | None = None) -> list[int]:
        ids = list(range(len(self.batches)))
        random.Random(self.seed * 1_000_003 + (self.epoch if epoch is None else epoch)).shuffle(ids)
        return ids

    def __iter__(self):
        order = self.order()
        if self.num_replicas == 1:
            for b in order:
                yield list(self.batches[b])
            return
        for k in range(len(self)):
            i = k * self.num_replicas + self.rank
            yield list(self.batches[order[i]]) if i < len(order) else [self.filler]

    def __len__(self) -> int:
        return -(-len(self.batches) // self.num_replicas)


class WithFiller:
    """A dataset of rendered rows plus one more index, len(dataset): a copy of row `source` whose labels are all
    -100. A filler pass trains nothing: no token counts in the step's num_items_in_batch, its loss is 0 and so is its
    gradient (with router_aux_loss_coef 0, every profile's default; the load-balancing loss has no labels to mask)."""

    def __init__(self, dataset, source: int):
        self.dataset, self.source = dataset, source

    def __len__(self) -> int:
        return len(self.dataset) + 1

    def __getitem__(self, i: int) -> dict:
        if i != len(self.dataset):
            return self.dataset[i]
        row = dict(self.dataset[self.source])
        row["labels"] = [IGNORE] * len(row["input_ids"])
        return row


def plan_batches(lengths: list[int], mode: str, *, token_budget: int = 0, batch_size: int = 1,
                 seed: int = 0, sequences: int = 1) -> tuple[list[list[int]] | None, BatchPlan]:
    """The batches for `mode` ("fixed": None, the Trainer's own sampler) and what they hold. Packed: `sequences`
    sequences of `token_budget` tokens a pass (packed_sequences gives both for a profile)."""
    tokens = sum(lengths)
    if mode == "fixed":
        # The Trainer's random sampler: its padding depends on the shuffle; estimate it with one seeded shuffle.
        order = list(range(len(lengths)))
        random.Random(seed).shuffle(order)
        chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        padded = sum(len(c) * max(lengths[i] for i in c) for c in chunks)
        return None, BatchPlan("fixed", len(lengths), len(chunks), tokens, padded, None, batch_size)
    if mode == "budget":
        batches = budget_batches(lengths, token_budget, seed)
        padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    elif mode == "packed":
        batches = packed_batches(lengths, token_budget, seed, sequences)
        padded = len(batches) * sequences * token_budget  # every pass is filled (PackedCollator's pad_to)
        return batches, BatchPlan(mode, len(lengths), len(batches), tokens, padded, sequences * token_budget,
                                  max((len(b) for b in batches), default=0), sequences, token_budget)
    else:
        raise ValueError(f"unknown batching mode {mode!r}")
    return batches, BatchPlan(mode, len(lengths), len(batches), tokens, padded, token_budget,
                              max((len(b) for b in batches), default=0))


def plan_batches_for(profile, lengths: list[int], seed: int) -> tuple[list[list[int]] | None, BatchPlan]:
    """plan_batches with a profile's batching settings (what train() runs and --dry-run prints)."""
    mode = batching_mode(profile)
    if mode == "packed":
        sequences, length = packed_sequences(profile)
        return plan_batches(lengths, mode, token_budget=length, seed=seed, sequences=sequences)
    return plan_batches(lengths, mode, token_budget=profile.token_budget, batch_size=profile.per_device_batch_size,
                        seed=seed)


def batching_mode(profile) -> str:
    if not profile.token_budget:
        return "fixed"
    return "packed" if profile.packing else "budget"


# --- collators ----------------------------------------------------------------------------------------------------


class PaddedCollator:
    """Right-pads a micro-batch to its longest row; padding is masked out of attention and loss."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict:
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), longest), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(features), longest), dtype=torch.long)
        for r, f in enumerate(features):
            n = len(f["input_ids"])
            ids[r, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            labels[r, :n] = torch.as_tensor(f["labels"], dtype=torch.long)
            mask[r, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class PackedCollator:
    """Concatenates a micro-batch's rows into `sequences` sequences with position ids restarting per row.

    No attention_mask: given position ids that restart and no mask, transformers builds a mask that keeps each row
    to itself (masking_utils.find_packed_sequence_indices), and so does swft-lite's patch of Unsloth's attention.
    The first token of every row gets label -100: the loss shifts labels by one, and that token would otherwise be
    predicted from the previous row's last token. Alone, a row's first token is never a target either.

    `pad_to` fills each sequence up to that length with one more row of padding (label -100, its own positions, so
    it is attended to by nothing else), and a pass with fewer sequences gets sequences of padding: every pass then
    has the same shape, and Unsloth's compiled kernels, which recompile for a new shape, compile once
    (benchmarks/RESULTS.md measures the difference). With `sequences` > 1 the rows come sequence by sequence
    (packed_batches) and are split again where the next row no longer fits `pad_to`: next-fit over rows listed bin
    by bin never needs more sequences than there were bins."""

    def __init__(self, pad_to: int | None = None, pad_token_id: int = 0, sequences: int = 1):
        if sequences > 1 and not pad_to:
            raise ValueError("several packed sequences a pass need pad_to (their common length)")
        self.pad_to = pad_to
        self.pad_token_id = pad_token_id
        self.sequences = sequences

    def _split(self, features: list[dict]) -> list[list[dict]]:
        if self.sequences == 1:
            return [features]
        groups: list[list[dict]] = [[]]
        used = 0
        for f in features:
            n = len(f["input_ids"])
            if groups[-1] and used + n > self.pad_to:
                groups.append([])
                used = 0
            groups[-1].append(f)
            used += n
        if len(groups) > self.sequences:
            raise ValueError(f"a pass's rows need {len(groups)} sequences of {self.pad_to} tokens, more than "
                             f"{self.sequences}")
        return groups + [[] for _ in range(self.sequences - len(groups))]

    def _sequence(self, features: list[dict]) -> tuple[list, list, list]:
        ids, labels, positions = [], [], []
        for f in features:
            n = len(f["input_ids"])
            ids.extend(f["input_ids"])
            row_labels = list(f["labels"])
            row_labels[0] = IGNORE
            labels.extend(row_labels)
            positions.extend(range(n))
        fill = (self.pad_to or 0) - len(ids)
        if fill > 0:
            ids.extend([self.pad_token_id] * fill)
            labels.extend([IGNORE] * fill)
            positions.extend(range(fill))
        return ids, labels, positions

    def __call__(self, features: list[dict]) -> dict:
        import torch

        ids, labels, positions = zip(*(self._sequence(g) for g in self._split(features)))
        return {"input_ids": torch.tensor(ids, dtype=torch.long),
                "labels": torch.tensor(labels, dtype=torch.long),
                "position_ids": torch.tensor(positions, dtype=torch.long)}


def collator_for(mode: str, pad_token_id: int, token_budget: int | None = None, sequences: int = 1):
    """The collator of a batching mode; packed passes are `sequences` sequences filled to `token_budget` tokens each
    (one shape for every pass)."""
    if mode == "packed":
        return PackedCollator(pad_to=token_budget, pad_token_id=pad_token_id, sequences=sequences)
    return PaddedCollator(pad_token_id)


def collator_for_profile(profile, pad_token_id: int):
    mode = batching_mode(profile)
    if mode == "packed":
        sequences, length = packed_sequences(profile)
        return collator_for(mode, pad_token_id, length, sequences)
    return collator_for(mode, pad_token_id, profile.token_budget)


def dataset_lengths(dataset) -> list[int]:
    """Token count of every row of a datasets.Dataset with an `input_ids` column, read from Arrow (no row copies)."""
    import pyarrow.compute as pc

    column = dataset.data.column("input_ids")
    lengths = pc.list_value_length(column).to_pylist()
    if getattr(dataset, "_indices", None) is not None:  # a select()ed view: map back to the view's order
        lengths = [lengths[i] for i in dataset._indices.column(0).to_pylist()]
    return lengths


def prepare_batch_loader(prepare, dataset, sampler: EpochBatchSampler, collate_fn, world_size: int = 1,
                         rank: int = 0, **loader_kwargs):
    """The training DataLoader over `sampler`'s batches, through `prepare` (the Trainer's accelerator.prepare:
    device placement, resume's skip_first_batches, set_epoch). With several processes the sampler shards itself
    (EpochBatchSampler's rounds and filler) and accelerate's BatchSamplerShard, which prepare wraps around any batch
    sampler, is made a pass-through, as transformers does for its own rank-aware BatchRebalanceSampler."""
    from torch.utils.data import DataLoader

    if world_size > 1:
        lengths = dataset_lengths(dataset)
        shortest = min(range(len(lengths)), key=lengths.__getitem__)
        sampler.num_replicas, sampler.rank, sampler.filler = world_size, rank, len(dataset)
        dataset = WithFiller(dataset, shortest)
    loader = prepare(DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn, **loader_kwargs))
    wrapper = getattr(loader, "batch_sampler", None)
    if world_size > 1 and getattr(wrapper, "batch_sampler", None) is sampler:
        wrapper.num_processes, wrapper.process_index = 1, 0
    return loader


def with_batch_sampler(trainer_cls):
    """`trainer_cls` (TRL's SFTTrainer, or Unsloth's patched one) whose training DataLoader takes its batches from
    `trainer.swft_batch_sampler` when that is set. Everything else - evaluation, resume (accelerate's
    skip_first_batches wraps a batch sampler), set_epoch (the Trainer reaches a batch sampler's own) - is the
    Trainer's."""

    class BatchSamplerTrainer(trainer_cls):
        swft_batch_sampler = None

        def get_train_dataloader(self):
            if self.swft_batch_sampler is None:
                return super().get_train_dataloader()
            return prepare_batch_loader(self.accelerator.prepare, self.train_dataset, self.swft_batch_sampler,
                                        self.data_collator, self.args.world_size, self.args.process_index,
                                        num_workers=self.args.dataloader_num_workers,
                                        pin_memory=self.args.dataloader_pin_memory)

    BatchSamplerTrainer.__name__ = f"BatchSampler{trainer_cls.__name__}"
    return BatchSamplerTrainer


def packed_row_errors(model, rows: list[dict], *, restart_positions: bool = True) -> list[dict]:
    """For every row, max and mean |logit difference| between the row run alone and the same row inside the rows
    packed into one sequence.

    The first row sees nothing before it in either case (causality), so its difference is the numerical noise of
    running in a longer sequence alone; a mask that lets rows see each other shows up in the rows after it.
    `restart_positions=False` packs with positions that run on across rows, which hides the boundaries from the
    mask: the leak the check must catch."""
    import torch

    packed = PackedCollator()(rows)
    if not restart_positions:
        packed["position_ids"] = torch.arange(packed["input_ids"].shape[1]).unsqueeze(0)
    device = next(model.parameters()).device
    errors = []
    with torch.no_grad():
        together = model(input_ids=packed["input_ids"].to(device),
                         position_ids=packed["position_ids"].to(device), use_cache=False).logits[0].float()
        start = 0
        for r in rows:
            n = len(r["input_ids"])
            alone = model(input_ids=torch.tensor([r["input_ids"]], device=device), use_cache=False).logits[0].float()
            diff = (together[start:start + n] - alone).abs()
            errors.append({"tokens": n, "max": float(diff.max()), "mean": float(diff.mean())})
            start += n
    return errors


def packed_isolation_error(model, rows: list[dict], *, restart_positions: bool = True,
                           reduce: str = "max") -> float:
    """Max |logit difference| between every row run alone and the same rows packed into one sequence (reduce="mean":
    the mean over the rows after the first, the only ones a leak can reach).

    The proof that packing keeps rows apart on a given model and attention path (eager, sdpa, Unsloth's): 0 up to
    rounding when the mask confines each row, large when rows see each other."""
    errors = packed_row_errors(model, rows, restart_positions=restart_positions)
    if reduce == "max":
        return max(e["max"] for e in errors)
    later = errors[1:] or errors
    return sum(e["mean"] * e["tokens"] for e in later) / sum(e["tokens"] for e in later)
