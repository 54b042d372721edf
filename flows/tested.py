"""A recommended recipe's test figure (issue 27): its runs train without the test split and
their models are scored once on it, after training; the figure is reported beside the choice,
never read by it.

Such a run is a member marked ``test`` of ``flows.children.train_children``: one child run,
trained alone on ``lrpipe.experiments.final.without_test`` of its data (so nothing it does can
read a test image), then ``score_once`` on the test split, logged as test_loss /
test_accuracy / test_error at step = its last epoch. A FINISHED child with the same config (a
resumed flow) is reused with the test figures it logged; its progress line is
``flows.common.describe_result``'s. Here: ``log_test``, the ``test_summary`` on the flow's
parent run. The decay comparison (the best schedule's confirmation runs), the optimizers'
comparison (the winner retrained on fresh seeds) and the transfer flow (its best strategy's
fine-tunings) use it.
"""

from __future__ import annotations

import pandas as pd

from lrpipe import tracking
from lrpipe.experiments.final import test_line, test_parent_metrics, test_summary


def log_test(parent_run_id: str, scored: list[dict], recipe: str, seeds, test_set: str,
             trained: str = "trained without the test split") -> dict:
    """A recommended recipe's test figure on the flow's parent: ``test_summary`` of its
    ``scored`` runs (one result dict each, with test_loss/test_accuracy), worded by
    ``test_line``, logged as metrics ``test_parent_metrics`` (step 0), tags ``test_recipe``
    and ``test_seeds``, and ``test_score.txt``. Returns {"test": summary, "test_line": line}."""
    summary = test_summary(pd.DataFrame(scored), recipe, seeds)
    line = test_line(summary, test_set, trained)
    tracking.log_metrics(parent_run_id, test_parent_metrics(summary), step=0)
    tracking.set_tags(parent_run_id, {"test_recipe": summary["recipe"],
                                      "test_seeds": ",".join(map(str, summary["seeds"]))})
    tracking.log_text(parent_run_id, line + "\n", "test_score.txt")
    return {"test": summary, "test_line": line}
