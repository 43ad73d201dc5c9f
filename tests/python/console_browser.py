"""The batch console at /console in a real headless Chromium (Debian's, driven by Playwright):
sign in, create a batch by uploading a file through the page, watch it complete, download its
output and errors, see a failed batch's validation errors, cancel a running batch, the list
newest first with live progress, sign out. Every wait is one of Playwright's own (it retries
until the state shows or the timeout passes); nothing sleeps.

Env: NS_API_KEY, NS_CHROMIUM (the browser binary), NS_SCREENSHOT (where to save a PNG of the
list page), NS_WORK_DIR (where to write the input files)."""

import json
import os
import re

from nstest import client, emit
from playwright.sync_api import expect, sync_playwright

ORIGIN = os.environ["NS_ORIGIN"]
KEY = os.environ["NS_API_KEY"]
CHROMIUM = os.environ["NS_CHROMIUM"]
SHOT = os.environ["NS_SCREENSHOT"]
WORK = os.environ["NS_WORK_DIR"]
# generous: the distributed deployment on a loaded machine; a pass is seconds
WAIT_MS = 90_000
expect.set_options(timeout=WAIT_MS)


def write(name, lines):
    path = os.path.join(WORK, name)
    with open(path, "w") as f:
        for line in lines:
            f.write(line if isinstance(line, str) else json.dumps(line))
            f.write("\n")
    return path


def embed(cid, model="sim-embed", **body):
    return {"custom_id": cid, "method": "POST", "url": "/v1/embeddings",
            "body": {"model": model, "input": f"text {cid}", **body}}


def chat(cid, **body):
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "sim-chat", "messages": [{"role": "user", "content": f"hi {cid}"}], **body}}


sdk = client(KEY)
# 11 answers and one line the upstream refuses (400): an output file and an error file
good_ids = [f"doc-{i}" for i in range(12)]
good = write("embeddings.jsonl", [embed(c, sim={"status": 400}) if c == "doc-7" else embed(c) for c in good_ids])
# a model nothing serves (reported on its first line) and line 2 not JSON: the batch fails
bad = write("broken.jsonl", [embed("a", model="no-such-model"), "{not json", embed("c", model="no-such-model")])
# slow lines: running long enough to be cancelled, or seen half done
slow = write("slow-chat.jsonl", [chat(f"slow-{i}", sim={"latency_ms": 1500}) for i in range(40)])
# the first lines answer quickly (progress shows), the rest slowly: it is still running when
# the script ends, however fast the executor ramps up to the upstream's capacity
running = write(
    "nightly-summaries.jsonl",
    [chat(f"sum-{i}", sim={"latency_ms": 700 if i < 10 else 20000}) for i in range(60)],
)


def console_errors(page):
    """Errors the page logged that are not the network's own (a refused key's 401)."""
    seen = []
    page.on("pageerror", lambda e: seen.append(f"uncaught: {e}"))
    page.on("console", lambda m: m.type == "error"
            and not m.text.startswith("Failed to load resource") and seen.append(m.text))
    return seen


def create(page, path, expect_endpoint):
    """Creates a batch by uploading `path` through the New batch form; returns its id."""
    page.get_by_role("navigation").get_by_role("link", name="New batch").click()
    expect(page.get_by_role("heading", name="New batch")).to_be_visible()
    page.get_by_label("Input file").set_input_files(path)
    expect(page.get_by_label("Endpoint")).to_have_value(expect_endpoint)
    expect(page.locator("#endpoint-help")).to_have_text(f"Detected from the file: {expect_endpoint}.")
    page.get_by_role("button", name="Upload and create batch").click()
    expect(page).to_have_url(re.compile(r"#/batches/batch_[A-Za-z0-9]+$"))
    batch_id = page.url.split("#/batches/")[1]
    expect(page.get_by_role("heading", name=batch_id)).to_be_visible()
    return batch_id


def dd(page, section, term):
    """The value next to `term` in one of the batch page's description lists."""
    return page.locator(f"#{section} dt", has_text=re.compile(f"^{term}$")).locator("xpath=following-sibling::dd[1]")


with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=CHROMIUM)
    context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 520})
    page = context.new_page()
    errors = console_errors(page)

    # The page loads without a key, under the strict policy.
    resp = page.goto(f"{ORIGIN}/console")
    assert resp.status == 200, resp.status
    csp = resp.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp, csp
    assert resp.headers["x-content-type-options"] == "nosniff"
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()

    # Sign in: a wrong key is refused with the server's message; the right one is kept in
    # this tab's session storage and nowhere else.
    page.get_by_label("API key").fill("ns-not-a-key")
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#sign-in-error")).to_contain_text("That key was refused: Incorrect API key")
    assert page.evaluate("sessionStorage.length") == 0
    page.get_by_label("API key").fill(KEY)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Batches")).to_be_visible()
    expect(page.locator("#list-empty")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('nightshift.apiKey')") == KEY
    assert page.evaluate("localStorage.length") == 0 and page.evaluate("document.cookie") == ""

    # Create from a file; the endpoint comes from its lines. Watch it complete.
    done_id = create(page, good, "/v1/embeddings")
    expect(page.locator("#batch-status")).to_have_text("completed")
    expect(page.locator("#batch-progress-text")).to_have_text("12 / 12 (1 failed)")
    expect(page.locator("#batch-progress")).to_have_js_property("value", 12)
    expect(dd(page, "batch-counts", "Completed")).to_have_text("11")
    expect(dd(page, "batch-counts", "Failed")).to_have_text("1")
    expect(dd(page, "batch-counts", "Input tokens")).not_to_have_text("0")
    expect(dd(page, "batch-times", "Completed")).to_be_visible()
    expect(dd(page, "batch-details", "Model")).to_have_text("sim-embed")
    expect(page.get_by_role("button", name="Cancel batch")).to_be_hidden()
    batch = sdk.batches.retrieve(done_id)
    assert batch.status == "completed" and batch.metadata == {"description": "embeddings.jsonl"}, batch

    # Download the output and the errors: the very bytes the API serves, every line once.
    with page.expect_download() as got:
        page.get_by_role("button", name="Download output").click()
    download = got.value
    assert download.suggested_filename == f"{done_id}_output.jsonl", download.suggested_filename
    with open(download.path(), "rb") as f:
        output = f.read()
    assert output == sdk.files.content(batch.output_file_id).content
    out_lines = [json.loads(line) for line in output.decode().splitlines()]
    assert sorted(r["custom_id"] for r in out_lines) == sorted(c for c in good_ids if c != "doc-7")
    assert all(r["response"]["status_code"] == 200 and r["response"]["body"]["data"] for r in out_lines)
    with page.expect_download() as got:
        page.get_by_role("button", name="Download errors").click()
    with open(got.value.path(), "rb") as f:
        err_lines = [json.loads(line) for line in f.read().decode().splitlines()]
    assert [(r["custom_id"], r["response"]["status_code"]) for r in err_lines] == [("doc-7", 400)], err_lines

    # A file with a bad line and an unknown model: the batch fails and its page lists why.
    failed_id = create(page, bad, "/v1/embeddings")
    expect(page.locator("#batch-status")).to_have_text("failed")
    errors_table = page.get_by_role("region", name="Validation errors")
    expect(errors_table).to_be_visible()
    rows = errors_table.locator("tbody tr")
    expect(rows).to_have_count(2)
    expect(rows.filter(has_text="model_not_found").locator("td").first).to_have_text("1")
    expect(rows.filter(has_text="invalid_json_line").locator("td").first).to_have_text("2")
    expect(dd(page, "batch-times", "Failed")).to_be_visible()
    expect(page.get_by_role("button", name="Download output")).to_be_hidden()

    # Cancel a running batch from its page.
    cancelled_id = create(page, slow, "/v1/chat/completions")
    expect(page.locator("#batch-status")).to_have_text("in progress")
    page.get_by_role("button", name="Cancel batch").click()
    expect(page.locator("#batch-status")).to_have_text("cancelled")
    expect(page.get_by_role("button", name="Cancel batch")).to_be_hidden()
    expect(dd(page, "batch-times", "Cancelled")).to_be_visible()
    assert sdk.batches.retrieve(cancelled_id).status == "cancelled"

    # One more, left running: the list shows its progress moving.
    running_id = create(page, running, "/v1/chat/completions")
    page.get_by_role("navigation").get_by_role("link", name="Batches").click()
    rows = page.locator("#batches tbody tr")
    expect(rows).to_have_count(4)
    order = [rows.nth(i).get_attribute("data-id") for i in range(4)]
    assert order == [running_id, cancelled_id, failed_id, done_id], order
    expect(rows.nth(1).get_by_text("cancelled")).to_be_visible()
    expect(rows.nth(2).get_by_text("failed", exact=True)).to_be_visible()
    expect(rows.nth(3).get_by_text("completed")).to_be_visible()
    expect(rows.nth(3).locator("progress")).to_have_js_property("value", 12)
    # live: the running batch's bar fills without a reload
    expect(rows.nth(0)).to_have_attribute("data-status", "in_progress")
    expect(rows.nth(0).locator("span.small")).to_have_text(re.compile(r"^([1-9]\d*) / 60$"))
    page.screenshot(path=SHOT, full_page=True)

    # A batch's link opens its page; sign out forgets the key, and a reload asks again.
    rows.nth(3).get_by_role("link", name=done_id).click()
    expect(page.get_by_role("heading", name=done_id)).to_be_visible()
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0
    page.reload()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    expect(page.get_by_role("navigation")).to_be_hidden()

    assert not errors, errors
    browser.close()

sdk.batches.cancel(running_id)
emit(completed=done_id, failed=failed_id, cancelled=cancelled_id, running=running_id)
