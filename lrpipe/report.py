"""Run reports: markdown for MLflow's artifact view and Prefect's artifact page, plain text for
the terminal. Pure string functions of a summary table; nothing here logs, prints or reads.

A report answers first (the chosen rate and the evidence for it), then shows the runs, the
figures, where to click next and what to be wary of.

What MLflow 3.17's markdown view (``report.md`` in a run's Artifacts tab) renders, checked in
Chromium: headings, bold, tables and links, and images only from an absolute http(s) URL; a
relative image path (``figures/x.png``) or a root-relative one is shown as plain text. So
figures are embedded through the tracking server's ``/get-artifact`` endpoint, built from the
run's page URL (``tracking.run_url``), and each also links to its page in the Artifacts tab.
They show wherever that server answers (``make ui``: http://127.0.0.1:5000).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import quote, urlencode

import pandas as pd

# tracking.run_url: {ui}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=...
_RUN_URL = re.compile(r"^(?P<ui>https?://[^#\s]+?)/?#/experiments/(?P<exp>[^/?#\s]+)"
                      r"/runs/(?P<run>[0-9a-zA-Z]+)")
# Two runs closer than this in final validation loss are not separated by one seed.
CLOSE_CALL = 0.02
# One convention for a run that diverged, everywhere a final metric is shown: it has none
# (NaN in CSVs and MLflow; this word in reports and the terminal), and the epoch that blew
# up is an integer. Its last finite value predates the blow-up and would mislead.
DIVERGED_CELL = "diverged"
SWEEP_TABLE_NOTE = ("val loss, val error: after the last epoch ('diverged' for a run that "
                    "blew up: it has no final value); best val error: the lowest of any epoch; "
                    "diverged at epoch: the epoch whose loss blew up.")
SWEEP_COLUMNS = ("lr", "status", "val_loss", "val_error", "best_val_error", "diverged_epoch",
                 "run_id")


def parse_run_url(url: str) -> tuple[str, str, str]:
    """``tracking.run_url`` output -> (UI base URL, experiment id, run id); ValueError if not."""
    match = _RUN_URL.match(url) if isinstance(url, str) else None
    if match is None:
        raise ValueError(f"run_url: got {url!r}; allowed: an MLflow run page URL "
                         "http(s)://host:port/#/experiments/<id>/runs/<run_id>")
    return match["ui"], match["exp"], match["run"]


def artifact_image_url(run_url: str, path: str) -> str:
    """The artifact ``path`` of the run at ``run_url`` as a URL an <img> can load."""
    ui, _, run = parse_run_url(run_url)
    return f"{ui}/get-artifact?{urlencode({'path': path, 'run_uuid': run})}"


def artifact_page_url(run_url: str, path: str) -> str:
    """The run's Artifacts tab with ``path`` selected."""
    ui, exp, run = parse_run_url(run_url)
    return (f"{ui}/#/experiments/{exp}/runs/{run}/artifacts/{quote(path)}"
            "?workflowType=machine_learning")


def child_runs_url(parent_url: str, order_by: str = "params.`optim.lr`") -> str:
    """The runs table holding only the children of the parent run at ``parent_url``, sorted by
    ``order_by`` (default: the rate, ascending)."""
    ui, exp, run = parse_run_url(parent_url)
    query = urlencode({"workflowType": "machine_learning",
                       "searchFilter": f"tags.mlflow.parentRunId = '{run}'",
                       "orderByKey": order_by, "orderByAsc": "true"})
    return f"{ui}/#/experiments/{exp}/runs?{query}"


def metric_chart_url(any_run_url: str, run_ids: Iterable[str], metric: str = "val_loss") -> str:
    """MLflow's metric page: ``metric`` against epoch (step) for every run in ``run_ids``, one
    line each. ``any_run_url`` gives the UI base and experiment."""
    ui, exp, _ = parse_run_url(any_run_url)
    ids = list(run_ids)
    if not ids:
        raise ValueError("run_ids: got none; allowed: at least one run id")
    # The page refuses to load ("invalid URL") unless every one of these keys is present.
    compact = {"separators": (",", ":")}
    query = (f"runs={quote(json.dumps(ids, **compact))}&metric={quote(json.dumps(metric))}"
             f"&experiments={quote(json.dumps([exp]))}"
             f"&plot_metric_keys={quote(json.dumps([metric]))}&plot_layout={quote('{}')}"
             "&x_axis=step&y_axis_scale=linear&line_smoothness=1&show_point=true"
             f"&deselected_curves={quote('[]')}&last_linear_y_axis_range={quote('[]')}")
    return f"{ui}/#/metric?{query}"


def plural(n: int, word: str, words: str | None = None) -> str:
    """``1 rate``, ``3 rates``: a count with its noun in the right number."""
    return f"{n} {word if n == 1 else (words or word + 's')}"


def percent(fraction, signed: bool = True) -> str:
    """A fraction as a percentage for a reader: 0.004702 -> '+0.5%'; inf -> 'diverged';
    NaN or None -> '-'."""
    if fraction is None or (isinstance(fraction, float) and math.isnan(fraction)):
        return "-"
    if math.isinf(float(fraction)):
        return DIVERGED_CELL
    return f"{float(fraction):{'+' if signed else ''}.1%}"


def final_metrics(summary: pd.DataFrame, columns=("val_loss", "val_error")) -> pd.DataFrame:
    """``summary`` with the final ``columns`` NaN where the run diverged (stopped: it has no
    final value, only a stale last finite one) and ``diverged_epoch`` as a nullable integer:
    the one convention for a stopped run's final metrics, for CSVs, MLflow metrics and every
    table. A ``no_progress`` run trained to its last epoch: its final values are real, kept."""
    out = summary.copy()
    for column in columns:
        if column in out:
            out[column] = out[column].where(out["status"] != "diverged")
    if "diverged_epoch" in out:
        epochs = pd.to_numeric(out["diverged_epoch"], errors="coerce")
        out["diverged_epoch"] = epochs.round().astype("Int64")
    return out


def _cell(value) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub-style markdown table: floats to 4 significant digits, missing values as '-',
    pipes escaped. Cells may hold markdown links."""
    if table.empty:
        return "_No runs._"
    header = "| " + " | ".join(_cell(c) for c in table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    rows = ["| " + " | ".join(_cell(v) for v in row) + " |"
            for row in table.astype(object).itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def _figure_name(path: str) -> str:
    return PurePosixPath(path).stem.replace("_", " ")


def _figures(figures: list[str], run_url: str | None) -> list[str]:
    if run_url is None:
        return [f"- `{path}` (this run's artifacts)" for path in figures]
    out = []
    for path in figures:
        name = _figure_name(path)
        out += [f"### {name}", "", f"![{name}]({artifact_image_url(run_url, path)})", "",
                f"[{path} in MLflow]({artifact_page_url(run_url, path)})", ""]
    return out


# What each flow's numbers are measured on (issue 27): the selection split (``val_*``: examples
# held out of the training split, which every choice may look at), the test split (scored
# once, for the final model and each recommended recipe), in-sample (on the runs that made the
# choice) or out of sample (fresh seeds or start points that did not make it). Every report
# opens with its line.
SELECTION = "the selection split (`val_*`: `data.val_size` examples held out of the training split)"
MEASURED_ON = {
    "lr-sweep": f"{SELECTION}, one run per rate; the best rate is in-sample (picked on these "
                "runs); no test set",
    "lr-search": f"{SELECTION}; the choice and its regret are in-sample (the runs that chose); "
                 "the confirmation on fresh seeds is out of sample; no test set",
    "lr-decay": f"{SELECTION}; the ranking is in-sample (the seeds that rank); the best against "
                "the runner-up on fresh seeds is out of sample; the test split only in the "
                "line and table `Test set (never used to choose)`: the best schedule's "
                "fresh-seed runs, trained without it and scored once after training",
    "transfer": "the target task's selection split (validation); the strategy ranking is "
                "in-sample, the best against the runner-up on fresh seeds out of sample; the "
                "target task's test split only in the line and table `Test set (never used "
                "to choose)`: the best strategy's fresh-seed fine-tunings, trained without it "
                "and scored once after training",
    "optimizers": "2-D surfaces: tuned and reported from the same start (in-sample), "
                  "`fresh_*` from start points nobody tuned on (out of sample); real data: "
                  f"{SELECTION}, on seeds other than the one each rate was searched on (out "
                  "of sample for the rates); the test split only in the line and table "
                  "`Test set (never used to choose)`: the winner at its rate retrained on "
                  "fresh seeds without it and scored once after training",
    "final": "the test split, scored once after training and never used to choose (training "
             "saw the whole training split, validation included)",
    "pipeline": "each stage as its own report says; the final model's figures are the test "
              "split's, the others the selection split's",
    "batch-size": f"{SELECTION}; each batch size's best rate is in-sample (picked on the "
                     "grid's runs); no test set",
    "dropout": f"{SELECTION} and the training split (the gap: selection minus training loss, "
               "eval mode); each arm's best rate is in-sample; no test set",
    "losses": f"{SELECTION}; each loss's rate comes from its own search (in-sample there), the "
              "comparison runs on fresh seeds (out of sample); no test set",
}


def build_report(
    title: str,
    answer: str,
    evidence: list[str],
    table: pd.DataFrame,
    figures: list[str],
    links: Mapping[str, str],
    notes: list[str],
    run_url: str | None = None,
    table_note: str | None = None,
    tables: Mapping[str, pd.DataFrame] | None = None,
    measured_on: str | None = None,
) -> str:
    """The run report as markdown: answer, what it is measured on, evidence, runs table,
    figures, links, notes.

    Args:
        figures: artifact paths of the run at ``run_url`` (``figures/loss_vs_epoch.png``).
            With ``run_url`` they are embedded as images from the tracking server; without it
            they are listed by path.
        links: name -> URL, in order (the MLflow run pages, charts).
        notes: warnings for the reader; the section says so when there are none.
        table_note: one line under the table saying what its columns mean.
        tables: heading -> table, each a section of its own after the runs table (a GFM
            table: header, separator row, a blank line before and after).
    """
    lines = [f"# {title}", "", f"**{answer}**", ""]
    lines += [f"_Measured on: {measured_on}._", ""] if measured_on else []
    lines += [f"- {item}" for item in evidence] + ([""] if evidence else [])
    lines += ["## Runs", "", markdown_table(table), ""]
    lines += [f"_{table_note}_", ""] if table_note else []
    for heading, extra in (tables or {}).items():
        lines += [f"## {heading}", "", markdown_table(extra), ""]
    if figures:
        lines += ["## Figures", "", *_figures(figures, run_url)]
    if links:
        lines += ["## Links", "", *[f"- [{name}]({url})" for name, url in links.items()], ""]
    lines += ["## Notes", ""]
    lines += [f"- {note}" for note in notes] if notes else ["- Nothing to warn about."]
    return "\n".join(lines) + "\n"


def terminal_summary(answer: str, evidence: list[str], table: pd.DataFrame,
                     links: Mapping[str, str], notes: list[str] = ()) -> str:
    """Plain text for the end of a flow: the answer, a compact table, where to click next."""
    lines = [answer, *[f"  {item}" for item in evidence], ""]
    lines += [table.to_string(index=False, float_format=lambda x: f"{x:.4g}", na_rep="-"), ""]
    if links:
        width = max(len(name) for name in links)
        lines += ["Next:"] + [f"  {name:<{width}}  {url}" for name, url in links.items()]
    if notes:
        lines += ["Notes:"] + [f"  ! {note}" for note in notes]
    if links:
        lines += ["(start the MLflow UI with `make ui`)"]
    return "\n".join(lines)


# --- the learning-rate sweep's report ---


@dataclass(frozen=True)
class SweepFinding:
    """What a sweep says: the chosen rate (None when every rate diverged), the answer in one
    sentence, the evidence for it and the warnings."""

    best_lr: float | None
    answer: str
    evidence: tuple[str, ...]
    notes: tuple[str, ...]


def _check_sweep(summary: pd.DataFrame) -> None:
    missing = [c for c in SWEEP_COLUMNS if c not in summary.columns]
    if missing:
        raise ValueError(f"summary: missing columns {missing}; allowed: a table with "
                         f"{', '.join(SWEEP_COLUMNS)} (flows.lr_sweep.summarize)")
    if summary.empty:
        raise ValueError("summary: got no rows; allowed: one row per rate")


def _trained(summary: pd.DataFrame) -> pd.DataFrame:
    ok = summary[(summary["status"] == "ok") & summary["val_loss"].map(_finite)]
    return ok.sort_values("val_loss", kind="stable")


def _finite(value) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _diverged_text(diverged: pd.DataFrame, n: int) -> str:
    if diverged.empty:
        return "no rate diverged" if n > 1 else "the rate did not diverge"
    first = diverged.iloc[0]
    when = first["diverged_epoch"]
    epoch = f" in epoch {int(when)}" if _finite(when) else ""
    if len(diverged) == 1:
        return f"1 of {plural(n, 'rate')} diverged (lr={first['lr']:g}): it blew up{epoch}"
    rates = ", ".join(f"{lr:g}" for lr in diverged["lr"])
    return (f"{len(diverged)} of {n} rates diverged (lr={rates}); the smallest of them, "
            f"lr={first['lr']:g}, blew up{epoch}")


def _sweep_notes(summary: pd.DataFrame, ok: pd.DataFrame, best: pd.Series) -> list[str]:
    rates = sorted(summary["lr"])
    notes = []
    if best["lr"] == rates[-1]:
        notes.append(f"lr={best['lr']:g} is the largest rate tried: a larger one may be better; "
                     "extend the grid upward.")
    if best["lr"] == rates[0] and len(rates) > 1:
        notes.append(f"lr={best['lr']:g} is the smallest rate tried: extend the grid downward.")
    larger = summary[summary["lr"] > best["lr"]].sort_values("lr")
    if not larger.empty and larger.iloc[0]["status"] == "diverged":
        notes.append(f"The next larger rate, lr={larger.iloc[0]['lr']:g}, diverged: the choice "
                     "sits at the edge of stability; a longer run or another seed may tip it.")
    if len(ok) > 1 and close_call(best, ok.iloc[1]):
        second = ok.iloc[1]
        notes.append(close_call_note(f"lr={best['lr']:g}", f"lr={second['lr']:g}", best,
                                     second))
    for _, row in summary[~summary["status"].isin(["ok", "diverged"])].iterrows():
        notes.append(f"lr={row['lr']:g} ended with status {row['status']!r}.")
    return notes


def close_call(best, second) -> bool:
    """Whether a choice of ``best`` over ``second`` (rows with val_loss) is inside the noise:
    their seed bands overlap where rows carry ``val_loss_lo``/``val_loss_hi`` (min..max over
    seeds), else they are within ``CLOSE_CALL`` (2%) of each other, what one seed cannot
    separate."""
    if all(_finite(row.get(c)) for row in (best, second) for c in ("val_loss_lo", "val_loss_hi")):
        return float(best["val_loss_hi"]) >= float(second["val_loss_lo"])
    return float(second["val_loss"]) - float(best["val_loss"]) <= CLOSE_CALL * float(
        best["val_loss"])


def close_call_note(best_name: str, second_name: str, best, second) -> str:
    """The warning for a ``close_call``: what the margin is and why it does not decide."""
    gap = percent(float(second["val_loss"]) / float(best["val_loss"]) - 1)
    if all(_finite(row.get(c)) for row in (best, second) for c in ("val_loss_lo", "val_loss_hi")):
        why = "their min..max bands over seeds overlap"
    else:
        why = f"within {CLOSE_CALL:.0%}: one seed cannot separate them"
    return (f"Close call: {best_name} beats {second_name} by {gap} in validation loss, "
            f"{why}; compare them over more seeds before trusting the order.")


def sweep_finding(summary: pd.DataFrame) -> SweepFinding:
    """The chosen rate of a sweep: the lowest final validation loss among the runs that did not
    diverge (the rule of flows.lr_sweep.best_rate), with its evidence and warnings.

    Raises:
        ValueError: ``summary`` lacks a column of ``SWEEP_COLUMNS`` or has no rows.
    """
    _check_sweep(summary)
    summary = summary.sort_values("lr").reset_index(drop=True)
    n = len(summary)
    diverged = summary[summary["status"] == "diverged"]
    ok = _trained(summary)
    if ok.empty:
        every = "the only rate" if n == 1 else f"all {n} rates"
        return SweepFinding(None, f"No rate trained: {every} diverged or failed.",
                            (_diverged_text(diverged, n),),
                            (f"Lower the rates: try 10x below lr={summary['lr'].min():g}.",))
    best = ok.iloc[0]
    evidence = [f"validation loss {best['val_loss']:.4f} and validation accuracy "
                f"{1 - best['val_error']:.4f} after the last epoch (lowest validation error "
                f"{best['best_val_error']:.4f})"]
    if len(ok) > 1:
        second = ok.iloc[1]
        gap = percent(second["val_loss"] / best["val_loss"] - 1)
        evidence.append(f"runner-up lr={second['lr']:g}: validation loss "
                        f"{second['val_loss']:.4f} ({gap})")
    evidence.append(_diverged_text(diverged, n))
    answer = (f"Use lr={best['lr']:g}: the lowest validation loss of {plural(n, 'rate')}."
              if n > 1 else f"Use lr={best['lr']:g}: the only rate tried, and it trained.")
    return SweepFinding(float(best["lr"]), answer, tuple(evidence),
                        tuple(_sweep_notes(summary, ok, best)))


def sweep_table(summary: pd.DataFrame, run_url_fn: Callable[[str], str],
                best_lr: float | None = None) -> pd.DataFrame:
    """One row per rate for the report, each rate linked to its MLflow run page. A diverged
    run's last-epoch metrics are shown as '-': they predate the blow-up and would mislead."""
    _check_sweep(summary)
    rows = []
    for _, r in summary.sort_values("lr").iterrows():
        link = f"[lr={r['lr']:g}]({run_url_fn(r['run_id'])})"
        trained = r["status"] != "diverged"  # no_progress trained to the end: its value is real
        rows.append({
            "rate": f"**{link}** (chosen)" if best_lr is not None and r["lr"] == best_lr
            else link,
            "status": r["status"],
            "val loss": r["val_loss"] if trained else _stopped_cell(r["status"]),
            "val error": r["val_error"] if trained else _stopped_cell(r["status"]),
            "best val error": r["best_val_error"],
            "diverged at epoch": int(r["diverged_epoch"]) if _finite(r["diverged_epoch"])
            else None,
        })
    return pd.DataFrame(rows)


def _stopped_cell(status: str) -> str:
    return DIVERGED_CELL if status == "diverged" else str(status).replace("_", " ")


def sweep_links(summary: pd.DataFrame, parent_url: str) -> dict[str, str]:
    """Where to click next: the parent run, its runs table, val_loss and val_error charts."""
    ids = list(summary.sort_values("lr")["run_id"])
    return {"the sweep (parent run, figures, summary.csv)": parent_url,
            "its runs, sorted by rate": child_runs_url(parent_url),
            "val_loss of every rate on one chart": metric_chart_url(parent_url, ids, "val_loss"),
            "val_error of every rate on one chart": metric_chart_url(parent_url, ids,
                                                                     "val_error")}


def sweep_report(summary: pd.DataFrame, parent_url: str, run_url_fn: Callable[[str], str],
                 figures: list[str], title: str | None = None) -> str:
    """The lr_sweep report (markdown) for ``summary`` (``SWEEP_COLUMNS``, one row per rate).

    Args:
        parent_url: the parent run's page (``tracking.run_url``); the figures are its artifacts.
        run_url_fn: run id -> that run's page URL.
        figures: artifact paths on the parent run, e.g. ``figures/loss_vs_epoch.png``.
    """
    finding = sweep_finding(summary)
    return build_report(
        title or f"Learning-rate sweep: {plural(len(summary), 'rate')}", finding.answer,
        list(finding.evidence), sweep_table(summary, run_url_fn, finding.best_lr), figures,
        sweep_links(summary, parent_url), list(finding.notes), run_url=parent_url,
        table_note=SWEEP_TABLE_NOTE, measured_on=MEASURED_ON["lr-sweep"])


def sweep_terminal(summary: pd.DataFrame, parent_url: str) -> str:
    """The plain-text version of ``sweep_report`` for the end of the flow."""
    finding = sweep_finding(summary)
    table = final_metrics(summary.sort_values("lr"))[["lr", "status", "val_loss",
                                                      "best_val_error", "diverged_epoch"]]
    # As in sweep_table: a stopped run has no final loss; the cell says why.
    table = table.astype({"val_loss": object})
    stopped = table["status"] == "diverged"
    table.loc[stopped, "val_loss"] = table.loc[stopped, "status"].map(_stopped_cell)
    links = sweep_links(summary, parent_url)
    short = {k: v for k, v in links.items() if "/#/metric?" not in v}  # terminal: short URLs
    return terminal_summary(finding.answer, list(finding.evidence), table, short,
                            list(finding.notes))
