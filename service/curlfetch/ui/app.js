// curlfetch dashboard. No framework and no build step. Every string that comes from a job
// (URLs, headers, bodies, metadata) is attacker-controlled: it only ever goes into
// textContent, never into HTML.
"use strict";

const TOKEN_KEY = "curlfetch.token";
const BUCKET = 10; // seconds per chart bar
const WINDOW = 60; // bars: ten minutes
const $ = (id) => document.getElementById(id);

const state = { cursor: null, paged: false, filters: {}, buckets: new Map(), stream: null, timer: null };

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  const t = token();
  if (t) headers.Authorization = "Bearer " + t;
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (!response.ok) {
    let message = "HTTP " + response.status;
    try {
      const body = await response.json();
      message += " " + body.error.code + ": " + body.error.message;
    } catch (e) { /* not JSON */ }
    throw new ApiError(response.status, message);
  }
  return response;
}

async function json(path) {
  return (await api(path)).json();
}

function handle(error) {
  if (error instanceof ApiError && (error.status === 401 || error.status === 400)) {
    stop();
    showError("The service refused this token (" + error.message + "). Enter another.");
    showLogin();
    return;
  }
  showError(String(error.message || error));
}

// -- login ---------------------------------------------------------------------------------

function showLogin() {
  $("login").hidden = false;
  $("app").hidden = true;
  $("logout").hidden = true;
  $("who").textContent = "";
  $("token").focus();
}

async function start() {
  try {
    await json("/v1/stats"); // checks the token
  } catch (error) {
    handle(error);
    return;
  }
  showError("");
  $("login").hidden = true;
  $("app").hidden = false;
  $("logout").hidden = false;
  $("who").textContent = token() ? "token set" : "no token";
  refresh();
  loadJobs(true);
  state.timer = setInterval(refresh, 2000);
  follow();
}

function stop() {
  if (state.timer) clearInterval(state.timer);
  state.timer = null;
  if (state.stream) state.stream.abort();
  state.stream = null;
}

// -- tiles and batches -----------------------------------------------------------------------

async function refresh() {
  try {
    const stats = await json("/v1/stats");
    const tiles = $("tiles");
    tiles.replaceChildren();
    for (const name of ["queued", "running", "succeeded", "failed", "cancelled"]) {
      const tile = el("div", null, "tile " + name);
      tile.append(el("b", stats.jobs[name] || 0), el("span", name));
      tile.dataset.state = name;
      tiles.append(tile);
    }
    const hosts = $("hosts").tBodies[0];
    hosts.replaceChildren();
    for (const h of stats.hosts) {
      const row = el("tr");
      const errors = Object.entries(h.recent_errors).map(([code, n]) => code + " " + n).join(", ");
      row.append(el("td", h.host), el("td", h.queued), el("td", h.running), el("td", errors));
      row.addEventListener("click", () => { $("f-host").value = h.host; applyFilters(); });
      hosts.append(row);
    }
    const batches = await json("/v1/batches?limit=20");
    const body = $("batches").tBodies[0];
    body.replaceChildren();
    for (const b of batches.batches) {
      const row = el("tr");
      row.dataset.batch = b.id;
      const bar = el("progress");
      bar.max = b.total;
      bar.value = b.done;
      const cell = el("td");
      cell.append(bar);
      const id = el("td", b.id);
      id.className = "batch-id";
      row.append(id, el("td", b.state, "batch-state"), cell,
        el("td", b.done + "/" + b.total, "batch-done"), el("td", b.counts.failed),
        el("td", b.created_at));
      row.addEventListener("click", () => { $("f-batch").value = b.id; applyFilters(); });
      body.append(row);
    }
    drawChart();
    if (!state.paged) await loadJobs(true); // the first page stays live until one pages on
  } catch (error) {
    handle(error);
  }
}

// -- the event stream and the chart ------------------------------------------------------------

async function follow() {
  const controller = new AbortController();
  state.stream = controller;
  try {
    const response = await api("/v1/events?types=job.succeeded,job.failed,batch.completed",
      { signal: controller.signal });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("");
        if (data) onEvent(JSON.parse(data));
      }
    }
  } catch (error) {
    if (controller.signal.aborted) return;
  }
  if (state.stream === controller) setTimeout(follow, 2000); // resume (from now)
}

function onEvent(event) {
  if (event.type === "batch.completed") { refresh(); return; }
  const at = Math.floor(Date.parse(event.timestamp) / 1000 / BUCKET);
  const bucket = state.buckets.get(at) || { ok: 0, failed: 0 };
  if (event.type === "job.failed") bucket.failed += 1; else bucket.ok += 1;
  state.buckets.set(at, bucket);
}

function drawChart() {
  const canvas = $("chart");
  const ctx = canvas.getContext("2d");
  const now = Math.floor(Date.now() / 1000 / BUCKET);
  const bars = [];
  for (let i = WINDOW - 1; i >= 0; i--) bars.push(state.buckets.get(now - i) || { ok: 0, failed: 0 });
  for (const key of state.buckets.keys()) if (key < now - WINDOW) state.buckets.delete(key);
  const top = Math.max(1, ...bars.map((b) => b.ok + b.failed));
  const w = canvas.width / WINDOW;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  bars.forEach((b, i) => {
    const okH = (b.ok / top) * (canvas.height - 10);
    const badH = (b.failed / top) * (canvas.height - 10);
    ctx.fillStyle = "#1d4ed8";
    ctx.fillRect(i * w + 1, canvas.height - okH, w - 2, okH);
    ctx.fillStyle = "#b91c1c";
    ctx.fillRect(i * w + 1, canvas.height - okH - badH, w - 2, badH);
  });
  const last = bars.slice(-6);
  const done = last.reduce((n, b) => n + b.ok + b.failed, 0);
  const failed = last.reduce((n, b) => n + b.failed, 0);
  $("rate").textContent = "last minute: " + done + " finished (" + (done / 60).toFixed(1) +
    "/s), " + (done ? ((100 * failed) / done).toFixed(1) : "0.0") + "% failed";
}

// -- the job table and its detail ----------------------------------------------------------------

function applyFilters(event) {
  if (event) event.preventDefault();
  state.filters = {
    state: $("f-state").value, batch: $("f-batch").value.trim(),
    host: $("f-host").value.trim(), error: $("f-error").value.trim(),
  };
  loadJobs(true);
}

async function loadJobs(fresh) {
  const params = new URLSearchParams({ limit: "50" });
  for (const [k, v] of Object.entries(state.filters)) if (v) params.set(k, v);
  if (!fresh && state.cursor) params.set("cursor", state.cursor);
  state.paged = !fresh;
  try {
    const page = await json("/v1/jobs?" + params.toString());
    const body = $("jobs").tBodies[0];
    if (fresh) body.replaceChildren();
    for (const job of page.jobs) {
      const row = el("tr", null, "job");
      row.dataset.job = job.id;
      const error = job.error ? (job.error.curl_name || job.error.code) : "";
      row.append(el("td", job.id), el("td", job.state), el("td", job.result ? job.result.status : ""),
        el("td", error), el("td", job.request.url, "url"));
      row.addEventListener("click", () => showJob(job.id));
      body.append(row);
    }
    state.cursor = page.next_cursor;
    $("more").hidden = !page.next_cursor;
    showError("");
  } catch (error) {
    handle(error);
  }
}

function fact(list, name, value) {
  list.append(el("dt", name), el("dd", value === null || value === undefined ? "" : value));
}

async function showJob(id) {
  try {
    const job = await json("/v1/jobs/" + encodeURIComponent(id));
    $("detail").hidden = false;
    $("d-id").textContent = job.id;
    const facts = $("d-facts");
    facts.replaceChildren();
    fact(facts, "state", job.state);
    fact(facts, "url", job.request.url);
    fact(facts, "method", job.request.method);
    fact(facts, "attempts", job.attempts);
    fact(facts, "batch", job.batch);
    fact(facts, "metadata", job.metadata ? JSON.stringify(job.metadata) : "");
    if (job.result) {
      fact(facts, "status", job.result.status + " (HTTP/" + job.result.http_version + ")");
      fact(facts, "effective url", job.result.effective_url);
      fact(facts, "address", job.result.primary_ip);
      if (job.result.body) fact(facts, "body", job.result.body.size + " bytes, sha256 " + job.result.body.sha256);
    }
    if (job.error) {
      fact(facts, "error", (job.error.curl_name ? job.error.curl_name + " (curl " + job.error.curl_code + ")" : job.error.code));
      fact(facts, "message", job.error.message);
    }
    waterfall(job);
    const redirects = $("d-redirects");
    redirects.replaceChildren();
    for (const r of (job.result && job.result.redirects) || []) redirects.append(el("li", r.status + " → " + (r.location || "")));
    $("d-request").textContent = job.request.headers.map((h) => h[0] + ": " + h[1]).join("\n");
    $("d-headers").textContent = job.result ? job.result.headers.map((h) => h[0] + ": " + h[1]).join("\n") : "";
    $("d-body").textContent = "";
    if (job.result && job.result.body) {
      const response = await api("/v1/jobs/" + encodeURIComponent(id) + "/body", { headers: { Range: "bytes=0-4095" } });
      const bytes = new Uint8Array(await response.arrayBuffer());
      $("d-body").textContent = new TextDecoder("utf-8", { fatal: false }).decode(bytes);
    }
    $("detail").scrollIntoView();
  } catch (error) {
    handle(error);
  }
}

function waterfall(job) {
  const box = $("d-waterfall");
  box.replaceChildren();
  const t = job.result && job.result.timings;
  if (!t) {
    box.append(el("p", job.error ? "no response: the attempt failed before one arrived" : "not fetched yet", "muted"));
    return;
  }
  const total = Math.max(t.total, 1e-6);
  const phases = [
    ["queue", 0, t.queue], ["dns", t.queue, t.namelookup], ["connect", t.namelookup, t.connect],
    ["tls", t.connect, t.tls], ["first byte", Math.max(t.tls, t.connect), t.first_byte],
    ["total", 0, t.total],
  ];
  for (const [name, from, to] of phases) {
    const row = el("div", null, "phase");
    row.dataset.phase = name;
    const track = el("div", null, "track");
    const bar = el("div", null, "bar");
    const start = Math.max(0, Math.min(from, to));
    bar.style.left = ((100 * start) / total).toFixed(2) + "%";
    bar.style.width = ((100 * Math.max(0, to - start)) / total).toFixed(2) + "%";
    track.append(bar);
    row.append(el("span", name), track, el("span", (1000 * Math.max(0, to - start)).toFixed(1) + " ms"));
    box.append(row);
  }
}

// -- wiring --------------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    $("token").value = "";
    start();
  });
  $("logout").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    stop();
    showLogin();
  });
  $("filters").addEventListener("submit", applyFilters);
  $("more").addEventListener("click", () => loadJobs(false));
  $("d-close").addEventListener("click", () => { $("detail").hidden = true; });
  if (sessionStorage.getItem(TOKEN_KEY) === null) showLogin(); else start();
});
