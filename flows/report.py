"""Publish a flow's report where its user looks: ``report.md`` on the flow's MLflow parent run
(rendered in the run's Artifacts tab) and, inside a flow run, a Prefect markdown artifact with
the same text (the flow run's Artifacts tab in the Prefect UI).

Usage, at the end of a flow, after the figures are logged::

    markdown = report.sweep_report(summary, tracking.run_url(parent, experiment),
                                   lambda run_id: tracking.run_url(run_id, experiment),
                                   [f"figures/{name}.png" for name in figures])
    publish_report(parent, experiment, markdown, key="lr-sweep")
"""

from __future__ import annotations

import re

from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext

from lrpipe import tracking
from lrpipe.report import MEASURED_ON, build_report

REPORT_PATH = "report.md"


def artifact_key(key: str) -> str:
    """``key`` as a Prefect artifact key ending in ``-report``: lowercase letters, digits and
    dashes only (Prefect refuses anything else). ``"LR sweep_1"`` -> ``"lr-sweep-1-report"``.

    Raises:
        ValueError: ``key`` holds no letter or digit (the message names ``key``).
    """
    slug = re.sub(r"[^a-z0-9]+", "-", str(key).lower()).strip("-")
    if not slug:
        raise ValueError(f"key: got {key!r}; allowed: text with letters or digits, "
                         "e.g. 'lr-sweep'")
    return slug if slug.endswith("-report") or slug == "report" else f"{slug}-report"


def publish_report(parent_run_id: str, experiment: str, markdown: str, key: str,
                   uri: str | None = None) -> dict:
    """Log ``markdown`` as ``report.md`` on the MLflow run ``parent_run_id`` and, when called
    inside a Prefect flow run, as the markdown artifact ``artifact_key(key)`` whose description
    links the MLflow run. Outside a flow run only the MLflow artifact is written.

    Returns ``{"mlflow_path", "key", "prefect_artifact_id"}`` (the id is None outside a flow).
    """
    key = artifact_key(key)
    tracking.log_text(parent_run_id, markdown, REPORT_PATH, uri=uri)
    artifact_id = None
    if FlowRunContext.get() is not None:
        link = tracking.run_url(parent_run_id, experiment, uri=uri)
        artifact_id = create_markdown_artifact(
            markdown, key=key, description=f"Report; the MLflow run: {link}")
    return {"mlflow_path": REPORT_PATH, "key": key,
            "prefect_artifact_id": None if artifact_id is None else str(artifact_id)}


def publish_flow_report(parent_run_id: str, experiment: str, title: str, answer: str,
                        table, evidence=(), notes=(), key: str | None = None,
                        tables=None) -> dict:
    """A flow's report from its answer and table, embedding every figure already logged on
    the parent run (``figures/*.png``) and linking the parent's page; then ``publish_report``.
    It opens with what its numbers are measured on: ``lrpipe.report.MEASURED_ON`` of the
    report's ``key`` (default ``experiment``), which must have one."""
    if (key or experiment) not in MEASURED_ON:
        raise ValueError(f"key: got {key or experiment!r}; allowed: one of {sorted(MEASURED_ON)}"
                         " (lrpipe.report.MEASURED_ON says what each report is measured on)")
    url = tracking.run_url(parent_run_id, experiment)
    listed = tracking.retry_locked(tracking.client().list_artifacts, parent_run_id, "figures")
    figures = [f.path for f in listed if f.path.endswith(".png")]
    markdown = build_report(title, answer, list(evidence), table, figures,
                            {"parent run (figures, tables, child runs)": url}, list(notes),
                            run_url=url, tables=tables,
                            measured_on=MEASURED_ON[key or experiment])
    return publish_report(parent_run_id, experiment, markdown, key or experiment)


def where_to_click(parent_run_id: str, experiment: str, uri: str | None = None) -> str:
    """The lines every flow ends with: its parent run in MLflow and its report."""
    url = tracking.run_url(parent_run_id, experiment, uri=uri)
    return (f"MLflow: {url}  (start the UI with `make ui`)\n"
            f"Report: {url.split('?')[0]}/artifacts/{REPORT_PATH}?workflowType=machine_learning")


def log_confirmation(parent_run_id: str, record: dict, rival, role: str,
                     rival_tag: str | None = None) -> dict:
    """A confirmation (``lrpipe.experiments.confirm.confirm``) on its flow's parent run: the
    table ``confirm.csv`` and the tags ``confirm_verdict`` and ``confirm_rival``. Returns what
    the flow returns of it: rival, seeds, verdict, margin, band, text, line and the chosen
    arm's figure as ``<role>_mean``, ``<role>_lo``, ``<role>_hi``."""
    tracking.log_table(parent_run_id, record["summary"], "confirm.csv")
    tracking.set_tags(parent_run_id, {"confirm_verdict": record["verdict"],
                                      "confirm_rival": rival_tag or str(rival)})
    return {"rival": rival, **{k: record[k] for k in ("seeds", "verdict", "margin", "band",
                                                      "text", "line")},
            **{f"{role}_{k}": record[k] for k in ("mean", "lo", "hi")}}
