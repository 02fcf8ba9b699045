"""The run summary: one type for run.json, the artifacts and what the flows return."""

import math

from tasks.records.run_summary import RunSummary
from tasks.reporting.artifacts import summary_markdown


def _summary(**changes):
    values = dict(
        random_weights=False, line="part", batch="n1", run_id="r", started="2026-01-01T00:00:00",
        out="/o", backbones={"2d": "vit"}, config={"modality": "2d"}, settings={}, scored=3,
        pool=3, flag_threshold=math.inf, flag_note="constant line", pixel_threshold=0.5,
        flagged=[], set_aside=[{"name": "x|y", "path": "/d/x.png", "problem": "empty file"}],
        outputs={"report": "/o/report.html"},
    )
    values.update(changes)
    return RunSummary(**values)


def test_run_json_holds_objects_and_the_flow_result_triples():
    summary = _summary()
    data = summary.to_json_dict()
    assert data["set_aside"] == [{"name": "x|y", "path": "/d/x.png", "problem": "empty file"}]
    assert "preparation" not in data and "recorded" not in data
    result = summary.flow_result()
    assert result["set_aside"] == [["x|y", "/d/x.png", "empty file"]]
    assert {k: v for k, v in result.items() if k != "set_aside"} == {
        k: v for k, v in data.items() if k != "set_aside"
    }
    assert RunSummary.model_validate(data) == summary


def test_the_artifact_markdown_is_rendered_from_the_summary():
    text = summary_markdown(_summary(drift={"shift": 4.2, "drifted": True, "limit": 3.0}))
    assert "3 samples scored (pool 3), **0 flagged** (threshold inf), 1 set aside." in text
    assert "+4.2 robust sigmas" in text and "**No flag threshold:** constant line" in text
    assert r"- x\|y: empty file" in text and "Report: /o/report.html" in text
