"""The trainer's and val's flags come from their config dataclasses: every field a flag with the
field's default, no flag without a field, and `--evolve` handed to the evolution worker."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field, fields, replace

import click
import pytest
from click.testing import CliRunner

from trainer import cli, val
from trainer.config import NO_FLAG, LaunchSettings, TrainConfig, flag
from trainer.cpus import default_loader_workers
from trainer.errors import UserError
from trainer.flags import FrozenLayers, config_options, field_values, option_specs

# TrainConfig fields no flag sets: the parsed hyp file (--hyp names it: hyp_path), and deterministic
FIELDS_WITHOUT_FLAGS = {"hyp", "deterministic"}


def test_every_train_config_field_but_the_documented_ones_has_a_flag() -> None:
    flagged = {spec.field for spec in option_specs(TrainConfig)}
    assert flagged == {item.name for item in fields(TrainConfig)} - FIELDS_WITHOUT_FLAGS
    assert {spec.field for spec in option_specs(LaunchSettings)} == {item.name for item in fields(LaunchSettings)}
    assert {spec.field for spec in option_specs(val.ValConfig)} == {item.name for item in fields(val.ValConfig)}


def test_the_command_line_defaults_are_the_fields_defaults() -> None:
    training, launch = cli.split_training_options(cli.parse_arguments([]))
    assert training["cfg"] is None  # "the --weights' model, else yolov5n": build_config decides
    assert training["workers"] is None  # sized to the machine's CPUs: build_config decides (test_cpus.py)
    assert cli.build_config(training) == replace(TrainConfig(), workers=default_loader_workers(TrainConfig.batch_size))
    assert LaunchSettings(**field_values(LaunchSettings, launch)) == LaunchSettings()
    parsed = cli.parse_arguments(["--weights", "w.pt"], val.main, "python -m trainer.val")
    assert val.ValConfig(**field_values(val.ValConfig, parsed)) == val.ValConfig(weights="w.pt")


def test_flags_keep_their_names_aliases_and_checks() -> None:
    options = cli.parse_arguments(["--batch", "8", "--img-size", "320", "--hyp", "hyp.quickstart", "--resume",
                                   "--cache", "--local_rank", "2", "--freeze", "3"])
    assert (options["batch_size"], options["imgsz"], options["resume"], options["cache"]) == (8, 320, "latest", "ram")
    assert (options["local_rank"], options["freeze"]) == (2, (0, 1, 2))
    config = cli.build_config(cli.split_training_options(options)[0])
    assert config.hyp_path == "hyp.quickstart" and config.hyp != TrainConfig().hyp
    with pytest.raises(UserError, match="Invalid value for '--imgsz'"):
        cli.parse_arguments(["--img", "8"])
    with pytest.raises(UserError, match="'--cache': 'gpu' is not one of"):
        cli.parse_arguments(["--cache", "gpu"])


def test_launch_settings_are_never_saved_with_the_config() -> None:
    assert set(TrainConfig().as_dict()).isdisjoint(item.name for item in fields(LaunchSettings))


@pytest.mark.parametrize(("options", "unknown"), [
    ({"nnodes": 2}, "nnodes"),  # a launch setting
    ({"hyp_path": "hyp.scratch-low"}, "hyp_path"),  # a field, but its flag is --hyp
    ({"epochs": 3, "evolve": 300}, "evolve"),  # an evolution flag
])
def test_build_config_refuses_keys_that_are_no_training_flag(options: dict[str, object], unknown: str) -> None:
    with pytest.raises(TypeError, match=f"TrainConfig has no option {unknown};"):
        cli.build_config(options)


def test_a_field_without_flag_metadata_is_an_error_not_a_missing_flag() -> None:
    @dataclass(frozen=True)
    class Forgotten:
        epochs: int = 3

    @dataclass(frozen=True)
    class Declared:
        epochs: int = field(default=3, metadata=flag("epochs", low=1))
        secret: str = field(default="", metadata=NO_FLAG)

    with pytest.raises(TypeError, match="Forgotten.epochs has no flag"):
        config_options(Forgotten)
    command = config_options(Declared)(click.command()(lambda **options: None))
    assert [parameter.name for parameter in command.params] == ["epochs"]


def test_freeze_defaults_and_help_read_as_the_flag_is_written() -> None:
    assert [FrozenLayers.flag_text(layers) for layers in [(), (0, 1, 2), (2, 4)]] == ["0", "3", "2,4"]


@pytest.mark.parametrize(("arguments", "handed_off"), [
    (["--evolve", "--epochs", "3"], True),
    (["--epochs", "3", "--evolve", "50"], True),
    (["--evolve=50", "--device", "0"], True),
    (["--generations", "40", "--worker-id", "w1"], True),
    (["--epochs", "3", "--name", "evolve"], False),
    (["--evolve-population", "seeds"], False),  # no evolution asked for: the trainer refuses the flag
    (["--", "--evolve"], False),
    ([], False),
])
def test_evolution_flags_hand_the_same_arguments_to_the_evolution_worker(
    arguments: list[str], handed_off: bool
) -> None:
    expected = ["/bin/python", "-m", "orchestrator.evolution", *arguments] if handed_off else None
    assert cli.evolution_handoff(arguments, python="/bin/python") == expected


def test_help_names_the_evolution_flags_it_hands_off() -> None:
    result = CliRunner().invoke(cli.main, ["--help"])
    assert result.exit_code == 0
    assert "--evolve" in result.output and "--generations" in result.output and "--worker-id" in result.output
    assert "--local-rank" not in result.output  # hidden, as before


def test_the_trainer_does_not_import_the_orchestrator() -> None:
    code = ("import sys, trainer.cli, trainer.val; "
            "assert not [name for name in sys.modules if name.startswith('orchestrator')], 'orchestrator imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_an_imgsz_off_the_stride_is_rounded_up_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """YOLOv5's train.py trains `--imgsz 3000` at 3008 and says so; so do we."""
    with caplog.at_level("WARNING", logger="trainer"):
        assert cli.build_config({"imgsz": 3000}).imgsz == 3008
        assert cli.build_config({"imgsz": 20}).imgsz == 32
        assert cli.build_config({"imgsz": 640}).imgsz == 640
        assert cli.build_config({"imgsz": 1000, "cfg": "yolov5s6"}).imgsz == 1024  # a P6 model: stride 64
        assert cli.build_config({"imgsz": 1280, "cfg": "yolov5s6"}).imgsz == 1280
    assert [record.getMessage() for record in caplog.records] == [
        "--imgsz 3000 must be a multiple of the model's stride 32: using 3008",
        "--imgsz 20 must be a multiple of the model's stride 32: using 32",
        "--imgsz 1000 must be a multiple of the model's stride 64: using 1024",
    ]
