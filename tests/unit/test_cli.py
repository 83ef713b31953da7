"""The imgclf command line: hyperparameter resolution, exit codes, and the docs it generates."""

import json
import pathlib

import yaml

from pipelines.cli import main as imgclf
from trainer import hyperparameters as hps

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def test_hyperparameters_prints_resolved_yaml(tmp_path, capsys):
    params = tmp_path / "hyperparameters.json"
    params.write_text(json.dumps({"epochs": "4", "train_only_on_top_layer": "True", "optimizer": "sgd"}))
    assert imgclf(["hyperparameters", "--params", str(params), "--set", "momentum=0.5"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved == hps.Hyperparameters(epochs=4, train_only_top_layer=True, optimizer="sgd",
                                           momentum=0.5).to_dict()


def test_hyperparameters_problems_exit_2(capsys):
    assert imgclf(["hyperparameters", "--set", "learning_rte=0.1", "--set", "batch_size=0"]) == 2
    err = capsys.readouterr().err
    assert "learning_rte: unknown hyperparameter; did you mean 'learning_rate'?" in err
    assert "batch_size: got '0', expected an integer in [1, 65536]" in err


def test_list_describes_every_hyperparameter(capsys):
    assert imgclf(["hyperparameters", "--list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(" ")[0] for line in out] == list(hps.FIELDS)


def test_readme_table_is_generated_from_the_schema():
    stale = "README's table is stale: paste the output of `imgclf hyperparameters --markdown`"
    assert hps.markdown_table() in README.read_text(), stale


def test_trainer_train_flags_come_from_the_schema():
    from trainer.cli import build_parser

    parser, commands = build_parser()
    train_parser = commands.choices["train"]
    options = {opt for action in train_parser._actions for opt in action.option_strings}
    for name in hps.FIELDS:
        assert f"--{name}" in options
    assert "--train_only_on_top_layer" in options
    args = parser.parse_args(["train", "--dataset", "d", "--output", "o", "--learning_rate", "0.01",
                              "--train_only_on_top_layer", "True", "--set", "epochs=2"])
    from trainer.cli import resolve_hyperparameters

    hp = resolve_hyperparameters(args)
    assert (hp.learning_rate, hp.train_only_top_layer, hp.epochs) == (0.01, True, 2)
