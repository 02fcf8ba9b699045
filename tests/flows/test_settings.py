"""Settings declared once: the CLI options, the flows' parameters and prefect.yaml agree."""

import argparse
import dataclasses
import inspect
import json
import re
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ValidationError

import flows.cli as cli
from flows.cli_reference import REFERENCE, render
from flows.options import option_name
from flows.rescore import rescore
from flows.score_line import score_line
from flows.score_new import score_new
from flows.settings import (
    RESCORE,
    SCORE_LINE,
    SCORE_NEW,
    Algorithm,
    LineRun,
    RollingBank,
    SynthLine,
    split_settings,
)
from musc_core.config import MuscConfig
from tasks.synthetic.generator import generate_line

ROOT = Path(__file__).resolve().parents[2]
#: Subcommand → the flow's models it fills (fields a command sets itself are named).
COMMANDS = {"score": SCORE_LINE, "rescore": RESCORE, "score-new": SCORE_NEW}
#: Options a command declares for itself instead of the field (their own meaning).
OWN = {("score", "category"), ("score", "out"), ("eval", "out"), ("demo", "out"),
       ("eval", "data_format")}


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser(env={})
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _actions(command: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in command._actions}


def test_every_cli_default_is_the_declared_default():
    commands = _subparsers()
    checked = 0
    for name in ("score", "rescore", "score-new", "eval", "demo"):
        actions = _actions(commands[name])
        models = list(COMMANDS.get(name, SCORE_LINE).values())
        for model in models:
            for field, info in model.model_fields.items():
                if field not in actions or (name, field) in OWN or info.is_required():
                    continue
                expected = cli.DEMO_DEFAULTS.get(field, info.default) if name == "demo" else (
                    info.default
                )
                assert actions[field].default == expected, (name, field)
                assert actions[field].option_strings[:1] in ([option_name(field)], []), field
                checked += 1
    assert checked > 60


def test_the_algorithm_defaults_are_musc_config_s():
    declared = {f.name: f.default for f in dataclasses.fields(MuscConfig)}
    assert Algorithm().model_dump() == declared == MuscConfig().as_dict()
    actions = _actions(_subparsers()["score"])
    for field, default in declared.items():
        assert actions[field].default == default, field
        assert actions[field].help.startswith(
            MuscConfig.__dataclass_fields__[field].metadata["help"]
        )


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_field_of_a_flow_is_an_option_of_its_command(command):
    actions = _actions(_subparsers()[command])
    for model in COMMANDS[command].values():
        for field in model.model_fields:
            assert field in actions, f"musc {command} has no option for {field}"


def test_the_flows_take_a_handful_of_typed_models():
    for flow, models, loose in ((score_line, SCORE_LINE, {"batch"}), (rescore, RESCORE, set()),
                                (score_new, SCORE_NEW, set())):
        parameters = inspect.signature(flow.fn).parameters
        assert set(parameters) == set(models) | loose
        assert len(parameters) <= 6
        for name, model in models.items():
            assert issubclass(model, BaseModel) and name in parameters


def _substituted(value):
    if isinstance(value, dict):
        return {k: _substituted(v) for k, v in value.items()}
    if isinstance(value, str):
        return re.sub(r"\{\{ \$(\w+) \}\}", lambda m: f"/env/{m.group(1)}", value)
    return value


def test_prefect_yaml_parameters_validate_against_the_flow_s_models():
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert config["deployments"]
    for deployment in config["deployments"]:
        parameters = _substituted(deployment["parameters"])
        assert set(parameters) <= set(SCORE_LINE) | {"batch"}, deployment["name"]
        for name, values in parameters.items():
            if name in SCORE_LINE:
                SCORE_LINE[name](**values)


def test_a_misspelled_or_invalid_setting_is_refused_naming_the_field():
    with pytest.raises(ValidationError, match="reference_nigths"):
        RollingBank(reference_nigths=3)
    with pytest.raises(ValidationError, match="shard_size"):
        LineRun(shard_size=0)
    with pytest.raises(TypeError, match="no such setting"):
        split_settings(SCORE_LINE, {"reference_nigths": 3})


def test_ipg_step_above_group_size_is_refused_not_clamped(tmp_path, capsys):
    with pytest.raises(ValidationError, match=r"ipg_step must be in \(0, group_size\]"):
        Algorithm(group_size=32, ipg_step=40)
    status = cli.main(["score", str(tmp_path), "--out", str(tmp_path / "o"), "--group-size",
                       "32", "--ipg-step", "40", "--weights-3d", "random"])
    err = capsys.readouterr().err
    assert status == 2
    assert "musc: error: argument --ipg-step: must be in (0, --group-size], got 40" in err


def test_rescore_and_score_have_the_options_the_flows_take():
    score = _actions(_subparsers()["score"])
    assert {"rescoring_windows", "point_batchnorm", "clean_bank"} <= set(score)
    args = cli.build_parser(env={}).parse_args(
        ["score", "d", "--out", "o", "--rescoring-windows", "1", "3", "--point-batchnorm",
         "running", "--no-clean-bank"]
    )
    settings = cli.line_settings(args)
    assert settings["algorithm"].rescoring_windows == (1, 3)
    assert settings["algorithm"].point_batchnorm == "running"
    assert settings["bank"].clean_bank is False
    args = cli.build_parser(env={}).parse_args(["rescore", "part", "--flag-k", "2.5"])
    assert cli.command_settings(args)["changes"].flag_mad_k == 2.5


def test_the_storage_default_comes_from_the_environment_when_set():
    args = cli.build_parser(env={"MUSC_STORAGE": "/srv/store"}).parse_args(["rescore", "a"])
    assert args.storage == "/srv/store"
    args = cli.build_parser(env={}).parse_args(["rescore", "a"])
    assert args.storage == LineRun().storage


def test_the_checked_in_cli_reference_is_the_generated_one():
    assert (ROOT / REFERENCE).read_text(encoding="utf-8") == render(), (
        "docs/cli.md is out of date: run python -m flows.cli_reference"
    )


def test_synth_prints_what_it_wrote(tmp_path, capsys):
    assert cli.main(["synth", "--out", str(tmp_path), "--num-samples", "4", "--image-size",
                     "32", "--defect-rate", "0.5", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    line = tmp_path / "part"
    assert f"synthetic line written: {line}" in out
    assert "4 samples (2 good" in out and "32x32 px" in out
    assert str(line / "line.json") in out and "LineSummary(" not in out


def test_synth_options_are_generate_lines_arguments_with_its_defaults():
    signature = inspect.signature(generate_line).parameters
    fields = set(SynthLine.model_fields) - {"out", "preset"}
    assert fields == set(signature) - {"root"}
    for name in fields:
        assert SynthLine.model_fields[name].default == signature[name].default, name
    options = _actions(_subparsers()["synth"])
    assert set(SynthLine.model_fields) <= set(options)


def test_synth_preset_writes_the_named_line_and_refuses_an_option_it_sets(tmp_path, capsys):
    assert cli.main(["synth", "--out", str(tmp_path), "--num-samples", "2", "--preset",
                     "mvtec3d-400", "--shape", "puck"]) == 0
    assert "400x400 px, shape puck" in capsys.readouterr().out
    info = json.loads((tmp_path / "part" / "line.json").read_text())
    assert {k: info["parameters"][k] for k in ("image_size", "pixel_pitch", "camera_distance",
                                               "framing", "support_plane")} == {
        "image_size": 400, "pixel_pitch": 0.2, "camera_distance": 0.5, "framing": "mixed",
        "support_plane": False}
    assert cli.main(["synth", "--out", str(tmp_path / "b"), "--preset", "mvtec3d-400",
                     "--image-size", "800"]) == 2
    assert "--preset: mvtec3d-400 sets --image-size" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_synth_refuses_a_pitch_out_of_range_naming_its_option(tmp_path, capsys):
    assert cli.main(["synth", "--out", str(tmp_path), "--pixel-pitch", "2"]) == 2
    assert "argument --pixel-pitch" in capsys.readouterr().err
    assert cli.main(["synth", "--out", str(tmp_path), "--num-samples", "2", "--image-size",
                     "48", "--pixel-pitch", "1", "--framing", "crossing",
                     "--no-support-plane"]) == 0
    info = json.loads((tmp_path / "part" / "line.json").read_text())
    assert info["parameters"]["framing"] == "crossing"
    assert info["parameters"]["support_plane"] is False
    assert info["camera"]["field_of_view_m"] == pytest.approx(0.048)
