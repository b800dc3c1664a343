"""The dashboard in headless Chromium, against a real control plane (uvicorn on 127.0.0.1, a real
SQLite file) that runs a real tiny CPU training job.

A person's path through it, on a control plane with a token: open the jobs page (the token field
opens: listing jobs needs the token too), go to the form, submit without the token (refused,
the typed config stays), save the token, submit a config with a typo (the 422 shows next to the
field it names), fix it, land on the job page, and watch the loss chart fill from the live metric
stream until the job has succeeded, without reloading. The live streams are read with fetch()
and carry the token in their Authorization header; no URL the page asks for holds it. And the
services page: a live and a dead hidden-state service, a live and a gone trainer agent, a job
claimed by the agent. The screenshots go to output/ (dashboard.png: the job page;
dashboard-checkpoints.png: its checkpoints tab; dashboard-jobs.png: the jobs table;
dashboard-services.png: the services page).

Needs Debian's `chromium` and the `playwright` package (driving that chromium; no browser download):
`make browser-env` installs both. Without chromium the test is skipped.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest

from tests.factories.services import running_service
from tests.services.control_plane.conftest import tiny_job
from tests.services.control_plane.harness import LONG_S, ROOT, TOKEN, free_port

CHROMIUM = shutil.which("chromium")
SCREENSHOTS = ROOT / "output"
LOSS_SERIES = ("train/loss", "val/loss")
EXPECTED_ERRORS = re.compile(r"status of (401|422)")  # what the browser logs for the refusals provoked here

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed: `make browser-env` installs it"
)


@pytest.fixture
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        context = browser.new_context(viewport={"width": 1440, "height": 900}, color_scheme="light")
        page = context.new_page()
        page.set_default_timeout(30_000)
        page.problems = []  # uncaught script errors and failed requests the page made
        page.on("pageerror", lambda error: page.problems.append(f"script error: {error}"))
        page.on(
            "console",
            lambda message: (
                message.type == "error"
                and not EXPECTED_ERRORS.search(message.text)
                and page.problems.append(f"console: {message.text}")
            ),
        )
        yield page
        browser.close()


def plotted_points(rows: list[dict], keys: tuple[str, ...]) -> int:
    """How many points the chart should show: per series, a row at or before the last step
    replaces the tail from there (a resumed attempt repeats steps), as plot.js does."""
    total = 0
    for key in keys:
        steps: list[int] = []
        for row in rows:
            if row["metrics"].get(key) is None:
                continue
            while steps and steps[-1] >= row["step"]:
                steps.pop()
            steps.append(row["step"])
        total += len(steps)
    return total


def test_submit_a_job_in_the_form_and_watch_its_loss_chart_fill(start_server, workspace, page):
    server = start_server(data_root=workspace["root"], max_concurrent_jobs=1, token=TOKEN)
    requests = []  # (url, the Authorization header it carried)
    page.on("request", lambda request: requests.append((request.url, request.headers.get("authorization"))))
    page.goto(f"{server.url}/")
    # Listing jobs needs the token: the API answers 401 and the token field opens.
    page.locator("#token-popover").wait_for(state="visible")
    assert "needs its token" in page.inner_text("#token-message")
    assert page.locator("#docs-link").is_hidden()  # /docs needs the token, which a link cannot send

    page.get_by_role("link", name="New job").first.click()
    page.wait_for_url(f"{server.url}/new")
    body = tiny_job(workspace, epochs=2)
    page.fill("#job-name", "browser e2e")
    page.fill("#job-gpus", "0")
    with_typo = json.dumps({**body, "block_sise": 4}, indent=2)
    page.fill("#job-config", with_typo)

    # Still no token: submitting is refused, and saving the token keeps the form as typed.
    page.get_by_role("button", name="Submit job").click()
    page.get_by_text("Add the control plane's token").wait_for()
    page.fill("#token-input", TOKEN)
    page.locator("#token-popover button[type=submit]").click()
    assert page.evaluate("sessionStorage.getItem('dflash.token')") == TOKEN
    assert page.evaluate("localStorage.getItem('dflash.token')") is None  # this tab only
    assert page.input_value("#job-config") == with_typo

    # The typo is refused with a 422 naming the field; the message sits next to it.
    page.get_by_role("button", name="Submit job").click()
    typo = page.locator('.field-error[data-field="block_sise"]')
    typo.wait_for()
    assert "Extra inputs are not permitted" in typo.inner_text()
    assert server.client.get("/v1/jobs").json()["count"] == 0

    page.fill("#job-config", json.dumps(body, indent=2))
    page.get_by_role("button", name="Submit job").click()
    page.wait_for_url(re.compile(r"/jobs/[^/]+$"))
    job_id = page.url.rsplit("/", 1)[1]
    job = server.job(job_id)
    assert job["name"] == "browser e2e" and job["gpus_requested"] == 0
    page.evaluate("window.sameDocument = true")  # gone if anything reloads the page

    loss = page.locator('[data-chart="loss"]')
    loss.wait_for()
    before = int(loss.get_attribute("data-points") or 0)
    page.wait_for_function(
        "() => +document.querySelector('[data-chart=loss]').dataset.points > 0", timeout=LONG_S * 1000
    )
    server.wait_state(job_id, "succeeded")
    expected = plotted_points(server.metric_rows(job_id), LOSS_SERIES)
    page.wait_for_function(
        f"() => +document.querySelector('[data-chart=loss]').dataset.points === {expected}",
        timeout=LONG_S * 1000,
    )
    assert before < expected, "the chart had every point before the job ran: nothing was live"
    assert page.evaluate("window.sameDocument") is True
    page.locator(".job-title .state-succeeded").wait_for()
    page.get_by_text("took").first.wait_for()
    for chart in ("eal", "accuracy", "throughput", "wait"):
        assert int(page.get_attribute(f'[data-chart="{chart}"]', "data-points")) > 0, chart
    page.get_by_text("job succeeded: log complete").wait_for()
    assert "exited with status 0: job succeeded" in page.inner_text(".log")
    page.wait_for_timeout(500)  # let the last animation frame and transitions settle
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "dashboard.png"), full_page=True)

    page.click('[data-tab="checkpoints"]')
    page.locator('[data-checkpoint="1"]').wait_for()
    assert page.locator("[data-checkpoint]").count() == 2
    with page.expect_download() as download:
        page.locator('[data-checkpoint="1"]').get_by_role("button", name="Download").click()
    assert download.value.suggested_filename == f"{job_id}-1.tar.gz"
    page.evaluate("window.scrollTo(0, 0)")  # else the sticky top bar lands mid-page in a full-page shot
    page.screenshot(path=str(SCREENSHOTS / "dashboard-checkpoints.png"), full_page=True)

    # Clone: the form holds the job's config less the fields /v1/meta names as the job's own; the
    # Example button gives /v1/meta's example (the script repeats neither).
    meta = server.client.get("/v1/meta").json()
    page.get_by_role("link", name="Clone").click()
    page.wait_for_function("() => document.querySelector('#job-config').value.includes('data_path')")
    cloned = json.loads(page.input_value("#job-config"))
    assert cloned["data_path"] == job["config"]["data_path"] and not set(meta["not_copied"]) & set(cloned)
    page.get_by_role("button", name="Example").click()
    page.wait_for_function("() => document.querySelector('#job-config').value.includes('demo/data')")
    assert json.loads(page.input_value("#job-config")) == meta["example_config"]

    page.get_by_role("banner").get_by_role("link", name="Jobs", exact=True).click()
    row = page.locator(f'tr[data-job-id="{job_id}"][data-state="succeeded"]')
    row.wait_for()
    assert "100%" in row.inner_text() and "browser e2e" in row.inner_text()
    page.screenshot(path=str(SCREENSHOTS / "dashboard-jobs.png"), full_page=True)
    assert page.problems == []

    # The live streams went out with the token in their header, and no URL ever held it.
    streams = {
        url.split("?")[0].rsplit("/", 1)[1]: auth
        for url, auth in requests
        if "/metrics/stream" in url or "follow=true" in url
    }
    assert streams == {"stream": f"Bearer {TOKEN}", "logs": f"Bearer {TOKEN}"}, streams
    assert not [url for url, _ in requests if TOKEN in url]


def test_services_page_shows_service_health_and_trainer_agents(start_server, workspace, page, tmp_path):
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    with running_service(workspace["verifier"], target_layer_ids=[1, 2]) as service:
        server = start_server(
            data_root=workspace["root"],
            token=TOKEN,
            executor="agent",
            agent_lost_after_s=600.0,  # no heartbeats here: the agent must stay live through the test
            hidden_states_endpoints=f"{service.address},{dead}",
        )
        # Two agents over HTTP, as `dflash trainer-agent` would: one live that claims a job (its GPU 0
        # becomes busy), one that said goodbye.
        for name, gpus in (("gpu-node-1", [0, 1]), ("gpu-node-2", [0, 1, 2, 3])):
            response = server.client.post("/v1/agents", json={"name": name, "gpus": gpus})
            assert response.status_code == 201, response.text
        assert server.client.post("/v1/agents/gpu-node-2/goodbye").status_code == 204
        body = tiny_job(
            workspace, name="reads the live service", gpus=1, hidden_states_endpoint=[service.address]
        )
        job_id = server.submit(body)["id"]
        claimed = server.client.post("/v1/agents/gpu-node-1/claim")
        assert claimed.status_code == 200 and claimed.json()["id"] == job_id, claimed.text

        # The token was given earlier in this tab (sessionStorage outlives a reload, not the tab).
        page.add_init_script(f"sessionStorage.setItem('dflash.token', {json.dumps(TOKEN)})")
        page.goto(f"{server.url}/")
        page.get_by_role("banner").get_by_role("link", name="Services", exact=True).click()
        page.wait_for_url(f"{server.url}/services")

        live = page.locator(f'tr[data-endpoint="{service.address}"][data-status="serving"]')
        live.wait_for()
        verifier = str(workspace["verifier"])
        assert live.locator(".state").inner_text().lower() == "serving"
        assert live.locator("[data-verifier]").get_attribute("data-verifier") == verifier
        assert verifier.endswith(live.locator("[data-verifier]").inner_text().lstrip("…"))
        assert "transformers" in live.inner_text() and "float32" in live.inner_text()
        assert live.locator(f'a[data-job="{job_id}"]').inner_text() == "reads the live service"
        down = page.locator(f'tr[data-endpoint="{dead}"][data-status="unreachable"]')
        down.wait_for()
        assert down.locator(".state").inner_text().lower() == "unreachable"
        assert "no gRPC connection" in down.locator(".detail").inner_text()

        agent = page.locator('tr[data-agent="gpu-node-1"][data-state="live"]')
        agent.wait_for()
        assert agent.locator(".state").inner_text().lower() == "live"
        busy = {g: agent.locator(f'[data-gpu="{g}"]').get_attribute("data-busy") for g in (0, 1)}
        assert busy == {0: "true", 1: "false"}  # the claimed 1-GPU job holds GPU 0
        assert "just now" in agent.inner_text()
        page.locator('tr[data-agent="gpu-node-2"][data-state="gone"]').wait_for()
        page.mouse.move(0, 600)  # off the nav link it clicked, so no hover shows
        page.wait_for_timeout(300)  # let the running dots settle
        SCREENSHOTS.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / "dashboard-services.png"), full_page=True)

        # The job page's Run card names the agent that claimed it.
        agent.locator(f'a[data-job="{job_id}"]').click()
        page.wait_for_url(f"{server.url}/jobs/{job_id}")
        assert page.locator('[data-detail="agent"]').inner_text() == "gpu-node-1"

    # A control plane that runs trainers itself has no agents: a one-line note says so, and with no
    # service configured or named, the empty state says how services get listed.
    local = start_server(data_root=workspace["root"], db=str(tmp_path / "local.db"), max_concurrent_jobs=0)
    page.goto(f"{local.url}/services")
    page.get_by_text("Trainers run on this host (--executor local)").wait_for()
    page.get_by_text("No hidden-state services").wait_for()
    assert page.problems == []
