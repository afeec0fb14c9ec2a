"""Torch dataset over a JSONL manifest, with bucketed, shardable, resumable batching.

    ds = ManifestDataset("data/train.jsonl", make_buckets(), reference_prob=0.5)
    sampler = BucketBatchSampler(ds, batch_size=4, seed=0, num_replicas=world, rank=rank)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=4)
    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch, start_batch=resume_batch if epoch == start_epoch else 0)
        for batch in loader: ...

All randomness (reference use, its crop and shift, which prompt) comes from a generator
seeded by (seed, epoch, index), so results do not depend on workers or on resuming.
sampler.set_epoch also sets the dataset's epoch; with persistent_workers=True the workers
keep the epoch they started with, so call dataset.set_epoch yourself or avoid that option.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Hashable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .buckets import assign_bucket, make_buckets, random_reference_crop, random_shift, resize_crop_to_bucket
from .insertion_masks import draw_insertion_hole
from .manifest import ManifestError, Sample, image_size, load_reference_only, load_sample, read_manifest

__all__ = ["ManifestDataset", "BucketBatchSampler", "collate", "MASK_POLICIES"]

#: What the item's mask keeps. "product": the product (background generation, the paper's stage 1).
#: "insertion": the scene around a hole drawn over the product (train.insertion_masks), so a control
#: branch learns to paint a product into the user's photo (DreamPaint's inpainting module).
MASK_POLICIES = ("product", "insertion")

log = logging.getLogger(__name__)


def _to_tensor(img) -> torch.Tensor:
    a = np.array(img, dtype=np.uint8)  # a copy: PIL's buffer is read-only
    if a.ndim == 2:
        return torch.from_numpy(a).float().div_(255.0).unsqueeze(0)
    return torch.from_numpy(a).permute(2, 0, 1).float().div_(255.0).contiguous()


class ManifestDataset(Dataset):
    """Samples of a manifest, each resized and cropped to its aspect-ratio bucket.

    Item: {"image": [3,H,W] 0..1, "mask": [1,H,W] in {0,1}, "foreground": image with the
    background set to 1.0 (white, as at inference), "prompt": str, "reference": [3,s,s] or
    None, "reference_offset": (dx, dy) of its random shift or None, "line": manifest line,
    "id": str or None, "bucket": (W, H)}.

    mask_policy "insertion" (MASK_POLICIES): "mask" is the kept region around a hole drawn over the
    product (rectangle, ellipse or object-shaped in equal shares, from the item's generator, a new one
    every epoch), "foreground" the image with the hole white, and "hole_shape" names the shape.

    Bad samples: on_bad="stop" raises ManifestError naming the line and the reason;
    on_bad="skip" logs a warning naming them, records them in `bad_lines` (counted by
    `skipped`) and serves the next good sample instead, cropped to the requested index's
    bucket so batches still stack. Lines that do not parse, or whose image header cannot
    be read, are found when the dataset is built; file content when a sample is loaded.
    With DataLoader workers each worker keeps its own record.
    """

    def __init__(
        self,
        manifest_path: str | Path,
        buckets: Sequence[tuple[int, int]] | None = None,
        on_bad: str = "skip",
        reference_prob: float = 0.0,
        reference_sizes: Sequence[int] = (512, 800),
        reference_shift: float = 0.1,
        reference_crop_scale: Sequence[float] = (0.5, 1.0),
        seed: int = 0,
        second_prompt_prob: float = 0.5,
        mask_policy: str = "product",
    ):
        if on_bad not in ("skip", "stop"):
            raise ValueError(f"on_bad must be 'skip' or 'stop', got {on_bad!r}")
        if mask_policy not in MASK_POLICIES:
            raise ValueError(f"mask_policy must be one of {MASK_POLICIES}, got {mask_policy!r}")
        self.mask_policy = mask_policy
        for name, p in (("reference_prob", reference_prob), ("second_prompt_prob", second_prompt_prob)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        self.manifest_path = Path(manifest_path)
        self.buckets = list(buckets) if buckets is not None else make_buckets()
        self.on_bad = on_bad
        self.reference_prob = float(reference_prob)
        self.reference_sizes = tuple(int(s) for s in reference_sizes)
        self.reference_shift = float(reference_shift)
        self.reference_crop_scale = (float(reference_crop_scale[0]), float(reference_crop_scale[1]))
        self.seed = int(seed)
        self.second_prompt_prob = float(second_prompt_prob)
        self.epoch = 0
        self.bad_lines: dict[int, str] = {}
        # (line, bucket) pairs whose latents the trainer already has (its cache): their image
        # and mask are not decoded, only their reference (if drawn) and prompt are served.
        self.undecoded: frozenset[tuple[int, tuple[int, int]]] = frozenset()

        parse_problems: list[tuple[int, list[str]]] = []
        entries = read_manifest(self.manifest_path, problems=None if on_bad == "stop" else parse_problems)
        for line, problems in parse_problems:
            self._bad(line, "; ".join(problems))

        # Header-only size read: enough to bucket every sample up front, which the batch
        # sampler needs, without decoding whole images.
        self.samples: list[tuple[int, Sample]] = []
        self.index_buckets: list[tuple[int, int]] = []
        for line, sample in entries:
            try:
                w, h = image_size(sample.image_path)
            except FileNotFoundError:
                self._bad(line, f"image {sample.image}: file not found")
                continue
            except Exception as e:
                self._bad(line, f"image {sample.image}: cannot decode ({type(e).__name__}: {e})")
                continue
            self.samples.append((line, sample))
            self.index_buckets.append(assign_bucket(w, h, self.buckets))
        if not self.samples:
            raise ManifestError(None, ["no usable samples"], self.manifest_path)

    @property
    def skipped(self) -> int:
        """How many distinct manifest lines were found bad and skipped so far."""
        return len(self.bad_lines)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def _bad(self, line: int, reason: str) -> None:
        if self.on_bad == "stop":
            raise ManifestError(line, [reason], self.manifest_path)
        if line not in self.bad_lines:
            self.bad_lines[line] = reason
            log.warning("%s line %d: skipped: %s", self.manifest_path, line, reason)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(index)
        index %= n
        bucket = self.index_buckets[index]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        # Draw every decision up front, in a fixed order, so they do not depend on which
        # sample ends up being served.
        use_reference = rng.random() < self.reference_prob
        use_prompt_2 = rng.random() < self.second_prompt_prob
        for k in range(n):
            line, sample = self.samples[(index + k) % n]
            if line in self.bad_lines:
                continue
            want_ref = use_reference and sample.reference is not None
            try:
                if (line, tuple(bucket)) in self.undecoded:
                    loaded = load_reference_only(sample, with_reference=want_ref, line=line)
                else:
                    loaded = load_sample(sample, with_reference=want_ref, line=line)
            except ManifestError as e:
                self._bad(line, "; ".join(e.problems))
                continue
            return self._item(line, sample, loaded, bucket, use_prompt_2, rng)
        raise ManifestError(None, ["every sample is bad (see the warnings above)"], self.manifest_path)

    def _item(self, line, sample, loaded, bucket, use_prompt_2, rng) -> dict[str, Any]:
        image = m = foreground = hole_shape = None
        if loaded.image is not None:
            img, mask = resize_crop_to_bucket(loaded.image, loaded.mask, bucket)
            image = _to_tensor(img)
            m = (_to_tensor(mask) > 0.5).float()
            if self.mask_policy == "insertion":
                hole, hole_shape = draw_insertion_hole(m[0].numpy() > 0.5, rng)
                m = torch.from_numpy(~hole).float()[None]  # kept: the scene around the hole
            foreground = image * m + (1.0 - m)  # what is not kept is white, as the pipeline feeds I_f
        reference = None
        offset = None
        if loaded.reference is not None:
            ref = random_reference_crop(loaded.reference, self.reference_sizes, rng, scale=self.reference_crop_scale)
            offset = (0, 0)
            if self.reference_shift > 0:
                ref, offset = random_shift(ref, self.reference_shift, rng, return_offset=True)
            reference = _to_tensor(ref)
        prompt = sample.prompt_2 if (use_prompt_2 and sample.prompt_2) else sample.prompt
        return {
            "image": image,
            "mask": m,
            "foreground": foreground,
            "prompt": prompt,
            "reference": reference,
            "reference_offset": offset,  # (dx, dy) pixels of the random shift, None without reference
            "line": line,
            "id": sample.id,
            "bucket": bucket,
            "hole_shape": hole_shape,
        }


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of indices from one bucket each; deterministic by (seed, epoch); sharded.

    Per epoch: each bucket's indices are shuffled and cut into batches, the batches are
    shuffled together, and rank r takes batches r, r + R, ... (R = num_replicas), so every
    rank gets the same number of steps. When the batch count does not divide by R, the
    first batches are repeated to fill (drop_last=False) or the extra batches are dropped
    (drop_last=True, which also drops each bucket's short last batch).

    Resume: set_epoch(epoch, start_batch=k) (or start_batch= in the constructor) yields
    this rank's batches from k on, the exact tail of that epoch's order. len() counts what
    is left to yield; num_batches is the whole epoch.

    `dataset` is anything with `index_buckets` (one hashable per index), or that sequence.
    """

    def __init__(
        self,
        dataset,
        batch_size: int,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
        start_batch: int = 0,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need 0 <= rank < num_replicas, got rank={rank}, num_replicas={num_replicas}")
        self.dataset = dataset
        buckets: Sequence[Hashable] = getattr(dataset, "index_buckets", dataset)
        self.groups: dict[Hashable, list[int]] = {}
        for i, b in enumerate(buckets):
            self.groups.setdefault(b, []).append(i)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.epoch = 0
        self.start_batch = int(start_batch)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def _global_count(self) -> int:
        per = (lambda n: n // self.batch_size) if self.drop_last else (lambda n: math.ceil(n / self.batch_size))
        return sum(per(len(g)) for g in self.groups.values())

    @property
    def num_batches(self) -> int:
        """Batches this rank gets in a whole epoch."""
        g = self._global_count()
        return g // self.num_replicas if self.drop_last else math.ceil(g / self.num_replicas)

    def epoch_batches(self, epoch: int | None = None) -> list[list[int]]:
        """This rank's batches for an epoch, in order (the current epoch by default)."""
        epoch = self.epoch if epoch is None else int(epoch)
        rng = np.random.default_rng([self.seed, epoch])
        batches: list[list[int]] = []
        for key in sorted(self.groups, key=repr):  # fixed bucket order: dict order is not a contract
            idx = np.array(self.groups[key], dtype=np.int64)
            rng.shuffle(idx)
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s : s + self.batch_size].tolist()
                if len(chunk) == self.batch_size or not self.drop_last:
                    batches.append(chunk)
        batches = [batches[i] for i in rng.permutation(len(batches))]
        R = self.num_replicas
        if len(batches) % R:
            if self.drop_last:
                batches = batches[: len(batches) - len(batches) % R]
            else:
                need = R - len(batches) % R
                batches += [batches[i % len(batches)] for i in range(need)]
        return batches[self.rank :: R]

    def __iter__(self):
        yield from self.epoch_batches()[self.start_batch :]

    def __len__(self) -> int:
        return max(0, self.num_batches - self.start_batch)


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the tensors of one bucket; references stay a list (sizes vary), or None if none."""
    if not items:
        raise ValueError("empty batch")
    sizes = {tuple(it["image"].shape) for it in items if it["image"] is not None}
    if len(sizes) > 1:
        raise ValueError(f"batch mixes image sizes {sorted(sizes)}; batch with BucketBatchSampler")
    refs = [it["reference"] for it in items]

    def stack(key):
        # Undecoded items (latents cached) carry None: all None -> None, a mix -> a list.
        got = [it[key] for it in items]
        if all(g is None for g in got):
            return None
        return torch.stack(got) if all(g is not None for g in got) else got

    return {
        "image": stack("image"),
        "mask": stack("mask"),
        "foreground": stack("foreground"),
        "prompt": [it["prompt"] for it in items],
        "reference": None if all(r is None for r in refs) else refs,
        "reference_offset": [it.get("reference_offset") for it in items],
        "line": torch.tensor([it["line"] for it in items], dtype=torch.long),
        "id": [it.get("id") for it in items],
        "bucket": items[0].get("bucket"),
    }
