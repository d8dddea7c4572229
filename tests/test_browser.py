"""The pages in a real browser: Debian's Chromium driven by Playwright.

The demo host (``wsgi.py``) runs as ``flask run`` on loopback, on PostgreSQL, with a
real RQ worker (``flask cloudmail worker``) sending through the outbox connector at a
rate slow enough to watch. axe-core, from npm (``tests/browser/package.json``), is
injected into each page and must find no serious or critical violation.
"""

from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import REDIS_URL, ROOT, SHARED

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
BROWSER_DIR = ROOT / "tests" / "browser"
AXE = BROWSER_DIR / "node_modules" / "axe-core" / "axe.min.js"
ARTIFACTS = ROOT / "artifacts" / "screenshots"
DOCS = ROOT / "docs" / "screenshots"
PASSWORD = "browser-test-password"
SAMPLE = SHARED / "moodle_users_5k.csv"
# Suspended users have no "account_note" column: their mail fails to render, which
# gives the page real failed recipients to open.
HTML = (
    "<p>Hello {{ firstname }},</p><p>Your account at {{ institution }}.</p>"
    "{% if suspended == '1' %}{{ account_note }}{% endif %}"
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.postgres,
    pytest.mark.redis,
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def axe_source() -> str:
    if not AXE.exists():
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"],
            cwd=BROWSER_DIR,
            check=True,
            capture_output=True,
        )
    return AXE.read_text(encoding="utf-8")


@pytest.fixture
def server(pg_url: str, tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """The demo app on loopback and one RQ worker, sharing PostgreSQL and Redis."""
    from cloudmail.models import Base

    engine = sa.create_engine(pg_url)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    port = _free_port()
    env = {
        **os.environ,
        "SQLALCHEMY_DATABASE_URI": pg_url,
        "CLOUDMAIL_REDIS_URL": REDIS_URL,
        "CLOUDMAIL_QUEUE_NAME": f"cloudmail-browser-{uuid.uuid4().hex[:8]}",
        "CLOUDMAIL_BATCH_SIZE": "100",
        "CLOUDMAIL_SEND_RATE": "300",
        "CLOUDMAIL_OUTBOX_DIR": str(tmp_path / "outbox"),
        "CLOUDMAIL_DEMO_ADMIN_PASSWORD": PASSWORD,
        "SECRET_KEY": uuid.uuid4().hex,
    }
    flask = [sys.executable, "-m", "flask", "--app", "wsgi"]
    logs = tmp_path / "logs"
    logs.mkdir()
    web_log = open(logs / "web.log", "wb")  # noqa: SIM115 (closed below)
    worker_log = open(logs / "worker.log", "wb")  # noqa: SIM115
    procs = [
        subprocess.Popen(
            [*flask, "run", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=web_log,
            stderr=subprocess.STDOUT,
        ),
        subprocess.Popen(
            [*flask, "cloudmail", "worker"],
            cwd=ROOT,
            env=env,
            stdout=worker_log,
            stderr=subprocess.STDOUT,
        ),
    ]
    try:
        _wait_for_port(port)
        yield f"http://127.0.0.1:{port}", {"db": pg_url, "logs": str(logs)}
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        web_log.close()
        worker_log.close()
        for name in ("web.log", "worker.log"):
            sys.stderr.write(f"--- {name} (tail) ---\n")
            sys.stderr.write((logs / name).read_text(errors="replace")[-3000:])
        Base.metadata.drop_all(engine)
        engine.dispose()


def _wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the app did not listen on port {port} within {timeout} s")


def _shoot(page, name: str, docs: bool = False) -> None:  # noqa: ANN001
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if docs:
        DOCS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, DOCS / f"{name}.png")


def _check_axe(page, axe_source: str, seen: dict[str, list]) -> None:  # noqa: ANN001
    if not page.evaluate("() => typeof window.axe !== 'undefined'"):
        page.add_script_tag(content=axe_source)
    result = page.evaluate(
        "() => axe.run(document, {resultTypes: ['violations']})"
        ".then(r => r.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,"
        " nodes: v.nodes.map(n => n.target.join(' ')).slice(0, 5)})))"
    )
    bad = [v for v in result if v["impact"] in ("serious", "critical")]
    seen[page.url] = bad


def _counter(page, name: str) -> int:  # noqa: ANN001
    text = page.locator(f'dd[data-cm-counter="{name}"]').inner_text()
    return int(text.replace(",", ""))


def _accept_next_dialog(page) -> None:  # noqa: ANN001
    page.once("dialog", lambda dialog: dialog.accept())


def test_admin_runs_a_job_in_the_browser(
    server, axe_source: str, tmp_path: Path
) -> None:  # noqa: ANN001
    from playwright.sync_api import expect, sync_playwright

    base, _ = server
    violations: dict[str, list] = {}
    with SAMPLE.open(encoding="utf-8-sig", newline="") as sample:
        expected_rows = (
            sum(1 for row in csv.reader(sample) if any(map(str.strip, row))) - 1
        )

    with sync_playwright() as pw:
        assert Path(CHROMIUM).exists(), (
            f"{CHROMIUM} is missing: install Debian's chromium package "
            "(apt-get install chromium), as .ci/run does."
        )
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(
            viewport={"width": 1280, "height": 900}, accept_downloads=True
        )
        page = context.new_page()
        page.set_default_timeout(20_000)
        errors: list[str] = []
        page.on("pageerror", lambda err: errors.append(str(err)))

        # 1. Denied until logged in; the 403 page links to the demo login.
        response = page.goto(base + "/cloudmail/jobs")
        assert response.status == 403
        page.get_by_role("link", name="Log in").click()
        page.get_by_label("Admin password").fill(PASSWORD)
        page.get_by_role("button", name="Log in").click()
        expect(page.get_by_role("heading", name="Cloud jobs")).to_be_visible()
        _check_axe(page, axe_source, violations)

        # 2. New job from the shared sample: a draft with preview and rejects.
        page.get_by_role("link", name="New job").first.click()
        page.get_by_label("Recipients (CSV file)").set_input_files(str(SAMPLE))
        page.get_by_label("Name").fill("Moodle users (browser test)")
        page.get_by_label("Subject").fill("Hello {{ firstname }}")
        page.get_by_label("HTML body").fill(HTML)
        _check_axe(page, axe_source, violations)
        page.get_by_role("button", name="Create draft").click()
        expect(
            page.get_by_role("heading", name="Review before sending")
        ).to_be_visible()
        job_url = page.url
        job_id = int(job_url.rsplit("/", 1)[1])
        expect(page.locator(".cm-preview")).to_have_count(3)
        expect(page.locator("#h-rejects + table")).to_contain_text("duplicate")
        rejected = _counter(page, "rejected") + _counter(page, "suppressed")
        assert _counter(page, "total") == expected_rows
        assert rejected > 0
        _check_axe(page, axe_source, violations)
        _shoot(page, "job-draft")

        # 3. A test to one address, then start (confirmed in a dialog).
        page.locator("#test-address").fill("tester@example.com")
        page.get_by_role("button", name="Send test").click()
        expect(page.locator(".cm-flash-success")).to_contain_text(
            "Test sent to tester@example.com"
        )
        _accept_next_dialog(page)
        page.get_by_role("button", name="Start sending").click()
        expect(page.locator(".cm-flash-success")).to_contain_text(
            f"Job #{job_id} started."
        )

        # 4. Watch the counters move without a reload.
        page.evaluate("() => { window.__notReloaded = true; }")
        seen = set()
        deadline = time.monotonic() + 60
        while len(seen) < 3 and time.monotonic() < deadline:
            seen.add(_counter(page, "sent") + _counter(page, "failed"))
            page.wait_for_timeout(300)
        assert len(seen) >= 3, f"progress did not move live: {sorted(seen)}"
        assert page.evaluate("() => window.__notReloaded === true")
        expect(page.locator("[data-cm-status]").first).to_have_text("sending")
        _shoot(page, "job-sending")

        # 5. Pause: the page shows it at once; the worker stops after its batch.
        _accept_next_dialog(page)
        page.get_by_role("button", name="Pause").click()
        expect(page.locator("[data-cm-status]").first).to_have_text("paused")
        expect(page.get_by_role("button", name="Resume")).to_be_visible()
        # A batch already with the worker finishes; then the counters hold still.
        held, deadline = -1, time.monotonic() + 30
        while time.monotonic() < deadline:
            page.reload()
            now = _counter(page, "sent") + _counter(page, "failed")
            if now == held:
                break
            held = now
            page.wait_for_timeout(2000)
        page.wait_for_timeout(2000)
        page.reload()
        assert _counter(page, "sent") + _counter(page, "failed") == held
        assert _counter(page, "pending") > 0
        _check_axe(page, axe_source, violations)

        # 6. Resume and wait, on the same page, until the job is done.
        _accept_next_dialog(page)
        page.get_by_role("button", name="Resume").click()
        expect(page.locator("[data-cm-status]").first).to_have_text(
            "done", timeout=120_000
        )
        expect(
            page.get_by_role("button", name="Retry failed recipients")
        ).to_be_visible()
        page.reload()
        failed = _counter(page, "failed")
        assert failed > 0
        assert _counter(page, "sent") + failed + rejected == expected_rows
        expect(page.locator("#cm-chart-table")).to_be_visible()
        _check_axe(page, axe_source, violations)
        _shoot(page, "job-detail", docs=True)

        # 7. Open a failed recipient.
        page.get_by_role("link", name="See the failed recipients").click()
        expect(page.locator("tbody tr")).to_have_count(min(failed, 50))
        _check_axe(page, axe_source, violations)
        page.locator("tbody tr a").first.click()
        expect(page.locator(".cm-details")).to_contain_text("render_error")
        expect(page.locator(".cm-details")).to_contain_text("account_note")
        _check_axe(page, axe_source, violations)
        _shoot(page, "recipient-failed")

        # 8. Download the rejects.
        page.goto(job_url + "/rejects")
        _check_axe(page, axe_source, violations)
        with page.expect_download() as download_info:
            page.get_by_role("link", name="Download rejects (CSV)").click()
        download = download_info.value
        assert download.suggested_filename == f"job-{job_id}-rejects.csv"
        saved = tmp_path / "rejects.csv"
        download.save_as(saved)
        with saved.open(encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
        assert rows[0] == ["line", "email", "name", "status", "reason", "detail"]
        assert len(rows) - 1 == rejected

        # 9. The list, the other pages, and a check of each.
        page.goto(base + "/cloudmail/jobs")
        expect(
            page.locator(f'tr[data-cm-job="{job_id}"] [data-cm-status]')
        ).to_have_text("done")
        _check_axe(page, axe_source, violations)
        _shoot(page, "jobs-list", docs=True)
        for path in ("/cloudmail/settings", "/cloudmail/suppressions"):
            page.goto(base + path)
            _check_axe(page, axe_source, violations)
        # The confirmation page that a browser without JavaScript gets.
        page.goto(job_url)
        page.evaluate(
            "() => document.querySelectorAll('[data-cm-confirm]')"
            ".forEach(f => f.removeAttribute('data-cm-confirm'))"
        )
        page.get_by_role("button", name="Retry failed recipients").click()
        expect(page.get_by_role("link", name="No, go back")).to_be_visible()
        _check_axe(page, axe_source, violations)
        page.get_by_role("link", name="No, go back").click()
        page.set_viewport_size({"width": 390, "height": 844})
        page.goto(job_url)
        _shoot(page, "job-detail-phone")
        assert errors == []

        # 10. Without JavaScript: an action confirmed on its own page.
        plain = browser.new_context(java_script_enabled=False).new_page()
        plain.goto(base + "/login")
        plain.get_by_label("Admin password").fill(PASSWORD)
        plain.get_by_role("button", name="Log in").click()
        plain.goto(base + "/cloudmail/jobs/new")
        plain.get_by_label("Recipients (CSV file)").set_input_files(str(SAMPLE))
        plain.get_by_label("Subject").fill("Hi")
        plain.get_by_label("HTML body").fill("<p>Hi</p>")
        plain.get_by_role("button", name="Create draft").click()
        expect(
            plain.get_by_role("heading", name="Review before sending")
        ).to_be_visible()
        plain.get_by_role("button", name="Cancel job").click()
        expect(plain.get_by_role("heading", name="Cancel job")).to_be_visible()
        plain.get_by_role("button", name="Yes, cancel job").click()
        expect(plain.locator("[data-cm-status]").first).to_have_text("cancelled")
        browser.close()

    assert {url: v for url, v in violations.items() if v} == {}
    assert len(violations) >= 8
