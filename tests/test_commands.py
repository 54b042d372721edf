"""One declaration per command (flows.commands): every flag reaches the command's check, the
checks are pure and refuse what they should before anything runs, and the experiment design
they plan (lrpipe.experiments, lrpipe.search.plan) is tested without Prefect."""

import inspect
import math
import subprocess
import sys

import pytest

from flows.commands import COMMANDS, parse_rates, parse_skip
from lrpipe.engine.config import ConfigError
from lrpipe.experiments import pipeline, sweep
from lrpipe.search import plan


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_flag_is_a_setting_of_the_check(name):
    command = COMMANDS[name]
    accepted = inspect.signature(command.load("check")).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
    for option in command.options:
        assert takes_any or option.dest in accepted, (name, option.flag)
    assert "overrides" in accepted or takes_any


def test_help_imports_no_flow_module():
    """`lrpipe --help` builds every subcommand from the declarations alone: no Prefect, no
    MLflow, no flow module is imported."""
    code = ("import sys; from flows.cli import build_parser; build_parser(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('prefect', 'mlflow') or (m.startswith('flows.') and m not in "
            "('flows.cli', 'flows.commands'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


def test_unknown_setting_names_the_command_and_what_it_takes():
    with pytest.raises(ConfigError, match=r"^epoch: not a setting of `lrpipe sweep`; "
                                          r"allowed: lrs, epochs, overrides"):
        COMMANDS["sweep"].run(epoch=3)


def test_sweep_check_plans_one_config_per_rate_sorted():
    kwargs, cfgs = sweep.check(lrs=[0.3, 0.01], epochs=2, overrides={"model.name": "softmax"})
    assert [c.optim.lr for c in cfgs] == [0.01, 0.3]
    assert {c.epochs for c in cfgs} == {2} and {c.model.name for c in cfgs} == {"softmax"}
    assert kwargs["lrs"] == [0.3, 0.01] and kwargs["experiment"] == sweep.EXPERIMENT
    with pytest.raises(ConfigError, match=r"^lrs: got \[0\.1, 0\.1\]; allowed: distinct"):
        sweep.check(lrs=[0.1, 0.1])


def test_search_check_plans_subset_and_full_configs():
    kwargs, (full, sub) = plan.check(subset=500, seeds=[2, 0], regret_epochs=2)
    assert full.data.subset is None and sub.data.subset == 500 and full.epochs == 2
    assert kwargs["seeds"] == [2, 0]
    with pytest.raises(ConfigError, match=r"^range_steps: got 3"):
        plan.check(range_steps=3)


def test_grid_plan_names_candidates_and_grid_rates():
    base, _ = plan.search_configs(None, 1000, 1)
    cfgs, names, tags = plan.grid_plan(base, {"halving": 0.1, "steepest": 0.1}, 0.5,
                                       lambda c: f"lr={c.optim.lr:g}")
    lrs = [c.optim.lr for c in cfgs]
    assert lrs == sorted(lrs) and any(math.isclose(lr, 0.1) for lr in lrs)
    at = [i for i, lr in enumerate(lrs) if math.isclose(lr, 0.1)][0]
    assert names[at] == "lr=0.1 (halving, steepest)" and tags[at]["role"] == "candidate"
    assert all(t["role"] == "grid" for i, t in enumerate(tags) if i != at)


def test_landscape_spans_three_and_a_half_decades_around_the_choice():
    rates = sweep.landscape_rates(0.1, also=[0.0316, 0.316, 0.1])
    assert rates == pytest.approx([0.001, 0.00316228, 0.01, 0.0316, 0.1, 0.316, 1.0, 3.16228])
    assert max(rates) / min(rates) >= 100  # the "at least two decades"
    assert 0.1 in rates  # the chosen rate itself, exactly
    with pytest.raises(ConfigError, match="^chosen"):
        sweep.landscape_rates(0.0)


def test_pipeline_sweep_stage_draws_the_landscape_unless_rates_are_given():
    found = {"chosen_lr": 0.05, "neighbours": [0.0316, 0.05, 0.1]}
    rates = pipeline.full_training_rates(None, found)
    assert min(rates) == pytest.approx(0.0005) and max(rates) == pytest.approx(0.05 * 10**1.5)
    assert pipeline.full_training_rates([0.3, 0.1], found) == [0.3, 0.1]
    assert pipeline.full_training_rates(None, None) == list(sweep.DEFAULT_LRS)


def test_flag_parsers_name_the_field():
    assert parse_rates("sgd=0.01, adam=1e-3") == {"sgd": 0.01, "adam": 0.001}
    with pytest.raises(Exception, match="reference_rates"):
        parse_rates("sgd:0.1")
    assert parse_skip("decay,transfer") == ["decay", "transfer"]
    with pytest.raises(Exception, match="^skip: got 'everything'; allowed: search"):
        parse_skip("everything")


def test_make_article_is_a_valid_sweep_from_too_small_to_diverging():
    """README: `make article` sweeps the softmax net from 0.001 to 100 (five decades)."""
    import re
    import shlex
    from pathlib import Path

    from flows.cli import build_parser, settings_from

    text = (Path(__file__).parents[1] / "Makefile").read_text()
    args = shlex.split(re.search(r"^ARTICLE_ARGS := (.*)$", text, re.M).group(1))
    settings = settings_from(build_parser().parse_args(["sweep", *args]))
    _, cfgs = sweep.check(**{k: v for k, v in settings.items() if k != "sets"})
    assert {c.model.name for c in cfgs} == {"softmax"}
    lrs = [c.optim.lr for c in cfgs]
    assert min(lrs) == 0.001 and max(lrs) == 100 and max(lrs) / min(lrs) >= 100
