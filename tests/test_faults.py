"""Faults and bad input through the ``lrpipe`` CLI, table-driven (issue 25): every case ends
in one line on stderr naming the field or the service, the documented exit status (2 bad
input, 3 an unreachable or broken service, lrpipe.faults.ExitCode), no traceback, and the
MLflow store unchanged (no new run, none RUNNING). Most cases run in-process; a few real
faults (a dead server, no scheduler, a corrupted store, concurrent starts) in subprocesses."""

from __future__ import annotations

import os
import resource
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest
from test_bad_input import CLI_BASE, FlowMustNotStart, run_count

from flows import cli
from lrpipe import faults, tracking

ROOT = Path(__file__).resolve().parent.parent
BAD, SERVICE = faults.ExitCode.BAD_INPUT, faults.ExitCode.SERVICE


def free_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def running_count(uri: str) -> int:
    c = tracking.client(uri)
    exps = [e.experiment_id for e in c.search_experiments(view_type=3)]
    runs = c.search_runs(exps, run_view_type=3, max_results=50000) if exps else []
    return sum(r.info.status == "RUNNING" for r in runs)


@pytest.fixture
def guarded(mlflow_store, monkeypatch):
    """No flow may start; the store must be left unchanged."""
    import flows.lr_sweep

    monkeypatch.setattr(flows.lr_sweep, "lr_sweep", FlowMustNotStart(flows.lr_sweep.lr_sweep))
    # the session store holds earlier tests' runs (some deliberately left RUNNING, as a
    # killed writer leaves them): this case must add none and leave none RUNNING
    before, running = run_count(mlflow_store), running_count(mlflow_store)
    yield mlflow_store
    assert run_count(mlflow_store) == before and running_count(mlflow_store) == running


# Files a case may name as {name}: written into the test's folder first.
FILES = {
    "garbage.yaml": bytes(range(128, 256)) * 3,
    "nul.yaml": b"lrs: [0.1]\0\0",
    "malformed.yaml": b"lrs: [0.1\nepochs: 1\n",
    "tabs.yaml": b"lrs:\n\t- 0.1\n",
    "list.yaml": b"- 0.1\n- 1\n",
    "scalar.yaml": b"0.1\n",
    "unknown-key.yaml": b"learning_rate: 0.1\n",
    "overrides-list.yaml": b"overrides: [1, 2]\n",
    "long-experiment.yaml": ("experiment: " + "\u00e9" * 600 + "\n").encode(),
    "empty-experiment.yaml": b"experiment: ''\n",
    "number-experiment.yaml": b"experiment: [1]\n",
    "bad-lr-in-yaml.yaml": b"lrs: [1e-2, -1e-2]\n",
    "mlflow.db": b"SQLite format 3\0" + b"\x13" * 8000,
    "not-a-db.db": b"this is not a database at all\n" * 200,
}

Case = namedtuple("Case", "id argv code message env", defaults=({},))
SET = ["sweep", *CLI_BASE]
CASES = [
    # every file the CLI reads
    Case("config-missing", [*SET, "--config", "{tmp}/none.yaml"], BAD, "--config: got"),
    Case("config-binary", [*SET, "--config", "{tmp}/garbage.yaml"], BAD, "not a text file"),
    Case("config-nul", [*SET, "--config", "{tmp}/nul.yaml"], BAD, "not a text file"),
    Case("config-malformed", [*SET, "--config", "{tmp}/malformed.yaml"], BAD,
         "malformed YAML at line"),
    Case("config-tabs", [*SET, "--config", "{tmp}/tabs.yaml"], BAD, "malformed YAML at line"),
    Case("config-list", [*SET, "--config", "{tmp}/list.yaml"], BAD, "got a list; allowed"),
    Case("config-scalar", [*SET, "--config", "{tmp}/scalar.yaml"], BAD, "got a float; allowed"),
    Case("config-unknown-key", [*SET, "--config", "{tmp}/unknown-key.yaml"], BAD,
         "learning_rate: not a setting of `lrpipe sweep`"),
    Case("config-overrides-list", [*SET, "--config", "{tmp}/overrides-list.yaml"], BAD,
         "overrides: got a list"),
    Case("config-a-folder", [*SET, "--config", "{tmp}"], BAD, "--config: got"),
    Case("experiment-600-chars", [*SET, "--config", "{tmp}/long-experiment.yaml"], BAD,
         "experiment: got"),
    Case("experiment-empty", [*SET, "--config", "{tmp}/empty-experiment.yaml"], BAD,
         "experiment: got ''"),
    Case("experiment-list", [*SET, "--config", "{tmp}/number-experiment.yaml"], BAD,
         "experiment: got [1]"),
    Case("yaml-sci-negative", ["sweep", *CLI_BASE[2:], "--config", "{tmp}/bad-lr-in-yaml.yaml"],
         BAD, "lrs: got -0.01"),
    # every flag
    Case("set-no-equals", [*SET, "--set", "optim.lr"], BAD, "--set: got 'optim.lr'"),
    Case("set-empty-key", [*SET, "--set", "=3"], BAD, "--set: got '=3'"),
    Case("set-malformed-value", [*SET, "--set", "model.hidden=[32"], BAD,
         "--set model.hidden: malformed YAML"),
    Case("set-unknown-field", [*SET, "--set", "optim.speed=1"], BAD, "optim.speed"),
    Case("set-unknown-section", [*SET, "--set", "trainer.lr=1"], BAD, "trainer"),
    Case("epochs-word", [*SET, "--epochs", "many"], BAD, "--epochs: invalid"),
    Case("workers-negative", [*SET, "--workers=-2"], BAD, "workers: got -2"),
    Case("workers-word", [*SET, "--workers", "all"], BAD, "--workers: invalid"),
    Case("unknown-flag", [*SET, "--learning-rate", "0.1"], BAD, "unrecognized arguments"),
    Case("unknown-command", ["train"], BAD, "invalid choice: 'train'"),
    Case("runner-no-port", [*SET, "--runner", "tcp://127.0.0.1"], BAD,
         "runner: got 'tcp://127.0.0.1'; allowed: tcp://host:port"),
    Case("model-plugin-missing", [*SET, "--model", "no_such_pkg_h25:build"], BAD, "--model"),
    # every config field's bad values (sci notation read as numbers)
    Case("lr-sci-zero", [*SET, "--set", "optim.lr=0e0"], BAD, "optim.lr: got 0.0"),
    Case("momentum-one", [*SET, "--set", "optim.momentum=1"], BAD, "optim.momentum: got 1"),
    Case("weight-decay-negative", [*SET, "--set", "optim.weight_decay=-1e-4"], BAD,
         "optim.weight_decay: got -0.0001"),
    Case("hidden-zero", [*SET, "--set", "model.hidden=[0]"], BAD, "model.hidden: got 0"),
    Case("dropout-one", [*SET, "--set", "model.dropout=1.5"], BAD, "model.dropout: got 1.5"),
    Case("val-size-zero", [*SET, "--set", "data.val_size=0"], BAD, "data.val_size: got 0"),
    Case("subset-zero", [*SET, "--set", "data.subset=0"], BAD, "data.subset: got 0"),
    Case("classes-one", [*SET, "--set", "data.classes=[3]"], BAD, "data.classes"),
    Case("split-seed-negative", [*SET, "--set", "data.split_seed=-1"], BAD, "data.split_seed"),
    Case("seed-float", [*SET, "--set", "seed=1.5"], BAD, "seed: got 1.5"),
    Case("batch-size-zero", [*SET, "--set", "batch_size=0"], BAD, "batch_size: got 0"),
    Case("loss-unknown", [*SET, "--set", "loss=hinge"], BAD, "loss: got 'hinge'"),
    Case("gamma-zero", [*SET, "--set", "schedule.gamma=0"], BAD, "schedule.gamma: got 0"),
    Case("warmup-negative", [*SET, "--set", "schedule.warmup_epochs=-1"], BAD,
         "schedule.warmup_epochs"),
    Case("milestones-down", [*SET, "--set", "schedule.milestones=[3, 2]"], BAD,
         "schedule.milestones"),
    Case("diverge-factor-one", [*SET, "--set", "diverge_factor=1"], BAD, "diverge_factor"),
    Case("batching-unknown", [*SET, "--set", "batching=lots"], BAD, "batching: got 'lots'"),
    Case("search-default-subset-names-setting",
         ["search", "--set", "data.dataset=digits", "--set", "data.val_size=300"], BAD,
         "data.subset: got 5000; allowed: <= 1200 (training examples left after the validation "
         "split); it is the default for larger datasets: set a smaller one (--set "
         "data.subset=N or --subset N)"),
    # every service and store it talks to
    Case("tracking-server-down", SET, SERVICE, "tracking server: http://127.0.0.1:{port}",
         {"MLFLOW_TRACKING_URI": "http://127.0.0.1:{port}"}),
    Case("scheduler-down", [*SET, "--runner", "tcp://127.0.0.1:{port}"], SERVICE,
         "runner: tcp://127.0.0.1:{port} does not answer"),
    Case("store-corrupted", SET, SERVICE, "tracking store: {tmp}/mlflow.db",
         {"MLFLOW_TRACKING_URI": "sqlite:///{tmp}/mlflow.db"}),
    Case("store-not-a-database", SET, SERVICE, "tracking store: {tmp}/not-a-db.db",
         {"MLFLOW_TRACKING_URI": "sqlite:///{tmp}/not-a-db.db"}),
    Case("batch-size-default-subset-names-setting", ["batch-size", "--set", "data.dataset=digits"],
         BAD, "data.subset: got 10000; allowed: <= 1200 (training examples left after the "
         "validation split); it is the default for larger datasets: set a smaller one "
         "(--set data.subset=N)"),
    Case("store-uri-relative", SET, BAD, "tracking_uri: got 'sqlite:/x.db'",
         {"MLFLOW_TRACKING_URI": "sqlite:/x.db"}),
]


def fill(text: str, tmp: Path, port: int) -> str:
    return text.replace("{tmp}", str(tmp)).replace("{port}", str(port))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cli_one_line_and_exit_code(guarded, tmp_path, monkeypatch, capsys, case):
    for name, data in FILES.items():
        (tmp_path / name).write_bytes(data)
    port = free_port()
    for key, value in case.env.items():
        monkeypatch.setenv(key, fill(value, tmp_path, port))
    before = {n: (tmp_path / n).read_bytes() for n in FILES}
    try:
        code = cli.main([fill(a, tmp_path, port) for a in case.argv])
    except SystemExit as exc:  # argparse's refusals
        code = exc.code
    err = capsys.readouterr().err
    assert code == case.code, err
    last = err.strip().splitlines()[-1]  # argparse's refusals print their usage line first
    assert fill(case.message, tmp_path, port) in last
    assert "Traceback" not in err and (code == BAD or len(err.strip().splitlines()) == 1), err
    assert {n: (tmp_path / n).read_bytes() for n in FILES} == before  # no store file touched


def test_prefect_api_down(guarded, monkeypatch, capsys):
    """PREFECT_API_URL names a server that is not there (Prefect's settings are read once
    per process, so the setting is patched where the harness reads it)."""
    import types

    import prefect.settings

    url = f"http://127.0.0.1:{free_port()}/api"
    fake = types.SimpleNamespace(api=types.SimpleNamespace(url=url))
    monkeypatch.setattr(prefect.settings, "get_current_settings", lambda: fake)
    assert cli.main(SET) == SERVICE
    err = capsys.readouterr().err
    assert err.startswith(f"lrpipe sweep: Prefect API: {url}/health does not answer")
    assert "unset PREFECT_API_URL" in err and len(err.strip().splitlines()) == 1


def test_sci_notation_in_set_and_yaml(tmp_path):
    assert cli.parse_set("optim.lr=1e-3") == ("optim.lr", 0.001)
    assert cli.parse_set("lrs=[1E-2, 3e+1]") == ("lrs", [0.01, 30.0])
    (tmp_path / "c.yaml").write_text("lrs: [1e-2]\nepochs: 2\n")
    assert cli.load_settings(str(tmp_path / "c.yaml")) == {"lrs": [0.01], "epochs": 2}


def test_version_and_debug(guarded, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("lrpipe 0.")
    (tmp_path / "bad.yaml").write_text("lrs: [0.1\n")
    from lrpipe.engine.config import ConfigError

    with pytest.raises(ConfigError, match="malformed YAML"):  # --debug: the real exception
        cli.main([*SET, "--debug", "--config", str(tmp_path / "bad.yaml")])


def test_disk_full_and_file_size_limit(tmp_path, monkeypatch):
    """Preflight refuses a disk without room for the planned runs, and a ``ulimit -f`` too
    small for the store to grow (the issue's disk-full case: a 500 from Prefect mid-run)."""
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(faults.shutil, "disk_usage", lambda p: usage._replace(free=10 * 2**20))
    with pytest.raises(faults.ServiceError, match=r"artifacts: .* 10 MiB free; the planned 3"):
        faults.check_disk(tmp_path, runs=3)
    monkeypatch.undo()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (300 * 1024, hard))
    try:
        with pytest.raises(faults.ServiceError, match=r"ulimit -f\) is 300 KiB"):
            faults.check_disk(tmp_path, runs=1)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    faults.check_disk(tmp_path, runs=1)  # room and no limit: passes


def test_store_of_an_older_schema_is_refused(mlflow_store, tmp_path):
    """MLflow refuses a store of an older schema; the first use under create_store's lock
    turns that into one line saying how to upgrade it."""
    db = tmp_path / "old.db"
    with sqlite3.connect(faults.sqlite_path(mlflow_store)) as src, sqlite3.connect(db) as dst:
        src.backup(dst)
    with sqlite3.connect(db) as c:
        c.execute("UPDATE alembic_version SET version_num = 'a8c4a736bde6'")
    uri = f"sqlite:///{db}"
    faults.check_store(uri)  # the file itself is healthy
    with pytest.raises(faults.ServiceError,
                       match=r"out-of-date database schema .*; upgrade it \(mlflow db upgrade"):
        faults.create_store(uri, lambda: tracking.client(uri).search_experiments())
    faults.create_store(mlflow_store, lambda: tracking.client(mlflow_store).search_experiments())


def lrpipe_cli(*args: str, env: dict | None = None, timeout: float = 60):
    full = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "lrpipe", *args], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=timeout)


def test_real_faults_in_a_subprocess(tmp_path):
    """The issue's hangs and tracebacks, as the user meets them: a dead MLflow server (was
    371 s of retries), no Dask scheduler (a 150-line traceback and an empty FAILED parent),
    each exits 3 in seconds, one line."""
    store = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    port = free_port()
    cases = [
        ({"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}, [], "tracking server"),
        ({"MLFLOW_TRACKING_URI": store}, ["--runner", f"tcp://127.0.0.1:{port}"], "runner"),
    ]
    for env, extra, name in cases:
        started = time.monotonic()
        done = lrpipe_cli("sweep", *CLI_BASE, *extra, env=env)
        assert done.returncode == 3, done.stderr
        assert time.monotonic() - started < 30
        assert done.stderr.strip().startswith(f"lrpipe sweep: {name}")
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert run_count(store) == 0  # no parent left behind by the refused scheduler


def test_torn_page_in_a_real_store(guarded, tmp_path, monkeypatch, capsys):
    """A real store with a page overwritten (the issue's corrupted mlflow.db: it trained
    first, then failed with "malformed" tracebacks): refused before any work, unchanged."""
    db = tmp_path / "mlflow.db"
    with sqlite3.connect(faults.sqlite_path(guarded)) as src, sqlite3.connect(db) as dst:
        src.backup(dst)
    with sqlite3.connect(db) as c:
        c.execute("PRAGMA journal_mode=DELETE")
    data = bytearray(db.read_bytes())
    data[4096:8192] = b"\x5a" * 4096  # a torn page in the middle of the schema
    db.write_bytes(bytes(data))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    assert cli.main(SET) == SERVICE
    err = capsys.readouterr().err
    assert err.startswith(f"lrpipe sweep: tracking store: {db} is ") and "mv " in err
    assert "Traceback" not in err and db.read_bytes() == bytes(data)


CREATE = """
import sys
from lrpipe import faults, tracking
uri = sys.argv[1]
faults.create_store(uri, lambda: tracking.client(uri).search_experiments(max_results=1))
print(tracking.experiment_id("together", uri))
"""


def test_concurrent_starts_on_a_new_store(tmp_path):
    """Three commands starting together on a new store: MLflow's own first-use migration
    races (`table _alembic_tmp_experiments already exists`); faults.create_store's lock does not."""
    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"
    procs = [subprocess.Popen([sys.executable, "-c", CREATE, uri], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 3, [err[-300:] for _, err in outs]
    assert len({out.strip() for out, _ in outs}) == 1  # one experiment, the same id for all
    faults.check_store(uri)


def test_store_failing_mid_sweep_keeps_what_finished_and_resumes(
        prefect_harness, mlflow_store, monkeypatch, capsys, tmp_path):
    """The store refuses writes after the first child (a full disk): the sweep stops with
    exit 1 and one line, the finished child intact, the parent FAILED and nothing RUNNING;
    once the fault is gone the same command resumes into the same parent."""
    import uuid

    experiment = f"faults-{uuid.uuid4().hex[:8]}"
    (tmp_path / "c.yaml").write_text(f"experiment: {experiment}\n")
    argv = ["sweep", "--lrs", "0.01,0.1", *CLI_BASE[2:], "--config", str(tmp_path / "c.yaml")]
    c = tracking.client(mlflow_store)
    real, calls = c.create_run, []

    def full_disk(*args, **kwargs):  # the parent, the first child, then the disk is full
        calls.append(1)
        if len(calls) > 2:
            raise sqlite3.OperationalError("database or disk is full")
        return real(*args, **kwargs)

    monkeypatch.setattr(c, "create_run", full_disk)
    assert cli.main(argv) == faults.ExitCode.WORK_FAILED
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]  # Prefect's log lines (each one line) may come first
    assert last.startswith("lrpipe sweep: failed during the work: OperationalError: database "
                           "or disk is full") and "run the same command again" in last
    assert "Traceback" not in err and all(len(line) < 400 for line in err.splitlines())
    monkeypatch.setattr(c, "create_run", real)
    exp = c.get_experiment_by_name(experiment).experiment_id

    def statuses():
        runs = c.search_runs([exp], run_view_type=3)
        parents = [r for r in runs if tracking.PARENT_TAG not in r.data.tags]
        kids = sorted(r.info.status for r in runs if tracking.PARENT_TAG in r.data.tags)
        return [(p.info.run_id, p.info.status) for p in parents], kids

    parents, kids = statuses()
    assert [s for _, s in parents] == ["FAILED"] and kids == ["FINISHED"]
    assert cli.main(argv) == 0
    assert "resuming" in capsys.readouterr().out
    again, kids = statuses()
    assert again == [(parents[0][0], "FINISHED")] and kids == ["FINISHED", "FINISHED"]
