"""`taskomatic serve` and `taskomatic tokens` as a user runs them: HTTPS with a self-signed
certificate made here with the openssl command, a task run by the embedded dispatcher, SIGTERM."""

from __future__ import annotations

import http.client
import json
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from acceptance.cli import Cli


def _certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, made by the openssl command."""
    openssl = shutil.which("openssl")
    assert openssl, "the openssl command is needed to make the test certificate"
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def _call(
    url: str, token: str | None, context: ssl.SSLContext, body: Any = None
) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    if data:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30, context=context) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_serve_over_https_runs_tasks_and_stops_on_sigterm(cli: Cli, tmp_path: Path) -> None:
    cert, key = _certificate(tmp_path)
    operator = cli.ok("tokens", "create", "--name", "web", "--role", "operator").stdout.strip()
    viewer = cli.ok("tokens", "create", "--name", "eyes", "--role", "viewer").stdout.strip()
    assert operator.startswith("tkm_") and operator != viewer
    listed = cli.json("tokens", "list")
    assert [t["name"] for t in listed] == ["web", "eyes"]
    assert operator not in json.dumps(listed)
    context = ssl.create_default_context(cafile=str(cert))

    with cli.background(
        "serve", "--bind", "127.0.0.1:0", "--tls-cert", str(cert), "--tls-key", str(key),
        "--workers", "2", "--no-inventory",
    ) as server:  # fmt: skip
        line = server.first_line()
        assert line.startswith("serving https://127.0.0.1:"), line
        base = line.split()[1]
        assert _call(f"{base}/v1/health", None, context) == (200, {"status": "ok"})
        status, task = _call(f"{base}/v1/tasks", operator, context, {"action": "noop"})
        assert status == 200, task
        status, done = _call(f"{base}/v1/tasks/{task['id']}/wait?timeout=20", viewer, context)
        assert (status, done["task"]["state"]) == (200, "complete")
        assert _call(f"{base}/v1/tasks", viewer, context, {"action": "noop"})[0] == 403
        # Plain HTTP to the HTTPS port gets no answer.
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(base.replace("https", "http") + "/v1/health", timeout=5)

        # The dashboard over HTTPS: signing in sets a Secure session cookie that opens it.
        host, port = base.removeprefix("https://").split(":")
        conn = http.client.HTTPSConnection(host, int(port), context=context, timeout=30)
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        conn.request("POST", "/ui/login", f"token={viewer}", form)
        signed_in = conn.getresponse()
        signed_in.read()
        cookie = signed_in.headers["Set-Cookie"]
        assert signed_in.status == 303 and "Secure" in cookie.split("; "), cookie
        conn.request("GET", "/ui/", headers={"Cookie": cookie.split(";")[0]})
        page = conn.getresponse()
        assert page.status == 200 and b'id="count-new"' in page.read()
        conn.close()

        cli.ok("tokens", "revoke", "eyes")
        assert _call(f"{base}/v1/tasks", viewer, context)[0] == 401
        result = server.stop()
    assert result.code == 0, str(result)
    assert operator not in result.stdout + result.stderr and viewer not in result.stderr
    assert "GET /v1/tasks 401" in result.stderr
    assert [t["name"] for t in cli.json("tokens", "list", "--all")] == ["web", "eyes"]


def test_serve_refuses_plain_http_beyond_loopback_and_bad_arguments(cli: Cli) -> None:
    cli.run("serve", "--bind", "0.0.0.0:0").error(2, "not a loopback address")
    cli.run("serve", "--bind", "nowhere").error(2, "is not HOST:PORT")
    cli.run("serve", "--tls-cert", "c.pem").error(2, "give both --tls-cert and --tls-key")
    cli.run("serve", "--tls-cert", "c.pem", "--tls-key", "k.pem").error(
        2, "cannot load the TLS certificate"
    )


def test_tokens_commands_fail_in_one_line(cli: Cli) -> None:
    cli.ok("tokens", "create", "--name", "a", "--role", "admin")
    cli.run("tokens", "create", "--name", "a", "--role", "viewer").error(4, "a live token")
    cli.run("tokens", "create", "--name", "b", "--role", "root").error(2, "root")
    cli.run("tokens", "revoke", "nobody").error(3, "no live token named 'nobody'")
    assert cli.ok("tokens", "revoke", "a").stdout == "revoked a\n"
    cli.ok("tokens", "create", "--name", "a", "--role", "viewer")  # the name is free again


def test_serve_without_a_dispatcher_only_serves(sqlite_cli: Cli) -> None:
    token = sqlite_cli.ok("tokens", "create", "--name", "a", "--role", "admin").stdout.strip()
    plain = ssl.create_default_context()
    with sqlite_cli.background("serve", "--bind", "127.0.0.1:0", "--no-dispatcher") as server:
        line = server.first_line()
        assert line.startswith("serving http://127.0.0.1:") and "dispatcher" not in line, line
        base = line.split()[1]
        assert _call(f"{base}/v1/dispatchers", token, plain) == (200, {"dispatchers": []})
        status, task = _call(f"{base}/v1/tasks", token, plain, {"action": "noop"})
        assert status == 200
        status, waited = _call(f"{base}/v1/tasks/{task['id']}/wait?timeout=0.5", token, plain)
        assert (status, waited["timed_out"], waited["task"]["state"]) == (200, True, "new")
        result = server.stop()
    assert result.code == 0, str(result)


def test_dispatcher_logs_json_lines_naming_the_task(sqlite_cli: Cli) -> None:
    slow = sqlite_cli.submit("sleep", "--param", "seconds=5", "--timeout", "0.2")
    result = sqlite_cli.run("dispatcher", "--until-empty", "--log-format", "json")
    assert result.code == 0, str(result)
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    assert lines and {"time", "level", "logger", "message"} <= set(lines[0])
    [timed_out] = [line for line in lines if "timed out" in line["message"]]
    assert timed_out["task"] == slow and timed_out["level"] == "warning"
    assert any("dispatcher" in line for line in lines)
