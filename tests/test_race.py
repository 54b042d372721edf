"""Racing schedules over seeds (issue 26, item 4): the pure rules by hand, then the decay flow
raced and not raced on real digits: the raced one trains fewer runs, prunes what round 1 says,
ranks every raced-through schedule first, and reaches the unraced answer."""

from __future__ import annotations

import math
import os

import pandas as pd
import pytest

from flows import decay_compare as dc
from flows.commands import COMMANDS
from lrpipe import tracking
from lrpipe.engine.config import ConfigError
from lrpipe.experiments import race

# The default decay comparison's seed-0 final validation losses (make sweep, 2026-12-05).
SEED0 = {"constant": 0.9476, "step": 0.4135, "multistep": 0.3871, "exponential": 0.4378,
         "cosine": 0.38757, "onecycle": 0.38824, "warmup_cosine": 0.38763,
         "inverse_time": 0.5781, "plateau": 0.38014}


def _finals(losses: dict) -> pd.DataFrame:
    return pd.DataFrame({"arm": list(losses), "val_loss": list(losses.values())})


def test_keep_count_is_a_third_at_least_two_at_most_all():
    assert [race.keep_count(n) for n in range(7)] == [0, 1, 2, 2, 2, 2, 2]
    assert [race.keep_count(n) for n in (7, 8, 9, 10)] == [3, 3, 3, 4]
    assert race.keep_count(8, eta=2, least=1) == 4
    with pytest.raises(ValueError, match="eta"):
        race.keep_count(3, eta=0)


def test_round_one_on_the_default_comparison_by_hand():
    table = race.round_one(_finals(SEED0), controls=["constant"])
    assert list(table.columns) == list(race.RACE_COLUMNS)
    assert table["arm"].tolist() == ["plateau", "multistep", "cosine", "warmup_cosine",
                                     "onecycle", "step", "exponential", "inverse_time",
                                     "constant"]
    assert table["round1_rank"].tolist() == list(range(1, 10))
    assert race.racing_through(table) == ["plateau", "multistep", "cosine", "constant"]
    assert dict(zip(table["arm"], table["race"], strict=True))["constant"] == "control"
    assert (table["race"] == "pruned").sum() == 5


def test_a_diverged_arm_goes_last_and_ties_go_by_name():
    table = race.round_one(_finals({"b": 0.5, "a": 0.5, "c": math.inf, "d": math.nan,
                                    "e": 0.7}))
    assert table["arm"].tolist() == ["a", "b", "e", "c", "d"]
    assert table["race"].tolist() == ["kept", "kept", "pruned", "pruned", "pruned"]
    with pytest.raises(ValueError, match="one row per arm"):
        race.round_one(_finals({"a": 1.0}).pipe(lambda d: pd.concat([d, d])))
    with pytest.raises(ValueError, match="missing columns"):
        race.round_one(pd.DataFrame({"arm": ["a"]}))


def test_planned_runs_by_hand():
    arms = list(SEED0)
    assert race.planned_runs("seeds", arms, (0, 1, 2), ["constant"]) == 9 + 4 * 2
    assert race.planned_runs("off", arms, (0, 1, 2), ["constant"]) == 27
    assert race.planned_runs("seeds", ["constant", "cosine", "step"], (0, 1), ["constant"]) == 6
    assert race.planned_runs("seeds", SCHEDULES, SEEDS, ["constant"]) == 5 + 3


def test_races_only_when_something_can_be_pruned():
    arms = list(SEED0)
    assert race.races("seeds", arms, (0, 1, 2), ["constant"])
    assert not race.races("off", arms, (0, 1, 2), ["constant"])
    assert not race.races("seeds", arms, (0,), ["constant"])  # one seed: nothing to save
    assert not race.races("seeds", ["constant", "cosine", "step"], (0, 1), ["constant"])
    assert race.races("seeds", ["constant", "cosine", "step", "onecycle"], (0, 1), ["constant"])


def test_check_prune_names_the_field_and_the_values():
    assert race.check_prune(None) == "seeds" and race.check_prune(True) == "seeds"
    assert race.check_prune(False) == "off" and race.check_prune("off") == "off"
    with pytest.raises(ConfigError, match=r"^prune: got 'epochs'; allowed: seeds, off$"):
        race.check_prune("epochs")


def test_order_ranking_puts_every_raced_through_arm_first():
    table = race.round_one(_finals({"a": 0.30, "b": 0.31, "c": 0.32, "d": 0.33, "k": 0.9}),
                           controls=["k"])
    # After all seeds, b's mean is worse than pruned c's and d's single seed: b still ranks
    # above them (measured on every seed), and c before d (round-1 order).
    ranking = pd.DataFrame({"schedule": ["d", "c", "a", "b", "k"], "rank": [1, 2, 3, 4, 5],
                            "final_val_loss_mean": [0.33, 0.32, 0.30, 0.40, 0.8]})
    out = race.order_ranking(ranking, table)
    assert out["schedule"].tolist() == ["a", "b", "k", "c", "d"]
    assert out["rank"].tolist() == [1, 2, 3, 4, 5]
    assert out["race"].tolist() == ["kept", "kept", "control", "pruned", "pruned"]
    with pytest.raises(ValueError, match="not in the race"):
        race.order_ranking(ranking.assign(schedule=["x", "c", "a", "b", "k"]), table)


def test_race_line_says_what_went_on_and_what_was_pruned():
    line = race.race_line(race.round_one(_finals(SEED0), ["constant"]), (0, 1, 2))
    assert line.startswith("Raced over seeds: all 9 schedules on seed 0; the best 3 (plateau, "
                           "multistep, cosine) and the control constant also on seeds 1,2; "
                           "pruned after seed 0: warmup_cosine, onecycle, step, exponential, "
                           "inverse_time")
    assert "--prune off" in line


# --- the flow, raced and not --------------------------------------------------------------

OVERRIDES = {"data": {"dataset": "digits", "val_size": 300}, "model": {"hidden": [32]},
             "batch_size": 64, "device": "cpu"}
SCHEDULES = ["constant", "cosine", "step", "exponential", "inverse_time"]
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def both(prefect_harness, _session_store):
    """The same comparison raced (the default) and with ``prune="off"``."""
    os.environ["MLFLOW_TRACKING_URI"] = _session_store
    try:
        return {prune: COMMANDS["decay"].run(lr=0.3, epochs=2, seeds=SEEDS, schedules=SCHEDULES,
                                           overrides=OVERRIDES, workers=2, confirm_seeds=[],
                                           losses=["cross_entropy"], experiment=f"race-{prune}",
                                           **({} if prune == "seeds" else {"prune": prune}))
                for prune in ("seeds", "off")}, _session_store
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]


def _kids(uri: str, parent: str) -> list:
    c = tracking.client(uri)
    exp = c.get_run(parent).info.experiment_id
    return c.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'", max_results=100)


def test_the_raced_comparison_trains_round_two_for_the_survivors_only(both):
    results, uri = both
    raced, full = results["seeds"], results["off"]
    kids = _kids(uri, raced["parent_run_id"])
    assert len(_kids(uri, full["parent_run_id"])) == len(SCHEDULES) * len(SEEDS)
    c = tracking.client(uri)
    table = pd.read_csv(c.download_artifacts(raced["parent_run_id"], "race.csv"))
    through = race.racing_through(table)
    assert len(through) == 3 and "constant" in through  # 2 of 4 contenders + the control
    trained = sorted((k.data.tags["schedule"], int(k.data.params["seed"])) for k in kids)
    assert trained == sorted([(s, 0) for s in SCHEDULES] + [(s, 1) for s in through])
    assert all(k.info.status == "FINISHED" for k in kids)
    first = {k.data.tags["schedule"]: k for k in kids if k.data.params["seed"] == "0"}
    assert {s: first[s].data.tags["race"] for s in SCHEDULES} == \
        dict(zip(table["arm"], table["race"], strict=True))
    assert c.get_run(raced["parent_run_id"]).data.metrics["schedules_pruned"] == 2


def test_round_one_is_the_unraced_comparisons_first_seed(both):
    """The rounds change which runs train, never a run's numbers: round 1's runs equal the
    unraced comparison's seed-0 runs, so the race's verdict can be read off an unraced
    comparison (what make bench does over three seed sets)."""
    results, uri = both
    finals = {}
    for prune, result in results.items():
        finals[prune] = {k.data.tags["schedule"]: k.data.metrics["val_loss"]
                         for k in _kids(uri, result["parent_run_id"])
                         if k.data.params["seed"] == "0"}
    assert finals["seeds"] == finals["off"]
    c = tracking.client(uri)
    logged = pd.read_csv(c.download_artifacts(results["seeds"]["parent_run_id"], "race.csv"))
    again = race.round_one(_finals(finals["off"]), controls=dc.CONTROLS)
    assert logged["arm"].tolist() == again["arm"].tolist()
    assert logged["race"].tolist() == again["race"].tolist()


def test_the_raced_ranking_and_report(both):
    results, uri = both
    raced, full = results["seeds"], results["off"]
    ranking = pd.DataFrame(raced["ranking"])
    assert ranking["rank"].tolist() == list(range(1, len(SCHEDULES) + 1))
    assert ranking["race"].tolist()[:3].count("pruned") == 0
    assert ranking["race"].tolist()[3:] == ["pruned", "pruned"]
    assert set(ranking.loc[ranking["race"] == "pruned", "n_seeds"]) == {1}
    assert set(ranking.loc[ranking["race"] != "pruned", "n_seeds"]) == {len(SEEDS)}
    assert raced["best_schedule"] == full["best_schedule"]  # the answer does not move
    survivors = ranking.loc[ranking["race"] != "pruned", "schedule"].tolist()
    unraced = pd.DataFrame(full["ranking"]).set_index("schedule")["final_val_loss_mean"]
    assert ranking.set_index("schedule").loc[survivors, "final_val_loss_mean"].tolist() == \
        unraced.loc[survivors].tolist()
    c = tracking.client(uri)
    with open(c.download_artifacts(raced["parent_run_id"], "report.md")) as f:
        assert "Raced over seeds: all 5 schedules on seed 0" in f.read()
    assert "race" not in pd.DataFrame(full["ranking"])
    assert c.get_run(full["parent_run_id"]).data.params["prune"] == "off"


def test_a_bad_prune_is_refused_before_any_run(prefect_harness, mlflow_store):
    before = len(tracking.client(mlflow_store).search_experiments())
    with pytest.raises(ConfigError, match=r"^prune: got 'epochs'; allowed: seeds, off$"):
        COMMANDS["decay"].run(lr=0.3, epochs=2, schedules=SCHEDULES, overrides=OVERRIDES,
                              prune="epochs")
    assert len(tracking.client(mlflow_store).search_experiments()) == before


def test_the_pipeline_passes_prune_to_its_decay_stage_and_checks_it_first():
    from flows import pipeline

    kwargs, _ = pipeline.check(skip=["search", "transfer"], prune="off")
    assert kwargs["prune"] == "off"
    assert pipeline.check(skip=["search", "transfer"])[0]["prune"] is None  # the default
    with pytest.raises(ConfigError, match=r"^prune: got 'all'; allowed: seeds, off$"):
        pipeline.check(skip=["search", "transfer"], prune="all")


def test_prune_on_the_command_line_and_in_yaml(tmp_path, capsys, mlflow_store):
    from flows import cli

    for command in ("decay", "pipeline"):
        args = cli.build_parser().parse_args([command, "--prune", "off"])
        assert cli.settings_from(args)["prune"] == "off"
    path = tmp_path / "decay.yaml"
    path.write_text("prune: false\n")  # YAML's false reads as off
    settings = cli.settings_from(cli.build_parser().parse_args(["decay", "--config", str(path)]))
    assert dc.make_plan(0.1, 2, SEEDS, SCHEDULES, overrides=OVERRIDES,
                        prune=settings["prune"]).prune == "off"
    assert cli.main(["decay", "--lr", "0.1", "--prune", "epochs"]) == 2  # bad input, no run
    assert "prune: got 'epochs'; allowed: seeds, off" in capsys.readouterr().err
