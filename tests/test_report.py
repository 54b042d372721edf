"""Reports: hand-checked markdown and URLs, the sweep's answer on hand-made summaries, invariants
of every report, and publishing to MLflow and Prefect for real."""

import json
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pandas as pd
import pytest

from lrpipe import report

UI = "http://127.0.0.1:5000"
PARENT = "aaaa1111bbbb2222cccc3333dddd4444"
PARENT_URL = f"{UI}/#/experiments/7/runs/{PARENT}?workflowType=machine_learning"
FIGURES = ["figures/loss_vs_epoch.png", "figures/final_vs_lr.png"]


def run_url(run_id: str) -> str:
    return f"{UI}/#/experiments/7/runs/{run_id}?workflowType=machine_learning"


def summary(rows) -> pd.DataFrame:
    """rows: (lr, status, val_loss, val_error, best_val_error, diverged_epoch)."""
    df = pd.DataFrame(rows, columns=list(report.SWEEP_COLUMNS[:-1]))
    df["run_id"] = [f"run{i:02d}" for i in range(len(df))]
    return df


SWEEP = summary([
    (0.01, "ok", 0.50, 0.16, 0.15, None),
    (0.1, "ok", 0.40, 0.13, 0.12, None),
    (0.3, "ok", 0.45, 0.14, 0.14, None),
    (1.0, "diverged", 2.30, 0.88, 0.88, 1),
    (3.0, "diverged", 2.30, 0.88, 0.88, 1),
])


# --- hand-computed values ---

def test_markdown_table_by_hand():
    df = pd.DataFrame({"rate": ["[lr=0.1](u)", "a|b"], "loss": [0.123456, np.nan],
                       "epoch": [None, 3]})
    assert report.markdown_table(df) == (
        "| rate | loss | epoch |\n|---|---|---|\n"
        "| [lr=0.1](u) | 0.1235 | - |\n| a\\|b | - | 3 |")
    assert report.markdown_table(df.iloc[:0]) == "_No runs._"


def test_urls_by_hand():
    assert report.parse_run_url(PARENT_URL) == (UI, "7", PARENT)
    assert report.artifact_image_url(PARENT_URL, "figures/a b.png") == (
        f"{UI}/get-artifact?path=figures%2Fa+b.png&run_uuid={PARENT}")
    assert report.artifact_page_url(PARENT_URL, "figures/x.png") == (
        f"{UI}/#/experiments/7/runs/{PARENT}/artifacts/figures/x.png"
        "?workflowType=machine_learning")
    query = parse_qs(urlsplit(report.child_runs_url(PARENT_URL)).fragment.split("?", 1)[1])
    assert query["searchFilter"] == [f"tags.mlflow.parentRunId = '{PARENT}'"]
    assert query["orderByKey"] == ["params.`optim.lr`"] and query["orderByAsc"] == ["true"]


def test_metric_chart_url_carries_every_key_the_page_needs():
    url = report.metric_chart_url(PARENT_URL, ["r1", "r2"], "val_error")
    assert url.startswith(f"{UI}/#/metric?")
    query = {k: v[0] for k, v in parse_qs(url.split("?", 1)[1]).items()}
    assert json.loads(query["runs"]) == ["r1", "r2"]
    assert json.loads(query["metric"]) == "val_error"
    assert json.loads(query["experiments"]) == ["7"]
    assert json.loads(query["plot_metric_keys"]) == ["val_error"]
    assert {"plot_layout", "x_axis", "y_axis_scale", "line_smoothness", "show_point",
            "deselected_curves", "last_linear_y_axis_range"} <= set(query)


def test_parse_run_url_accepts_what_tracking_builds(mlflow_store):
    from lrpipe import tracking

    run_id = tracking.start_run("report-urls", "probe")
    tracking.end_run(run_id)
    ui, exp, rid = report.parse_run_url(tracking.run_url(run_id, "report-urls"))
    assert (ui, exp, rid) == ("http://127.0.0.1:5000", tracking.experiment_id("report-urls"),
                              run_id)


def test_sweep_finding_by_hand():
    f = report.sweep_finding(SWEEP)
    assert f.best_lr == 0.1
    assert f.answer == "Use lr=0.1: the lowest validation loss of 5 rates."
    assert f.evidence[0].startswith("validation loss 0.4000 and validation accuracy 0.8700")
    assert f.evidence[1] == "runner-up lr=0.3: validation loss 0.4500 (+12.5%)"
    assert f.evidence[2] == ("2 of 5 rates diverged (lr=1, 3); the smallest of them, lr=1, "
                             "blew up in epoch 1")
    assert f.notes == ()


# --- warnings ---

@pytest.mark.parametrize("rows, expected", [
    ([(0.01, "ok", 0.5, 0.2, 0.2, None), (0.1, "ok", 0.4, 0.1, 0.1, None)],
     "extend the grid upward"),
    ([(0.01, "ok", 0.4, 0.2, 0.2, None), (0.1, "ok", 0.5, 0.1, 0.1, None)],
     "extend the grid downward"),
    ([(0.01, "ok", 0.5, 0.2, 0.2, None), (0.1, "ok", 0.4, 0.1, 0.1, None),
      (1.0, "diverged", 2.3, 0.9, 0.9, 2)], "edge of stability"),
    ([(0.01, "ok", 0.401, 0.2, 0.2, None), (0.1, "ok", 0.4, 0.1, 0.1, None),
      (0.3, "ok", 0.9, 0.1, 0.1, None)], "Close call: lr=0.1 beats lr=0.01 by +0.2%"),
    ([(0.01, "ok", 0.5, 0.2, 0.2, None), (0.1, "ok", 0.4, 0.1, 0.1, None),
      (0.3, "failed", np.nan, np.nan, np.nan, None)], "status 'failed'"),
])
def test_sweep_warnings(rows, expected):
    notes = report.sweep_finding(summary(rows)).notes
    assert any(expected in note for note in notes), notes


def test_every_rate_diverged_has_no_answer_and_says_what_to_do():
    f = report.sweep_finding(summary([(1.0, "diverged", 2.3, 0.9, 0.9, 1),
                                      (3.0, "diverged", np.inf, 0.9, 0.9, 1)]))
    assert f.best_lr is None and f.answer.startswith("No rate trained")
    assert any("10x below lr=1" in n for n in f.notes)


def test_bad_summaries_are_refused():
    with pytest.raises(ValueError, match="summary: missing columns"):
        report.sweep_finding(SWEEP.drop(columns=["best_val_error"]))
    with pytest.raises(ValueError, match="summary: got no rows"):
        report.sweep_finding(SWEEP.iloc[:0])
    with pytest.raises(ValueError, match="run_url"):
        report.parse_run_url("figures/loss.png")
    with pytest.raises(ValueError, match="run_ids"):
        report.metric_chart_url(PARENT_URL, [])


# --- invariants of a report ---

def test_sweep_report_answers_first_and_links_every_run():
    md = report.sweep_report(SWEEP, PARENT_URL, run_url, FIGURES)
    assert md.index("**Use lr=0.1") < md.index("## Runs") < md.index("## Figures") \
        < md.index("## Links") < md.index("## Notes")
    for run_id in SWEEP["run_id"]:
        assert f"]({run_url(run_id)})" in md
    assert f"**[lr=0.1]({run_url('run01')})** (chosen)" in md
    # a diverged run shows no last-epoch loss: its last finite value predates the blow-up
    assert f"[lr=1]({run_url('run03')}) | diverged | diverged | diverged | 0.88 | 1 |" in md
    assert f"_{report.SWEEP_TABLE_NOTE}_" in md


def test_figures_are_embedded_by_absolute_url_only():
    md = report.sweep_report(SWEEP, PARENT_URL, run_url, FIGURES)
    for path in FIGURES:
        assert f"]({report.artifact_image_url(PARENT_URL, path)})" in md
    assert "](figures/" not in md  # MLflow's markdown view does not draw relative images
    listed = report.build_report("t", "a", [], SWEEP, FIGURES, {}, [])
    assert "![" not in listed and "- `figures/loss_vs_epoch.png`" in listed
    assert "- Nothing to warn about." in listed


def test_terminal_summary_has_answer_table_and_where_to_click():
    text = report.sweep_terminal(SWEEP, PARENT_URL)
    lines = text.splitlines()
    assert lines[0] == "Use lr=0.1: the lowest validation loss of 5 rates."
    assert PARENT_URL in text and report.child_runs_url(PARENT_URL) in text
    assert "/#/metric?" not in text  # long chart URLs stay in the markdown report
    row = next(line for line in lines if line.split()[:2] == ["1", "diverged"])
    assert row.split() == ["1", "diverged", "diverged", "0.88", "1"]  # as in the report
    assert text.rstrip().endswith("`make ui`)")


# --- publishing for real ---

def test_artifact_keys():
    from flows.report import artifact_key

    assert artifact_key("LR sweep_1") == "lr-sweep-1-report"
    assert artifact_key("lr-sweep-report") == "lr-sweep-report"
    with pytest.raises(ValueError, match="key"):
        artifact_key("__")


def test_publish_outside_a_flow_writes_only_mlflow(mlflow_store):
    from flows.report import publish_report
    from lrpipe import tracking

    run_id = tracking.start_run("report-publish", "parent")
    out = publish_report(run_id, "report-publish", "# hello\n", key="outside")
    assert out == {"mlflow_path": "report.md", "key": "outside-report",
                   "prefect_artifact_id": None}
    path = tracking.client().download_artifacts(run_id, "report.md")
    assert open(path).read() == "# hello\n"


def test_publish_inside_a_flow_also_makes_a_prefect_artifact(prefect_harness, mlflow_store):
    from prefect import flow
    from prefect.artifacts import Artifact

    from flows.report import publish_report
    from lrpipe import tracking

    run_id = tracking.start_run("report-publish", "parent")
    md = report.sweep_report(SWEEP, tracking.run_url(run_id, "report-publish"), run_url, FIGURES)

    @flow
    def tiny():
        return publish_report(run_id, "report-publish", md, key="Tiny Sweep")

    out = tiny()
    assert out["key"] == "tiny-sweep-report" and out["prefect_artifact_id"]
    artifact = Artifact.get("tiny-sweep-report")
    assert artifact.type == "markdown" and artifact.data == md
    assert run_id in artifact.description
    path = tracking.client().download_artifacts(run_id, "report.md")
    assert open(path).read() == md


# --- issue 24: reports that render, one convention, percentages, wording ---

def _is_gfm_table(md: str, header: str) -> bool:
    """``header`` starts a GFM pipe table: a blank line before, then a separator row."""
    lines = md.splitlines()
    i = lines.index(header)
    return lines[i - 1] == "" and set(lines[i + 1]) <= set("|-: ") and lines[i + 2][0] == "|"


def test_extra_tables_render_as_gfm_tables_with_percentages():
    regret = pd.DataFrame({"candidate": ["valley", "steepest"],
                           "regret": [report.percent(0.004702), report.percent(np.inf)]})
    md = report.build_report("t", "a", ["e"], SWEEP, [], {}, [], tables={"Regret": regret})
    assert "## Regret\n\n| candidate | regret |\n|---|---|\n| valley | +0.5% |" in md
    assert "| steepest | diverged |" in md
    assert _is_gfm_table(md, "| candidate | regret |")
    assert "0.004702" not in md


def test_percent_and_plural_by_hand():
    assert report.percent(0.004702) == "+0.5%" and report.percent(-0.02) == "-2.0%"
    assert report.percent(0.25, signed=False) == "25.0%"
    assert report.percent(np.inf) == "diverged" and report.percent(np.nan) == "-"
    assert report.plural(1, "rate") == "1 rate" and report.plural(3, "rate") == "3 rates"


def test_one_rate_wording_is_singular():
    one = summary([(0.1, "ok", 0.4, 0.1, 0.1, None)])
    assert report.sweep_finding(one).answer == (
        "Use lr=0.1: the only rate tried, and it trained.")
    md = report.sweep_report(one, PARENT_URL, run_url, [])
    assert md.startswith("# Learning-rate sweep: 1 rate\n") and "1 rates" not in md
    two = summary([(0.1, "ok", 0.4, 0.1, 0.1, None), (1.0, "diverged", 2.3, 0.9, 0.9, 2)])
    assert report.sweep_finding(two).evidence[-1] == (
        "1 of 2 rates diverged (lr=1): it blew up in epoch 2")  # no "the smallest" of one
    dead = summary([(1.0, "diverged", 2.3, 0.9, 0.9, 2)])
    assert report.sweep_finding(dead).answer == (
        "No rate trained: the only rate diverged or failed.")


def test_a_diverged_run_reads_the_same_everywhere():
    table = report.final_metrics(SWEEP)
    assert table["val_loss"].isna().tolist() == [False, False, False, True, True]
    assert str(table["diverged_epoch"].dtype) == "Int64"
    assert table["diverged_epoch"].tolist()[3:] == [1, 1]
    assert table["diverged_epoch"].isna().tolist()[:3] == [True] * 3  # never None and NaN
    md = report.sweep_report(SWEEP, PARENT_URL, run_url, [])
    terminal = report.sweep_terminal(SWEEP, PARENT_URL)
    assert "2.3" not in md.split("## Runs")[1].split("## Links")[0] and " 2.3 " not in terminal
    assert "| diverged at epoch |" in md


def test_close_call_uses_the_seed_band_when_there_is_one():
    rows = summary([(0.01, "ok", 0.40, 0.2, 0.2, None), (0.1, "ok", 0.44, 0.1, 0.1, None)])
    assert not any("Close call" in n for n in report.sweep_finding(rows).notes)  # 10% > 2%
    apart = rows.assign(val_loss_lo=[0.39, 0.43], val_loss_hi=[0.41, 0.45])
    assert not any("Close call" in n for n in report.sweep_finding(apart).notes)
    overlap = rows.assign(val_loss_lo=[0.35, 0.43], val_loss_hi=[0.46, 0.45])  # +10%, inside
    notes = report.sweep_finding(overlap).notes
    assert any(n.startswith("Close call: lr=0.01 beats lr=0.1 by +10.0%") and
               "bands over seeds overlap" in n for n in notes), notes


# --- the search's report tables ---

def _regret():
    return pd.DataFrame({"name": ["valley", "steepest", "wild"], "lr": [0.02, 0.01, 1.0],
                         "val_loss": [0.43, 0.432, np.inf], "best_lr": 0.02,
                         "best_val_loss": 0.43, "regret": [0.0, 0.004702, np.inf]})


def _grid(seeds=1):
    rows = [(lr, s, st, v + 0.01 * s, 0.1, ep) for s in range(seeds) for lr, st, v, ep in
            [(0.01, "ok", 0.432, None), (0.02, "ok", 0.43, None), (1.0, "diverged", 2.309, 3)]]
    return pd.DataFrame(rows, columns=["lr", "seed", "status", "val_loss", "val_error",
                                       "diverged_epoch"])


def test_search_tables_render_as_gfm_tables_with_percentages_and_one_divergence():
    from lrpipe.search import report as search_report

    bands = {"steepest": (0.01, 0.006, 0.012), "min_over_10": (None, None, None)}
    cross = pd.DataFrame({"rule": ["steepest"], "lr": [0.01], "ratio_to_halving": [0.5],
                          "log10_ratio": [-0.3]})
    tables = search_report.search_tables(bands, cross, _regret(), _grid())
    md = report.build_report("Learning-rate search", "Chosen rate: 0.02", [], _regret(), [],
                             {}, [], tables=tables)
    assert "| rule | median lr | min..max over seeds | spread |" in md
    assert _is_gfm_table(md, "| candidate | lr | val loss | grid best | regret |")
    assert "| steepest | 0.01 | 0.4320 | 0.02 (0.4300) | +0.5% |" in md
    assert "| wild | 1 | diverged | 0.02 (0.4300) | diverged |" in md
    assert "| min_over_10 | no suggestion | - | - |" in md and "| steepest | 0.01 | 0.5x |" in md
    grid_part = md.split("## Grid (full-data training)")[1]
    assert "| 1 | diverged | diverged | diverged | 3 |" in grid_part and "2.309" not in grid_part
    assert "| 0.01 | ok | 0.4320 | 0.1000 | - |" in grid_part


def test_search_close_call_inside_the_seed_band_or_two_percent():
    from lrpipe.search import report as search_report

    one = search_report.search_notes(_regret(), _grid(), 0.02)
    assert len(one) == 1 and one[0].startswith(
        "Close call: the chosen lr=0.02 beats lr=0.01 by +0.5% in validation loss, within 2%")
    far = _grid().assign(val_loss=[0.5, 0.43, 2.3])
    assert search_report.search_notes(_regret(), far, 0.02) == []
    banded = search_report.search_notes(_regret(), _grid(seeds=3), 0.02)  # 0.43..0.45 bands
    assert len(banded) == 1 and "bands over seeds overlap" in banded[0]
    assert search_report.search_notes(_regret(), _grid(), None) == []


# --- issue 27: every report says what its numbers are measured on ---------------------------

def test_every_flow_report_has_its_measured_on_line():
    from flows import batch_size, dropout, final, losses, optimizer_compare, transfer
    from flows.report import publish_flow_report
    from lrpipe.experiments import pipeline, sweep
    from lrpipe.report import MEASURED_ON
    from lrpipe.search import plan

    keys = {m.EXPERIMENT for m in (batch_size, dropout, final, losses, optimizer_compare,
                                   transfer, pipeline, sweep, plan)} | {"lr-decay"}
    assert keys == set(MEASURED_ON)
    for key, line in MEASURED_ON.items():
        assert any(word in line for word in ("in-sample", "test split")), key
    with pytest.raises(ValueError, match=r"^key: got 'my-flow'; allowed: one of \["):
        publish_flow_report("no-run", "my-flow", "t", "a", pd.DataFrame())


def test_the_measured_on_line_follows_the_answer():
    text = report.build_report("T", "the answer", ["why"], pd.DataFrame({"a": [1]}), [], {}, [],
                        measured_on="the test split")
    assert text.split("\n")[2:6] == ["**the answer**", "", "_Measured on: the test split._", ""]
    plain = report.build_report("T", "a", [], pd.DataFrame({"a": [1]}), [], {}, [])
    assert "Measured on" not in plain
