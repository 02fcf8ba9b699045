"""The summary of one run: what ``run.json`` holds, the artifacts show and the command prints.

One type, :class:`RunSummary`, built by the report task; ``run.json`` is its JSON
(:meth:`RunSummary.to_json_dict`), the Prefect artifacts are rendered from it, and the flows
return :meth:`RunSummary.flow_result` (the same fields; set-aside samples as
``[name, path, problem]`` triples, the form the command's own ``run.json`` lists per line).
Importing this module costs pydantic only.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class SetAsideSample(BaseModel):
    """A sample a run could not use: its file and the problem."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    path: str
    problem: str


class Drift(BaseModel):
    """Tonight's median score against the bank's (:func:`musc_core.decisions.score_drift`).

    Attributes:
        shift: the difference of the medians, in robust sigmas of the bank's scores.
        drifted: beyond ``limit``.
        limit: the limit in robust sigmas.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    shift: float
    drifted: bool
    limit: float


class RunFacts(BaseModel):
    """What a flow knows of its run when the report starts.

    Attributes:
        counts: computed and cached entries per stage.
        timings: wall seconds per stage so far.
        seconds: wall seconds of the run so far.
        bank: batch ids of the bank.
        preparation: what the dataset cleaning did, or None.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    counts: dict[str, dict[str, int]]
    timings: dict[str, float]
    seconds: float
    bank: list[str]
    preparation: dict[str, Any] | None = None


class RunSummary(BaseModel):
    """One run of a line (or of new parts against a bank).

    Attributes:
        warning: the random-weights warning, or None.
        random_weights: whether a backbone had random weights.
        line: the line.
        batch: the batch id (``new-<time>`` for new parts not recorded).
        run_id: the Prefect flow run id.
        started: ISO 8601 UTC start time.
        out: output prefix of the results.
        backbones: backbone identity by modality.
        config: the MuSc-V2 settings (:meth:`MuscConfig.as_dict`).
        settings: the run's other settings (data, storage, bank, ...).
        scored: samples scored (the batch's own, or the new parts).
        pool: samples in the pool (with the rolling bank's).
        flag_threshold: the RsCon score above which a sample is flagged (inf: none).
        flag_note: why there is no threshold, or None.
        drift: tonight's scores against the bank's, or None without a bank.
        pixel_threshold: the map value above which a pixel is predicted defective.
        flagged: names of the flagged samples.
        set_aside: samples that could not be used.
        metrics: image and pixel metrics when labels exist.
        outputs: written files by kind.
        counts: computed and cached entries per stage.
        timings: wall seconds per stage.
        seconds: wall seconds of the run.
        bank: batch ids of the bank.
        preparation: what the dataset cleaning did, when known.
        against_bank: new parts scored against a bank.
        recorded: the batch the new parts were recorded as, or None.
    """

    model_config = ConfigDict(extra="forbid")

    warning: str | None = None
    random_weights: bool
    line: str
    batch: str
    run_id: str
    started: str
    out: str
    backbones: dict[str, Any]
    config: dict[str, Any]
    settings: dict[str, Any]
    scored: int
    pool: int
    flag_threshold: float | None
    flag_note: str | None = None
    drift: Drift | None = None
    pixel_threshold: float | None
    flagged: list[str]
    set_aside: list[SetAsideSample]
    metrics: dict[str, float] | None = None
    outputs: dict[str, str]
    counts: dict[str, dict[str, int]] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict)
    seconds: float = 0.0
    bank: list[str] = Field(default_factory=list)
    preparation: dict[str, Any] | None = None
    against_bank: bool = False
    recorded: str | None = None

    def to_json_dict(self) -> dict[str, Any]:
        """``run.json``'s content (set-aside samples as objects; unset optional parts left out)."""
        data = self.model_dump()
        for name in ("preparation", "recorded"):
            if data[name] is None:
                del data[name]
        return data

    def flow_result(self) -> dict[str, Any]:
        """What the flows return: :meth:`to_json_dict` with set-aside ``[name, path, problem]``."""
        data = self.to_json_dict()
        data["set_aside"] = [[a.name, a.path, a.problem] for a in self.set_aside]
        return data
