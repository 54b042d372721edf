"""Issue 26 item 2, fixed start-up costs: ``lrpipe --help`` and a flag the parser refuses
load neither Prefect nor MLflow, and this process's temporary Prefect API starts from its
command line (Prefect's server code stays out of the command's process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request

import pytest

from flows import api_server

HEAVY = ("prefect", "mlflow")

CASES = {  # argv -> exit status; all run in one fresh process (each would cost seconds)
    ("--help",): 0, ("sweep", "--help"): 0, ("search", "--help"): 0,
    ("sweep", "--lrs", "abc"): 2, ("sweep", "--set", "optim.lr"): 2, ("nonsense",): 2,
}

PROBE = """
import json, sys
from flows.cli import main
codes = []
for argv in json.loads(sys.argv[1]):
    try:
        codes.append(main(argv))
    except SystemExit as exc:
        codes.append(exc.code)
print(json.dumps({"codes": codes, "loaded": sorted(m for m in sys.modules
                                                   if m.split(".")[0] in HEAVY)}))
"""


def test_help_and_refused_flags_load_no_prefect_or_mlflow():
    code = PROBE.replace("HEAVY", repr(set(HEAVY)))
    out = subprocess.run([sys.executable, "-c", code, json.dumps([list(a) for a in CASES])],
                         capture_output=True, text=True, timeout=300)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {
        "codes": list(CASES.values()), "loaded": []}


def test_server_command_is_prefects_without_importing_its_server():
    before = set(sys.modules)
    command = api_server.server_command(8123)
    assert command[:3] == [sys.executable, "-m", "uvicorn"]
    assert "prefect.server.api.server:create_app" in command
    assert command[command.index("--port") + 1] == "8123"
    assert "prefect.server.api.server" not in set(sys.modules) - before


def test_free_port_is_free():
    import socket

    port = api_server.free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))  # would raise if something held it


def test_a_server_that_exits_is_an_error_naming_what_to_do():
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(7)"])
    proc.wait()
    with pytest.raises(RuntimeError, match="status 7.*PREFECT_API_URL"):
        api_server.TemporaryAPI(api_server.free_port(), proc).wait(5)


def test_a_server_that_never_answers_times_out():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with pytest.raises(RuntimeError, match="did not answer within 1 s"):
            api_server.TemporaryAPI(api_server.free_port(), proc).wait(1)
    finally:
        api_server.TemporaryAPI(0, proc).stop()
    assert proc.poll() is not None


def test_the_temporary_api_answers_and_stops(monkeypatch, tmp_path):
    monkeypatch.setattr(api_server, "_STARTED", [])
    monkeypatch.setattr(api_server.atexit, "register", lambda fn: None)
    api = api_server.start()
    assert api_server.start() is api  # one a process
    try:
        url = api.wait(120)
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            assert response.status == 200
    finally:
        api.stop()
    assert api.process.poll() is not None


FLOWS_PROBE = """
import json, sys
import flows.pipeline, flows.batch_size, flows.dropout, flows.losses, flows.schedule_preview
print(json.dumps(sorted(m for m in ("matplotlib", "seaborn", "scipy.stats") if m in sys.modules)))
"""


def test_flow_modules_load_no_drawing_library_before_training():
    """The drawing libraries (matplotlib, seaborn and scipy.stats under it: about 0.9 s) load
    when a figure is drawn, after training, not on the way to the first step. The optimizer
    flows still load them early (lrpipe.experiments.optimizers draws)."""
    out = subprocess.run([sys.executable, "-c", FLOWS_PROBE], capture_output=True, text=True,
                         timeout=300)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


EARLY_PROBE = """
import json, sys
from flows import api_server
seen = []
def start():
    seen.append("prefect" in sys.modules)
api_server.start = start
from flows.cli import main
code = main(["sweep", "--lrs", "0.1", "--set", "optim.name=bogus"])  # refused by its check
print(json.dumps({"code": code, "prefect_loaded_at_start": seen}))
"""


def test_the_temporary_api_starts_before_prefect_loads(tmp_path):
    """A flow command starts its temporary API as soon as its flags parse, before Prefect is
    imported (about a second sooner); a check that then fails stops it at exit."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path}/mlflow.db"
    out = subprocess.run([sys.executable, "-c", EARLY_PROBE], capture_output=True, text=True,
                         timeout=300, env=env)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {
        "code": 2, "prefect_loaded_at_start": [False]}


def test_a_configured_api_stops_the_early_one(monkeypatch):
    stopped = []
    fake = type("Fake", (), {"stop": lambda self: stopped.append(True)})()
    monkeypatch.setattr(api_server, "_STARTED", [fake])
    api_server.stop_unused()
    assert stopped == [True] and api_server._STARTED == []
