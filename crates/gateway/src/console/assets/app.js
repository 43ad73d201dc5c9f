// The nightshift batch console. It holds no state on the server: it calls this origin's
// OpenAI API (/v1) with the API key the user typed, which lives in this tab's sessionStorage
// only. Views are picked by the URL's hash: #/ (batches), #/new, #/batches/<id>.
// The DOM is built with textContent only (never innerHTML), so nothing the API returns can
// become markup.

const KEY_STORAGE = "nightshift.apiKey";
const API = "/v1";
const PAGE_SIZE = 50;
const POLL_MS = 1500;
const TERMINAL = new Set(["completed", "failed", "expired", "cancelled"]);
const CANCELLABLE = new Set(["validating", "in_progress"]);
const ENDPOINTS = [
  "/v1/chat/completions",
  "/v1/completions",
  "/v1/embeddings",
  "/v1/responses",
  "/v1/moderations",
];

const $ = (id) => document.getElementById(id);

/** An API call that answered with an error envelope (or not at all). */
class ApiFailure extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// --- the key ---------------------------------------------------------------------------

const apiKey = () => sessionStorage.getItem(KEY_STORAGE);

function signOut(reason) {
  sessionStorage.removeItem(KEY_STORAGE);
  list.items = [];
  list.hasMore = false;
  list.loadedOlder = false;
  shown = null;
  $("api-key").value = "";
  $("sign-in-error").textContent = reason || "";
  route();
}

// --- the API ---------------------------------------------------------------------------

async function errorMessage(resp) {
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch {
    // not the envelope: fall through to the status line
  }
  return `${resp.status} ${resp.statusText}`.trim();
}

/** Calls `path` under /v1 with the key; returns the Response, throws ApiFailure. */
/** `key`: a key to try instead of the signed-in one (a refusal then signs nobody out). */
async function api(path, { method = "GET", json, headers = {}, key } = {}) {
  const init = {
    method,
    cache: "no-store",
    headers: { ...headers, Authorization: `Bearer ${key || apiKey()}` },
  };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  }
  let resp;
  try {
    resp = await fetch(API + path, init);
  } catch (e) {
    throw new ApiFailure(0, `The server could not be reached (${e.message}).`);
  }
  if (resp.status === 401 && !key && apiKey()) {
    const message = await errorMessage(resp);
    signOut(`Signed out: ${message}`);
    throw new ApiFailure(401, message);
  }
  if (!resp.ok) throw new ApiFailure(resp.status, await errorMessage(resp));
  return resp;
}

const getJson = async (path, opts) => (await api(path, opts)).json();

/** Uploads `file` for a batch with XMLHttpRequest, the one browser API with upload progress. */
function uploadFile(file, onProgress) {
  return new Promise((resolve, reject) => {
    const form = new FormData();
    form.append("purpose", "batch");
    form.append("file", file, file.name);
    const xhr = new XMLHttpRequest();
    xhr.open("POST", `${API}/files`);
    xhr.setRequestHeader("Authorization", `Bearer ${apiKey()}`);
    xhr.responseType = "json";
    xhr.upload.addEventListener("progress", (e) => {
      if (e.lengthComputable) onProgress(e.loaded / e.total);
    });
    xhr.addEventListener("load", () => {
      const body = xhr.response;
      if (xhr.status >= 200 && xhr.status < 300 && body && body.id) resolve(body);
      else {
        const message = body && body.error ? body.error.message : `upload failed (${xhr.status})`;
        if (xhr.status === 401) signOut(`Signed out: ${message}`);
        reject(new ApiFailure(xhr.status, message));
      }
    });
    xhr.addEventListener("error", () => reject(new ApiFailure(0, "The upload failed: the server could not be reached.")));
    xhr.send(form);
  });
}

/** Saves a file's content: fetched with the key (a plain link cannot carry it), as a blob. */
async function download(fileId, filename) {
  const blob = await (await api(`/files/${encodeURIComponent(fileId)}/content`)).blob();
  const url = URL.createObjectURL(blob);
  const a = document.createElement("a");
  a.href = url;
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

// --- small DOM helpers -----------------------------------------------------------------

/** Creates an element with attributes (`class`, `text`, others as attributes) and children. */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "text") el.textContent = v;
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  el.append(...children.filter((c) => c !== null && c !== undefined));
  return el;
}

const relative = new Intl.RelativeTimeFormat(undefined, { numeric: "auto" });

function ago(seconds) {
  const delta = seconds - Date.now() / 1000;
  const abs = Math.abs(delta);
  for (const [unit, size] of [["day", 86400], ["hour", 3600], ["minute", 60]]) {
    if (abs >= size) return relative.format(Math.round(delta / size), unit);
  }
  return relative.format(Math.round(delta), "second");
}

function timeEl(seconds) {
  const date = new Date(seconds * 1000);
  return h("time", { datetime: date.toISOString(), title: date.toLocaleString(), text: ago(seconds) });
}

const fmt = new Intl.NumberFormat();
const statusLabel = (s) => s.replace(/_/g, " ");

function statusEl(status) {
  return h("span", { class: `status status-${status}`, text: statusLabel(status) });
}

/** The progress of a batch: `[done, total, text]`. */
function progressOf(b) {
  const c = b.request_counts || { total: 0, completed: 0, failed: 0 };
  const done = c.completed + c.failed;
  if (!c.total) return [0, 0, b.status === "validating" ? "validating…" : "—"];
  const failed = c.failed ? ` (${fmt.format(c.failed)} failed)` : "";
  return [done, c.total, `${fmt.format(done)} / ${fmt.format(c.total)}${failed}`];
}

function progressEl(b, labelId) {
  const [done, total] = progressOf(b);
  const attrs = { "aria-labelledby": labelId };
  // validating: indeterminate (no value); otherwise done of total
  if (b.status !== "validating" || total) Object.assign(attrs, { max: total || 1, value: done });
  return h("progress", attrs);
}

function showNotice(text) {
  const n = $("notice");
  n.textContent = text || "";
  n.hidden = !text;
}

// --- polling ---------------------------------------------------------------------------

let pollTimer = null;
let pollFn = null;

/** Runs `fn` now and then every POLL_MS while this view is shown and the tab visible. */
function poll(fn) {
  stopPolling();
  pollFn = fn;
  const tick = async () => {
    if (pollFn !== fn) return;
    let again = true;
    if (!document.hidden) {
      try {
        again = await fn();
        showNotice("");
      } catch (e) {
        if (e.status === 401) return;
        showNotice(`Could not refresh: ${e.message}`);
      }
    }
    if (pollFn === fn && again !== false) pollTimer = setTimeout(tick, POLL_MS);
  };
  tick();
}

function stopPolling() {
  clearTimeout(pollTimer);
  pollTimer = null;
  pollFn = null;
}

document.addEventListener("visibilitychange", () => {
  if (!document.hidden && pollFn) poll(pollFn);
});

// --- the batches list ------------------------------------------------------------------

const list = { items: [], hasMore: false, loadedOlder: false };

function batchRow(b) {
  const labelId = `progress-${b.id}`;
  const [, , text] = progressOf(b);
  const sub = (b.metadata && b.metadata.description) || b.model || "";
  return h(
    "tr",
    { "data-id": b.id, "data-status": b.status },
    h("td", {}, h("a", { href: `#/batches/${b.id}`, class: "mono", text: b.id }), sub ? h("div", { class: "muted small", text: sub }) : null),
    h("td", {}, statusEl(b.status)),
    h("td", { class: "progress-col" }, h("div", { class: "progress-line" }, progressEl(b, labelId), h("span", { id: labelId, class: "small", text }))),
    h("td", {}, h("code", { text: b.endpoint })),
    h("td", {}, timeEl(b.created_at)),
  );
}

function renderList() {
  const body = $("batches").tBodies[0];
  body.replaceChildren(...list.items.map(batchRow));
  $("batches").hidden = list.items.length === 0;
  $("list-empty").hidden = list.items.length !== 0;
  $("load-more").hidden = !list.hasMore;
}

/** Refreshes the newest page; older pages the user loaded stay below it as they were. */
async function refreshList() {
  const page = await getJson(`/batches?limit=${PAGE_SIZE}`);
  const fresh = new Set(page.data.map((b) => b.id));
  let older = [];
  const last = page.data[page.data.length - 1];
  if (list.loadedOlder && last) {
    const at = list.items.findIndex((b) => b.id === last.id);
    if (at >= 0) older = list.items.slice(at + 1).filter((b) => !fresh.has(b.id));
  }
  list.items = [...page.data, ...older];
  if (!older.length) {
    list.loadedOlder = false;
    list.hasMore = page.has_more;
  }
  renderList();
}

async function loadMore() {
  const last = list.items[list.items.length - 1];
  if (!last) return;
  try {
    const page = await getJson(`/batches?limit=${PAGE_SIZE}&after=${encodeURIComponent(last.id)}`);
    const known = new Set(list.items.map((b) => b.id));
    list.items.push(...page.data.filter((b) => !known.has(b.id)));
    list.loadedOlder = true;
    list.hasMore = page.has_more;
    renderList();
  } catch (e) {
    showNotice(`Could not load older batches: ${e.message}`);
  }
}

// --- one batch -------------------------------------------------------------------------

let shown = null; // the batch on the batch page

function dl(target, rows) {
  target.replaceChildren(
    ...rows.filter(([, v]) => v !== null && v !== undefined && v !== "").flatMap(([k, v]) => [
      h("dt", { text: k }),
      h("dd", {}, typeof v === "object" && v instanceof Node ? v : String(v)),
    ]),
  );
}

const when = (s) => (s ? timeEl(s) : null);
const num = (n) => (n === null || n === undefined ? null : fmt.format(n));

function renderBatch(b) {
  shown = b;
  $("batch-title").textContent = b.id;
  $("batch-status").replaceChildren(statusEl(b.status));
  const [done, total, text] = progressOf(b);
  const bar = $("batch-progress");
  if (b.status === "validating" && !total) {
    bar.removeAttribute("value");
  } else {
    bar.max = total || 1;
    bar.value = done;
  }
  $("batch-progress-text").textContent = text;

  $("download-output").hidden = !b.output_file_id;
  $("download-errors").hidden = !b.error_file_id;
  $("cancel").hidden = !CANCELLABLE.has(b.status);

  const metadata = b.metadata && Object.keys(b.metadata).length
    ? Object.entries(b.metadata).map(([k, v]) => `${k}: ${v}`).join("\n")
    : null;
  dl($("batch-details"), [
    ["Endpoint", h("code", { text: b.endpoint })],
    ["Model", b.model],
    ["Completion window", b.completion_window],
    ["Input file", h("code", { text: b.input_file_id })],
    ["Output file", b.output_file_id ? h("code", { text: b.output_file_id }) : null],
    ["Error file", b.error_file_id ? h("code", { text: b.error_file_id }) : null],
    ["Metadata", metadata],
  ]);
  const c = b.request_counts || {};
  const u = b.usage || {};
  dl($("batch-counts"), [
    ["Total requests", num(c.total)],
    ["Completed", num(c.completed)],
    ["Failed", num(c.failed)],
    ["Input tokens", num(u.input_tokens)],
    ["Cached input tokens", num(u.input_tokens_details && u.input_tokens_details.cached_tokens)],
    ["Output tokens", num(u.output_tokens)],
    ["Reasoning tokens", num(u.output_tokens_details && u.output_tokens_details.reasoning_tokens)],
    ["Total tokens", num(u.total_tokens)],
  ]);
  dl($("batch-times"), [
    ["Created", when(b.created_at)],
    ["In progress", when(b.in_progress_at)],
    ["Finalizing", when(b.finalizing_at)],
    ["Completed", when(b.completed_at)],
    ["Failed", when(b.failed_at)],
    ["Cancelling", when(b.cancelling_at)],
    ["Cancelled", when(b.cancelled_at)],
    ["Expired", when(b.expired_at)],
    ["Expires", when(b.expires_at)],
  ]);

  const errors = (b.errors && b.errors.data) || [];
  $("batch-errors").hidden = errors.length === 0;
  $("batch-errors").querySelector("tbody").replaceChildren(
    ...errors.map((e) =>
      h("tr", {}, h("td", { text: e.line ?? "—" }), h("td", {}, h("code", { text: e.code ?? "" })), h("td", { text: e.param ?? "" }), h("td", { text: e.message ?? "" })),
    ),
  );
}

async function refreshBatch(id) {
  const b = await getJson(`/batches/${encodeURIComponent(id)}`);
  if (!location.hash.startsWith(`#/batches/${id}`)) return false;
  renderBatch(b);
  return !TERMINAL.has(b.status);
}

// --- a new batch -----------------------------------------------------------------------

/** The endpoint named by the first non-blank line of `file`, if it is one we know. */
async function detectEndpoint(file) {
  const head = await file.slice(0, 1 << 20).text();
  const line = head.split("\n").find((l) => l.trim());
  try {
    const url = line && JSON.parse(line).url;
    return ENDPOINTS.includes(url) ? url : null;
  } catch {
    return null;
  }
}

async function onFileChosen() {
  const file = $("input-file").files[0];
  $("new-error").textContent = "";
  if (!file) return;
  const endpoint = await detectEndpoint(file);
  $("endpoint-help").textContent = endpoint
    ? `Detected from the file: ${endpoint}.`
    : "The file's first line names no known endpoint: pick one.";
  if (endpoint) $("endpoint").value = endpoint;
}

async function onCreate(event) {
  event.preventDefault();
  const file = $("input-file").files[0];
  const error = $("new-error");
  error.textContent = "";
  if (!file) {
    error.textContent = "Choose a JSONL file first.";
    $("input-file").focus();
    return;
  }
  const button = $("create");
  const bar = $("upload-progress");
  button.disabled = true;
  bar.hidden = false;
  bar.value = 0;
  try {
    const uploaded = await uploadFile(file, (f) => (bar.value = f));
    const batch = await getJson("/batches", {
      method: "POST",
      json: {
        input_file_id: uploaded.id,
        endpoint: $("endpoint").value,
        completion_window: $("window").value,
        metadata: { description: file.name },
      },
    });
    $("new-form").reset();
    $("endpoint-help").textContent = "Picked from the file's first line when it names one.";
    location.hash = `#/batches/${batch.id}`;
  } catch (e) {
    if (e.status !== 401) error.textContent = e.message;
  } finally {
    button.disabled = false;
    bar.hidden = true;
  }
}

// --- routing ---------------------------------------------------------------------------

const VIEWS = ["view-sign-in", "view-list", "view-new", "view-batch"];

function show(view) {
  for (const v of VIEWS) $(v).hidden = v !== view;
  $("nav").hidden = view === "view-sign-in";
  const heading = $(view).querySelector("h1");
  if (heading) {
    heading.tabIndex = -1;
    heading.focus({ preventScroll: true });
  }
}

function route() {
  stopPolling();
  showNotice("");
  if (!apiKey()) {
    show("view-sign-in");
    document.title = "Sign in · nightshift";
    return;
  }
  const hash = location.hash || "#/";
  const batch = hash.match(/^#\/batches\/([^/?#]+)$/);
  if (batch) {
    const id = decodeURIComponent(batch[1]);
    if (!shown || shown.id !== id) {
      $("batch-title").textContent = id;
      for (const t of ["batch-details", "batch-counts", "batch-times"]) $(t).replaceChildren();
      $("batch-status").replaceChildren();
      $("batch-errors").hidden = true;
      for (const b of ["download-output", "download-errors", "cancel"]) $(b).hidden = true;
    }
    show("view-batch");
    document.title = `${id} · nightshift`;
    poll(() => refreshBatch(id));
  } else if (hash === "#/new") {
    show("view-new");
    document.title = "New batch · nightshift";
  } else {
    show("view-list");
    document.title = "Batches · nightshift";
    renderList();
    poll(async () => {
      await refreshList();
      return true;
    });
  }
}

async function onSignIn(event) {
  event.preventDefault();
  const key = $("api-key").value.trim();
  const error = $("sign-in-error");
  if (!key) {
    error.textContent = "Enter an API key.";
    return;
  }
  error.textContent = "";
  try {
    await api("/batches?limit=1", { key });
  } catch (e) {
    error.textContent = e.status === 401 ? `That key was refused: ${e.message}` : e.message;
    $("api-key").focus();
    return;
  }
  sessionStorage.setItem(KEY_STORAGE, key);
  $("api-key").value = "";
  route();
}

function withButton(button, action) {
  return async () => {
    button.disabled = true;
    try {
      await action();
    } catch (e) {
      if (e.status !== 401) showNotice(e.message);
    } finally {
      button.disabled = false;
    }
  };
}

function start() {
  $("sign-in-form").addEventListener("submit", onSignIn);
  $("sign-out").addEventListener("click", () => signOut("You signed out."));
  $("new-form").addEventListener("submit", onCreate);
  $("input-file").addEventListener("change", onFileChosen);
  $("load-more").addEventListener("click", loadMore);
  $("download-output").addEventListener(
    "click",
    withButton($("download-output"), () => download(shown.output_file_id, `${shown.id}_output.jsonl`)),
  );
  $("download-errors").addEventListener(
    "click",
    withButton($("download-errors"), () => download(shown.error_file_id, `${shown.id}_errors.jsonl`)),
  );
  $("cancel").addEventListener(
    "click",
    withButton($("cancel"), async () => {
      const b = await getJson(`/batches/${encodeURIComponent(shown.id)}/cancel`, { method: "POST" });
      renderBatch(b);
      poll(() => refreshBatch(b.id));
    }),
  );
  window.addEventListener("hashchange", route);
  route();
}

start();
