"""Ports follow one setting each: the Makefile's PORT= reaches the MLflow UI and the Prefect
server, the Prefect server's UI calls the API it serves, and ``lrpipe schedule`` finds or starts
the server PREFECT_API_URL names. No server is started here (tests/test_browser.py does)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from flows import serve, server
from lrpipe.engine.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def make_n(*args: str, env: dict | None = None) -> str:
    """The commands ``make -n`` would run (nothing runs), with a clean port environment."""
    import os

    clean = {k: v for k, v in os.environ.items()
             if k not in ("PORT", "LRPIPE_UI_PORT", "PREFECT_API_URL", "MAKEFLAGS")}
    done = subprocess.run(["make", "-n", "-o", ".venv/.installed", "-o", "setup", *args],
                          cwd=ROOT, env={**clean, **(env or {})}, capture_output=True,
                          text=True, timeout=60, check=True)
    return done.stdout


@pytest.mark.parametrize(("args", "env", "port", "warned"), [
    ((), {}, 5000, False), (("PORT=5077",), {}, 5077, True),
    ((), {"LRPIPE_UI_PORT": "5078"}, 5078, False),
    (("PORT=5078",), {"LRPIPE_UI_PORT": "5078"}, 5078, False),
    (("PORT=5079",), {"LRPIPE_UI_PORT": "5078"}, 5079, True)])
def test_make_ui_serves_and_prints_the_chosen_port(args, env, port, warned):
    out = make_n("ui", *args, env=env)
    assert f"--port {port} " in out and f"http://127.0.0.1:{port}/#/experiments" in out
    # a port that the reports do not link to is said, with the variable that fixes it
    assert (f"export LRPIPE_UI_PORT={port}" in out) == warned


def test_make_server_and_schedule_take_port():
    assert "flows.server start --port 4277" in make_n("server", "PORT=4277")
    assert "flows.server stop --port 4277" in make_n("server-stop", "PORT=4277")
    assert "--port" not in make_n("server")
    assert "PREFECT_API_URL=http://127.0.0.1:4277/api" in make_n("schedule", "PORT=4277")


def test_the_server_ui_calls_the_api_it_serves():
    env = server.server_env("127.0.0.1", 4277)
    assert env == {"PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": "4277",
                   "PREFECT_API_URL": "http://127.0.0.1:4277/api",
                   "PREFECT_UI_API_URL": "http://127.0.0.1:4277/api"}
    wide = server.server_env("0.0.0.0", 4277)["PREFECT_UI_API_URL"]
    assert wide.endswith(":4277/api") and "0.0.0.0" not in wide  # a browser needs a real name


@pytest.mark.parametrize(("env", "port"), [({}, 4200), ({"PREFECT_SERVER_API_PORT": "4277"}, 4277)])
def test_default_port(env, port):
    assert server.default_port(env) == port


@pytest.mark.parametrize("bad", ["0", "70000", "x"])
def test_a_bad_server_port_is_named(bad):
    with pytest.raises(ConfigError, match=r"^PREFECT_SERVER_API_PORT: got "):
        server.default_port({"PREFECT_SERVER_API_PORT": bad})


@pytest.mark.parametrize(("url", "port"), [
    ("http://127.0.0.1:4277/api", 4277), ("http://localhost:4300/api/", 4300),
    ("http://10.0.0.5:4200/api", None), ("https://127.0.0.1:4277/api", None),
    ("http://127.0.0.1:4277/other", None)])
def test_local_port_only_for_an_api_this_machine_can_start(url, port):
    assert server.local_port(url) == port


def test_schedule_starts_a_silent_local_api_on_its_port(monkeypatch):
    started = []
    monkeypatch.setattr(server, "healthy", lambda url, timeout=2.0: False)
    monkeypatch.setattr(server, "start", lambda port=None, **kw: started.append(port) or
                        server.api_url(port=port or 4200))
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4277/api")
    assert serve.api_for_schedules() == "http://127.0.0.1:4277/api" and started == [4277]
    monkeypatch.delenv("PREFECT_API_URL")
    assert serve.api_for_schedules() == "http://127.0.0.1:4200/api" and started[-1] is None
    monkeypatch.setenv("PREFECT_API_URL", "http://10.0.0.5:4200/api")
    with pytest.raises(ConfigError, match=r"^PREFECT_API_URL: http://10.0.0.5:4200/api does "):
        serve.api_for_schedules()


def test_schedule_port_starts_the_local_server_on_it(monkeypatch):
    """``lrpipe schedule --port N`` (as ``make server PORT=N``): the local server on N, whatever
    PREFECT_SERVER_API_PORT says; a PREFECT_API_URL of the same server agrees with it."""
    started = []
    monkeypatch.setattr(server, "start", lambda port=None, **kw: started.append(port) or
                        server.api_url(port=port or 4200))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_SERVER_API_PORT", "4200")
    assert serve.api_for_schedules(4277) == "http://127.0.0.1:4277/api" and started == [4277]
    monkeypatch.setenv("PREFECT_API_URL", "http://localhost:4277/api")
    assert serve.api_for_schedules(4277) == "http://127.0.0.1:4277/api" and started[-1] == 4277


def test_a_schedule_port_that_disagrees_with_prefect_api_url_is_named(monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    with pytest.raises(ConfigError, match=r"^port: got 4277, but PREFECT_API_URL names "
                                          r"http://127.0.0.1:4200/api; allowed: one of them \("
                                          r"unset PREFECT_API_URL, or set it to "
                                          r"http://127.0.0.1:4277/api\)"):
        serve.check_port(4277)
    monkeypatch.delenv("PREFECT_API_URL")
    for bad in (0, 70000, 4.5):
        with pytest.raises(ConfigError, match=r"^port: got "):
            serve.check_port(bad)
    assert serve.check_port(None) is None and serve.check_port(4277) == 4277


def test_schedule_check_carries_the_port_to_the_server_it_serves_on(monkeypatch):
    """The checked settings hand the port to ``serve.run``, which serves on that server (whose
    UI calls the same API: test_the_server_ui_calls_the_api_it_serves); the port is not a
    parameter of the served flow."""
    import inspect

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    kwargs, _ = serve.check(interval=60, flow="sweep", lrs=[0.1], epochs=1, port=4277,
                            overrides={"data.dataset": "digits", "data.val_size": 300})
    assert kwargs["port"] == 4277 and "port" not in kwargs["params"]
    assert set(kwargs) <= set(inspect.signature(serve.run).parameters)
    served = []
    monkeypatch.setattr(serve, "serve", lambda *args: served.append(args[-1]))
    monkeypatch.setattr(server, "start", lambda port=None, **kw: server.api_url(port=port))
    serve.run(**kwargs)
    assert served == ["http://127.0.0.1:4277/api"]


def test_schedule_takes_port_on_the_command_line(capsys):
    """`lrpipe schedule --port` is declared (flows.commands) and checked before anything starts:
    a port out of range exits 2 with one line naming the field."""
    from flows.cli import main

    assert main(["schedule", "--port", "70000"]) == 2
    err = capsys.readouterr().err
    assert "port" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["schedule", "--help"])
    assert "--port" in capsys.readouterr().out
