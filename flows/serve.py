"""The inspection station: a long-lived process that scores one new part per request.

``musc serve LINE`` starts it (:mod:`flows.serve_app` is its HTTP side). At start-up it
chooses the line's bank exactly as ``score_new`` does (:func:`flows.score_new.choose_line_bank`),
builds the backbones once, checks them against the bank's identities and the bank's cached
entries (:func:`flows.score_new.check_bank`), and reads what a part needs from the bank into
memory (:mod:`tasks.planning.bank_memory`). A request then runs ``score_new``'s stages for one part,
in this process, without Prefect's engine:

- the same task functions (preparation, features, reduction, result files) on a scratch
  feature cache of the request's own entries, held in this process's memory
  (:mod:`tasks.cache.memory`: no encoding, no checksums, no files) and dropped after the
  request: parts do not fill the line's cache;
- the same plan (:func:`tasks.planning.bank.plan_against_bank`: the bank without a sample
  equal to the part) and keys, the pair shards computed against the bank's features in
  memory (:func:`tasks.scoring.score_pairs_against`), RsCon and the decisions with
  :func:`tasks.decisions.decide_pool` over the part's and the bank's scores.

So a part scored by the station gets the map, scores and flag ``score_new`` gives it on the
same bank, and its results are written like ``score_new``'s: ``scores.csv``, ``maps/``,
``overlays/``, ``report.html`` and ``run.json`` in one folder per request.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from flows.locations import cache_url, default_batch_id, results_url
from flows.score_new import NewPartsRequest, check_bank, choose_line_bank, run_settings
from flows.settings import BankChoice, NewPartsChanges, Station, StationRun
from flows.stages import preparation_summary, run_info
from musc_core.config import MuscConfig
from musc_core.hardware import resolved_dtypes
from tasks.cache.keys import Identities, decisions_key, prepared_keys, sample_keys
from tasks.cache.memory import drop_memory_cache, memory_cache_url
from tasks.decisions import Decided, decide_pool, write_decided
from tasks.discover import DiscoveredSample, input_digests
from tasks.features import (
    aggregate_2d,
    aggregate_3d,
    extract_2d,
    extract_3d,
    group_samples,
    missing_features,
    prepare_samples,
)
from tasks.formats.datasets import SampleRecord
from tasks.planning.bank import bank_blocks, bank_reductions, plan_against_bank
from tasks.planning.bank_memory import SLOTS, BankMemory, load_bank_memory
from tasks.planning.blocks import PoolSample, ScoringPlan
from tasks.records.run_summary import RunFacts
from tasks.results import report_line
from tasks.runtime import Runtime, extractor_2d, extractor_3d, feature_cache, identify_backbones
from tasks.scoring import reduce_samples, score_pairs_against
from tasks.stage import StageCount, add_counts

#: Where uploaded files go when the machine has a memory-backed file system.
SHM = Path("/dev/shm")


class PartRefused(ValueError):
    """A part the station cannot score, with the HTTP status that says why.

    Attributes:
        status: 400 (a request that cannot be right), 415 (a file of the wrong kind) or
            422 (a file that cannot be used).
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class PartFiles:
    """One part's files, saved from a request.

    Attributes:
        name: the part's name in the results.
        image: its image file, or None (3D-only line).
        xyz: its XYZ TIFF, or None (2D-only line).
        sent_as: the file names the request gave, for ``run.json`` (image, XYZ map).
    """

    name: str
    image: str | None
    xyz: str | None
    sent_as: tuple[str | None, str | None] = (None, None)


@dataclass(frozen=True)
class ScoredPart:
    """A part scored by the station.

    Attributes:
        name: the part's name.
        score: its score before RsCon (the maximum of its map).
        score_rescored: its score after RsCon, over the part and the bank.
        flagged: whether its RsCon score exceeds the bank's threshold.
        summary: the run's summary (as ``score_new``'s, also in its ``run.json``).
    """

    name: str
    score: float
    score_rescored: float
    flagged: bool
    summary: dict


def scratch_parent() -> str | None:
    """The folder for uploads: ``/dev/shm`` when writable, else the system's default."""
    return str(SHM) if SHM.is_dir() and os.access(SHM, os.W_OK) else None


class InspectionStation:
    """The bank of a line in memory, its backbones built, scoring one part at a time.

    Args:
        station: the line and the HTTP settings.
        bank: which batches form the bank, and whether it is clean.
        changes: the flag rule's k and weights where they differ from the bank's.
        run: storage, output prefix and device.

    Raises:
        FileNotFoundError: the line has no (such) batch.
        ValueError: a bank that cannot be served.
        flows.score_new.BankNotUsable: other backbones, or bank entries missing.
    """

    def __init__(
        self, station: Station, bank: BankChoice, changes: NewPartsChanges, run: StationRun
    ) -> None:
        started = time.perf_counter()
        chosen = choose_line_bank(station.line, bank, changes, run.storage)
        if chosen.records[0].prep.format == "eyecandies" and chosen.config.uses_3d:
            raise ValueError(
                "the bank is an Eyecandies line: its parts' depth maps need pose and depth "
                "range files, which the station does not take; use musc score-new with a folder"
            )
        self.runtime = Runtime(cache_url(run.storage), run.device)
        device = self.runtime.torch_device
        # Parts are computed in the dtypes this process resolves; the bank's entries are read
        # under those its batches' workers computed them in (``as_recorded``).
        self.given = chosen.config
        config = replace(chosen.config, **resolved_dtypes(chosen.config, device))
        self.request = NewPartsRequest(
            line=station.line, inputs=(), xyz=None, data_format="folder", category=None,
            storage=run.storage, out=run.out or "", run="", records=chosen.records,
            spec=chosen.spec, config=config, shard_size=1,
            reference_budget=bank.reference_budget, device=run.device, record_as=None,
            clean_bank=bank.clean_bank, bank_left_out=chosen.left_out,
        )
        self.out = run.out.rstrip("/") if run.out else None
        spec = chosen.spec
        self.identities: Identities = identify_backbones.fn(spec, config, self.runtime)
        if config.uses_2d:
            extractor_2d(spec, config, device)
        if config.uses_3d:
            extractor_3d(spec, config, device)
        records = list(chosen.records)
        blocks = bank_blocks(records, self.given, self.identities, set(), as_recorded=True)
        self.by_batch = {r.batch: bank_reductions(run.storage, r) for r in records}
        reduced = [self.by_batch[s.batch][s.name] for block in blocks for s in block]
        check_bank(
            self.request, self.identities, blocks, reduced,
            lambda needed: missing_features.fn(needed, self.runtime),
        )
        self.bank_samples = sum(len(b) for b in blocks)
        self.bank_scored = {s.keys.scored for block in blocks for s in block}
        if not self.bank_samples:
            raise ValueError(
                f"the bank of line {station.line!r} holds no sample (batches "
                f"{', '.join(r.batch for r in records)}): choose other batches (--bank, "
                "--bank-nights) or keep every sample (--no-clean-bank)"
            )
        self.memory: BankMemory = load_bank_memory(
            feature_cache(self.runtime.cache_url), blocks, reduced, config, device
        )
        self.random_weights = spec.random_weights(config)
        self.startup_seconds = time.perf_counter() - started
        self.scored = 0
        self._lock = threading.Lock()

    def close(self) -> None:
        """Nothing left to free: each request drops its own scratch cache."""

    @property
    def config(self) -> MuscConfig:
        """The bank's settings, with the dtypes this process computes the parts in."""
        return self.request.config

    def facts(self) -> dict[str, object]:
        """What ``GET /health`` tells: the line, its bank, the backbones, the counts."""
        return {
            "status": "ok",
            "line": self.request.line,
            "bank": [r.batch for r in self.request.records],
            "bank_samples": self.bank_samples,
            "bank_policy": "clean" if self.request.clean_bank else "every sample",
            "modality": self.config.modality,
            "backbones": self.identities.as_dict(),
            "random_weights": self.random_weights,
            "bank_memory_mb": round(self.memory.bytes / 2**20, 1),
            "startup_seconds": round(self.startup_seconds, 3),
            "scored": self.scored,
        }

    def _run_id(self) -> str:
        """A new run id: ``part-<UTC time and random suffix>-<count>`` (:func:`default_batch_id`).

        Unique across stations of one line and storage, even started in the same instant.
        """
        return f"part-{default_batch_id()}-{self.scored + 1:05d}"

    def score(self, files: PartFiles) -> ScoredPart:
        """Score one part against the bank and write its results (one request at a time).

        Args:
            files: the part's saved files and its scratch folder.

        Returns:
            The part's scores and flag, and the run's summary.

        Raises:
            PartRefused: a part that cannot be prepared (422, naming the file and why).
        """
        with self._lock:
            scratch = Runtime(memory_cache_url(), self.request.device)
            try:
                summary = self._score(files, scratch)
            finally:
                drop_memory_cache(scratch.cache_url)
            self.scored += 1
            return summary

    def _score(self, files: PartFiles, scratch: Runtime) -> ScoredPart:
        timings: dict[str, float] = {}
        started = datetime.now(timezone.utc)
        config, request = self.config, self.request
        run_id = self._run_id()
        image_name, xyz_name = files.sent_as
        request = replace(
            request, run=run_id,
            out=f"{self.out}/{run_id}" if self.out else results_url(
                request.storage, request.line, run_id
            ),
            inputs=(image_name or xyz_name or "",),
            xyz=None if files.image is None or files.xyz is None else (xyz_name or "",),
        )
        clock = time.perf_counter()
        part, cleaning = self._prepare(files, run_id, scratch)
        timings["prepare"] = time.perf_counter() - clock
        clock = time.perf_counter()
        counts = self._features(part, scratch)
        timings["features"] = time.perf_counter() - clock
        clock = time.perf_counter()
        plan, bank_reduced, shards = self._pairs(part, scratch)
        counts += shards
        timings["pair_scoring"] = time.perf_counter() - clock
        clock = time.perf_counter()
        counts.append(reduce_samples.fn(plan.reduce[0], config, scratch))
        timings["reduction"] = time.perf_counter() - clock
        clock = time.perf_counter()
        reduced = [plan.reduce[0][0].key, *bank_reduced]
        key, decided = self._decide(reduced, scratch)
        counts.append(StageCount("decisions", 1, 0))
        timings["decisions"] = time.perf_counter() - clock
        records = list(request.records)
        info = run_info(
            request.line, run_id, started, request.out, self.random_weights, self.identities,
            {**run_settings(request), "served": True},
        )
        facts = RunFacts(
            counts=add_counts(counts),
            timings={k: round(v, 3) for k, v in timings.items()},
            seconds=round((datetime.now(timezone.utc) - started).total_seconds(), 3),
            bank=[r.batch for r in records],
            preparation=preparation_summary(cleaning),
        )
        clock = time.perf_counter()
        result = report_line.fn(
            info, plan.samples, reduced, 1, key, [], config, scratch, facts, True, publish=False
        )
        timings["report"] = time.perf_counter() - clock
        final = result.summary.model_copy(update={
            "timings": {k: round(v, 3) for k, v in timings.items()},
            "seconds": round((datetime.now(timezone.utc) - started).total_seconds(), 3),
            "outputs": dict(result.outputs),
        })
        return ScoredPart(
            name=files.name,
            score=float(decided.before[0]),
            score_rescored=float(decided.after[0]),
            flagged=bool(decided.flags[0]),
            summary=final.flow_result(),
        )

    def _pairs(
        self, part: PoolSample, scratch: Runtime
    ) -> tuple[ScoringPlan, list[str], list[StageCount]]:
        """``score_new``'s plan for the part, and its shards against the bank in memory.

        Returns:
            The plan (the bank without a sample equal to the part), the bank samples'
            reduced keys in pool order, and the shards' work counts.
        """
        config = self.config
        bank = bank_blocks(
            self.request.records, self.given, self.identities, {part.keys.scored},
            as_recorded=True,
        )
        bank_reduced = [self.by_batch[s.batch][s.name] for block in bank for s in block]
        plan = plan_against_bank([[part]], bank, config, self.request.reference_budget)
        counts: list[StageCount] = []
        for shard in plan.shards:
            features_b = [self.memory.block_features(plan.blocks[shard.b], s) for s in SLOTS]
            counts.append(
                score_pairs_against([part.keys], features_b, shard.key, config, scratch)
            )
        return plan, bank_reduced, counts

    def _decide(self, reduced: list[str], scratch: Runtime) -> tuple[str, Decided]:
        """RsCon and the decisions over the part (first) and the bank, as ``decide`` makes them.

        Args:
            reduced: the pool's reduced keys: the part's (in the scratch cache), then the
                bank's (in memory).
            scratch: the request's cache; the decided entry is written there.

        Returns:
            The decided entry's key and the decisions.
        """
        config = self.config
        key = decisions_key(reduced, 1, config, True)
        cache = feature_cache(scratch.cache_url)
        scores, salient = self.memory.pool(reduced[1:])
        part_score = cache.meta(reduced[0])["score"]
        part_salient = torch.from_numpy(cache.read_array(reduced[0], "salient"))
        decided = decide_pool(
            torch.tensor([part_score, *scores], dtype=torch.float32),
            torch.stack([part_salient, *salient]), 1, config, True,
        )
        write_decided(cache, key, decided)
        return key, decided

    def _prepare(
        self, files: PartFiles, run_id: str, scratch: Runtime
    ) -> tuple[PoolSample, dict[str, str]]:
        """The part prepared into the scratch cache, as ``score_new``'s preparation does."""
        config, line = self.config, self.request.line
        fmt = self.request.records[0].prep.format
        record = SampleRecord(name=files.name, category=line, image_path=files.image,
                              xyz_path=files.xyz)
        found = DiscoveredSample(record, input_digests(record))
        keys = prepared_keys(found.digests, fmt, line, config)
        [(_, problem, cleaned)] = prepare_samples.fn([(found, keys)], fmt, config, scratch)
        if problem is not None:
            for path, field in ((files.image, "image"), (files.xyz, "xyz")):
                if path:
                    problem = problem.replace(path, f"the uploaded {field}")
            raise PartRefused(422, problem)
        part = PoolSample(files.name, run_id, sample_keys(keys, config, self.identities), None,
                          None)
        return part, {} if cleaned is None else {files.name: cleaned}

    def _stored_features(self, part: PoolSample, scratch: Runtime) -> None:
        """A part equal to a bank sample takes that sample's stored features, as score-new does.

        ``score_new`` finds the entries of a part whose files equal a bank sample's in the
        storage cache; the station copies them into the request's scratch cache, so both score
        the same features (computed in the bank's batch: a batch's composition may change the
        last bits of a sample's tokens, see docs/method.md).
        """
        if part.keys.scored not in self.bank_scored:
            return
        stored, target = feature_cache(self.runtime.cache_url), feature_cache(scratch.cache_url)
        keys = part.keys
        for key in (keys.tokens_2d, keys.snamd_2d, keys.grouping, keys.tokens_3d, keys.snamd_3d):
            if key is not None and not target.has(key) and stored.has(key):
                arrays, meta = stored.read(key)
                target.write(key, arrays, meta=meta)

    def _features(self, part: PoolSample, scratch: Runtime) -> list[StageCount]:
        """The part's features into the scratch cache: ``compute_features``'s chains for it."""
        config, spec, keys = self.config, self.request.spec, part.keys
        self._stored_features(part, scratch)
        counts: list[StageCount] = []
        if config.uses_2d:
            counts.append(extract_2d.fn([[(keys.prepared.image, keys.tokens_2d)]], spec, config,
                                        scratch))
            counts.append(aggregate_2d.fn([[(keys.tokens_2d, keys.snamd_2d)]], config, scratch))
        if config.uses_3d:
            counts.append(group_samples.fn([[(keys.prepared.points, keys.grouping)]], config,
                                           scratch))
            counts.append(extract_3d.fn([[(keys.grouping, keys.tokens_3d)]], spec, config,
                                        scratch))
            counts.append(aggregate_3d.fn([[(keys.tokens_3d, keys.grouping, keys.snamd_3d)]],
                                          config, scratch))
        return counts

