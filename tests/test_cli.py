"""`lrpipe --help` and every subcommand's help work, with examples, and name every flow."""

import pytest

from flows import cli
from flows.commands import COMMANDS


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)
    assert "examples:" in out


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_subcommand_has_help_with_the_common_flags(command, capsys):
    COMMANDS[command].load("flow"), COMMANDS[command].load("check")  # both exist
    with pytest.raises(SystemExit) as done:
        cli.main([command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: lrpipe {command}" in out
    assert "--set FIELD=VALUE" in out and "--config" in out


def test_settings_merge_yaml_then_flags(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("epochs: 3\nlrs: [0.1, 1.0]\noverrides: {optim.name: adam}\n")
    args = cli.build_parser().parse_args(
        ["sweep", "--config", str(path), "--epochs", "2", "--set", "model.name=softmax"])
    settings = cli.settings_from(args)
    assert settings["epochs"] == 2 and settings["lrs"] == [0.1, 1.0]
    assert settings["overrides"] == {"optim.name": "adam", "model.name": "softmax"}
