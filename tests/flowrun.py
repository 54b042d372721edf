"""Helpers of the flow tests that run one small command in a module fixture."""

from __future__ import annotations

import os


def run_in_store(store: str, command: str, **settings):
    """``lrpipe <command>`` with ``settings``, recording into ``store`` (a module fixture's
    flow run: monkeypatch is function-scoped); the environment is restored after."""
    from flows.commands import COMMANDS

    os.environ["MLFLOW_TRACKING_URI"] = store
    try:
        return COMMANDS[command].run(**settings)
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]


def finished_parent(client, run_id: str) -> tuple:
    """(parent run, its child runs), the parent checked FINISHED."""
    parent = client.get_run(run_id)
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{run_id}'", max_results=1000)
    return parent, children
