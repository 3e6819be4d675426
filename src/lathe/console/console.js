// The lathe console: one page that reads the same REST API as the CLI and the SDK.
// Everything a user controls (names, metadata, sampled text) reaches the page as text nodes
// (el() below never parses HTML), the API key lives in sessionStorage and goes out only as a
// header, and the server's Content-Security-Policy allows this file and nothing inline.
"use strict";

const BASE = "/console";
const KEY = "lathe.apiKey";
let timers = [];  // polling of the current view, stopped when the view changes

// --- helpers ------------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (value !== false && value !== null && value !== undefined) node.setAttribute(name, value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs = {}) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  return node;
}

function apiKey() { return sessionStorage.getItem(KEY); }

async function call(method, path, body, { bearer = false } = {}) {
  const headers = bearer ? { Authorization: `Bearer ${apiKey()}` } : { "X-API-Key": apiKey() };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  const data = text ? JSON.parse(text) : {};
  if (!response.ok) {
    const detail = data.detail || (data.error && data.error.message) || response.statusText;
    throw new Error(`${response.status}: ${typeof detail === "string" ? detail : JSON.stringify(detail)}`);
  }
  return data;
}
const api = (method, path, body) => call(method, `/api/v1${path}`, body);

function showError(error) {
  const box = document.getElementById("error");
  box.textContent = String(error.message || error);
  box.hidden = false;
  setTimeout(() => { box.hidden = true; }, 6000);
}

function every(ms, fn) {
  const tick = () => fn().catch(showError);
  timers.push(setInterval(tick, ms));
  return tick();
}

function go(path) {
  history.pushState(null, "", path);
  route().catch(showError);
}

function link(path, text) {
  return el("a", { href: path, "data-nav": "" }, text);
}

function when(iso) { return iso ? new Date(iso).toLocaleString() : ""; }

function runName(run) { return (run.user_metadata && run.user_metadata.name) || run.training_run_id; }

function view(...children) {
  const main = document.getElementById("main");
  main.replaceChildren(...children);
  return main;
}

// --- sign in ------------------------------------------------------------------------------

async function signIn() {
  const input = el("input", { type: "password", name: "key", placeholder: "tml-…", required: "" });
  const form = el("form", { class: "signin" },
    el("h1", {}, "Sign in"),
    el("label", {}, "API key ", input),
    el("button", { class: "primary", type: "submit" }, "Sign in"),
    el("p", { class: "muted" }, "The key stays in this tab's session storage."));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY, input.value.trim());
    try {
      await api("GET", "/auth/apikey/me");
      go(location.pathname === `${BASE}/` ? `${BASE}/training_runs` : location.pathname + location.search);
    } catch (error) {
      sessionStorage.removeItem(KEY);
      showError(error);
    }
  });
  view(form);
}

// --- training runs ------------------------------------------------------------------------

async function runsView() {
  const limit = 20;
  const offset = Number(new URLSearchParams(location.search).get("offset") || 0);
  const body = el("tbody");
  const pager = el("div", { class: "pager" });
  view(el("h1", {}, "Training runs"),
    el("table", { id: "runs" },
      el("thead", {}, el("tr", {}, ["Run", "Base model", "Rank", "Owner", "Created", "Steps",
        "Status", "Last request"].map((h) => el("th", {}, h)))),
      body),
    pager);
  await every(5000, async () => {
    const page = await api("GET", `/training_runs?limit=${limit}&offset=${offset}`);
    body.replaceChildren(...page.training_runs.map((run) => el("tr", {},
      el("td", {}, link(`${BASE}/training_runs/${encodeURIComponent(run.training_run_id)}`, runName(run))),
      el("td", {}, run.base_model),
      el("td", {}, run.lora_rank),
      el("td", {}, run.model_owner),
      el("td", {}, when(run.created_time)),
      el("td", { class: "steps" }, run.optim_steps),
      el("td", { class: run.active ? "live" : "muted" }, run.active ? "live" : "ended"),
      el("td", {}, when(run.last_request_time)))));
    const total = page.cursor.total_count;
    pager.replaceChildren(
      offset > 0 ? link(`${BASE}/training_runs?offset=${Math.max(0, offset - limit)}`, "← Newer") : "",
      el("span", { class: "muted" }, `${total ? offset + 1 : 0}–${Math.min(offset + limit, total)} of ${total}`),
      offset + limit < total ? link(`${BASE}/training_runs?offset=${offset + limit}`, "Older →") : "");
  });
}

function chart(name, points) {
  const width = 360, height = 180, pad = 28;
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  const [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  const sx = (x) => pad + (x1 === x0 ? 0.5 : (x - x0) / (x1 - x0)) * (width - 2 * pad);
  const sy = (y) => height - pad - (y1 === y0 ? 0.5 : (y - y0) / (y1 - y0)) * (height - 2 * pad);
  const plot = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img" });
  plot.append(svg("polyline", { points: points.map(([x, y]) => `${sx(x)},${sy(y)}`).join(" ") }));
  for (const [x, y] of points) plot.append(svg("circle", { class: "point", cx: sx(x), cy: sy(y), r: 2 }));
  const label = (x, y, text, anchor = "start") => {
    const t = svg("text", { x, y, "text-anchor": anchor });
    t.textContent = text;
    plot.append(t);
  };
  label(2, pad - 6, y1.toPrecision(4));
  label(2, height - pad + 12, y0.toPrecision(4));
  label(width - pad, height - 4, `step ${points.length}`, "end");
  return el("div", { class: "chart", "data-metric": name }, el("h3", {}, name), plot);
}

function drawCharts(container, rows) {
  const series = new Map();  // "kind metric" -> [[step, value]]
  const steps = new Map();
  for (const row of rows) {
    const step = (steps.get(row.kind) || 0) + 1;
    steps.set(row.kind, step);
    for (const [name, value] of Object.entries(row.metrics)) {
      if (value === null) continue;
      const key = `${row.kind} ${name}`;
      if (!series.has(key)) series.set(key, []);
      series.get(key).push([step, value]);
    }
  }
  const keys = [...series.keys()].sort((a, b) => (b.includes("loss") - a.includes("loss")) || a.localeCompare(b));
  container.replaceChildren(...keys.map((key) => chart(key, series.get(key))));
}

async function runView(modelId, highlight) {
  const info = el("div");
  const charts = el("div", { class: "charts", id: "charts" });
  const checkpoints = el("tbody");
  view(el("h1", {}, "Run ", el("span", { class: "mono" }, modelId)), info,
    el("h2", {}, "Curves"), charts,
    el("h2", {}, "Checkpoints"),
    el("table", { id: "checkpoints" },
      el("thead", {}, el("tr", {}, ["Path", "Type", "Saved", "Size", "Expires", ""].map((h) => el("th", {}, h)))),
      checkpoints));
  const run = await api("GET", `/training_runs/${encodeURIComponent(modelId)}`);
  info.replaceChildren(el("table", {}, el("tbody", {},
    ...[["Name", runName(run)], ["Base model", run.base_model], ["LoRA rank", run.lora_rank],
      ["Owner", run.model_owner], ["Created", when(run.created_time)],
      ["Status", run.active ? "live" : "ended"], ["Last request", when(run.last_request_time)],
      ["Metadata", JSON.stringify(run.user_metadata)]]
      .map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", { class: k === "Name" ? "run-name" : "" }, v))))));
  const rows = [];
  let after = 0;
  await every(2000, async () => {  // new steps only, from the last one seen
    const page = await api("GET", `/training_runs/${encodeURIComponent(modelId)}/metrics?after_seq=${after}`);
    if (page.metrics.length || !rows.length) {
      rows.push(...page.metrics);
      after = page.next_after_seq;
      drawCharts(charts, rows);
      if (!rows.length) charts.replaceChildren(el("p", { class: "muted" }, "No steps yet."));
    }
  });
  const refresh = async () => {
    const list = await api("GET", `/training_runs/${encodeURIComponent(modelId)}/checkpoints`);
    checkpoints.replaceChildren(...list.checkpoints.map((c) => checkpointRow(modelId, c, highlight, refresh)));
  };
  await every(5000, refresh);
}

function checkpointRow(modelId, c, highlight, refresh) {
  const path = `/training_runs/${encodeURIComponent(modelId)}/checkpoints/${c.checkpoint_id}`;
  const actions = el("td", {});
  const download = el("button", { type: "button", class: "download", onclick: async () => {
    const { url } = await api("GET", `${path}/archive`).catch(showError) || {};
    if (!url) return;
    const a = el("a", { href: url, class: "download-link", download: "" }, "archive.tar");
    actions.append(" ", a);
    a.click();
  } }, "Download");
  const publish = el("button", { type: "button", class: "publish", onclick: async () => {
    await api(c.public ? "DELETE" : "POST", `${path}/publish`).catch(showError);
    await refresh();
  } }, c.public ? "Unpublish" : "Publish");
  const ttl = el("button", { type: "button", class: "ttl", onclick: async () => {
    const hours = prompt("Expire in how many hours? (empty: never)", "");
    if (hours === null) return;
    const ttl_seconds = hours.trim() ? Math.round(Number(hours) * 3600) : null;
    await api("PUT", `${path}/ttl`, { ttl_seconds }).catch(showError);
    await refresh();
  } }, "TTL");
  const remove = el("button", { type: "button", class: "danger delete", onclick: async () => {
    if (!confirm(`Delete ${c.tinker_path}? This cannot be undone.`)) return;
    await api("DELETE", path).catch(showError);
    await refresh();
  } }, "Delete");
  const play = link(`${BASE}/playground?mode=checkpoint&checkpoint=${encodeURIComponent(c.tinker_path)}`, "Play");
  actions.append(download, " ", publish, " ", ttl, " ", remove, " ", play);
  const marked = highlight && (highlight === c.checkpoint_id || highlight === c.checkpoint_id.split("/").pop());
  return el("tr", { class: marked ? "highlight" : "" },
    el("td", { class: "mono" }, c.tinker_path),
    el("td", {}, c.checkpoint_type + (c.public ? " (public)" : "")),
    el("td", {}, when(c.time)),
    el("td", {}, `${(c.size_bytes / 1e6).toFixed(2)} MB`),
    el("td", {}, c.expires_at ? when(c.expires_at) : "never"),
    actions);
}

// --- sessions, keys, server ---------------------------------------------------------------

async function sessionsView() {
  const limit = 50;
  const offset = Number(new URLSearchParams(location.search).get("offset") || 0);
  const list = el("ul", { id: "sessions" });
  const pager = el("div", { class: "pager" });
  view(el("h1", {}, "Sessions"), list, pager);
  // one more than a page: whether there is a next page (the list has no total)
  const page = await api("GET", `/sessions?limit=${limit + 1}&offset=${offset}`);
  list.replaceChildren(...page.sessions.slice(0, limit).map((id) => el("li", { class: "mono" }, id)));
  pager.replaceChildren(
    offset > 0 ? link(`${BASE}/sessions?offset=${Math.max(0, offset - limit)}`, "← Newer") : "",
    page.sessions.length > limit ? link(`${BASE}/sessions?offset=${offset + limit}`, "Older →") : "");
}

async function keysView() {
  const body = el("tbody");
  const fresh = el("div");
  const create = el("button", { class: "primary", type: "button", id: "create-key", onclick: async () => {
    const key = await api("POST", "/api_keys").catch(showError);
    if (!key) return;
    fresh.replaceChildren(el("p", { class: "secret" }, "New key (shown once): ",
      el("span", { class: "mono", id: "new-key" }, key.key)));
    await refresh();
  } }, "Create key");
  view(el("h1", {}, "API keys"), create, fresh,
    el("table", { id: "keys" }, el("thead", {}, el("tr", {},
      ["Id", "Key", "Created", "State", ""].map((h) => el("th", {}, h)))), body));
  const refresh = async () => {
    const { api_keys } = await api("GET", "/api_keys");
    body.replaceChildren(...api_keys.map((k) => el("tr", { "data-key-id": k.key_id },
      el("td", {}, k.key_id),
      el("td", { class: "mono" }, `${k.prefix}…`),
      el("td", {}, when(k.created_at)),
      el("td", { class: "state" }, k.revoked ? "revoked" : "active"),
      el("td", {}, k.revoked ? "" : el("button", { type: "button", class: "danger revoke", onclick: async () => {
        if (!confirm(`Revoke key ${k.prefix}…? Programs using it stop working.`)) return;
        await api("DELETE", `/api_keys/${k.key_id}`).catch(showError);
        await refresh();
      } }, "Revoke")))));
  };
  await refresh();
}

async function statusView() {
  const facts = el("tbody");
  const raw = el("pre", { id: "status-raw" });
  view(el("h1", {}, "Server"), el("table", {}, facts), el("h2", {}, "Everything"), raw);
  await every(2000, async () => {
    const s = await api("GET", "/status");
    const sampling = (s.sampling || {});
    const rows = [
      ["Base models", (s.base_models || []).join(", ")],
      ["Adapters resident", s.training ? `${s.training.resident} of ${s.training.adapters}` : ""],
      ["Samplers", s.samplers],
      ["Sampling requests running", sampling.running_requests],
      ["Sampling requests waiting for KV memory", sampling.waiting_requests],
      ["KV blocks used", sampling.kv_blocks_total ? `${sampling.kv_blocks_used} of ${sampling.kv_blocks_total}` : ""],
      ["Tokens/s", Object.entries(s.tokens_per_second || {}).map(([k, v]) => `${k} ${v}`).join(", ")],
      ["Queued requests by tenant", Object.entries(s.queued_by_tenant || {}).map(([k, v]) => `${k}: ${v}`).join(", ") || "none"],
    ];
    facts.replaceChildren(...rows.map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, v ?? ""))));
    raw.textContent = JSON.stringify(s, null, 2);
  });
}

// --- playground ---------------------------------------------------------------------------

async function playgroundView() {
  const params = new URLSearchParams(location.search);
  const models = (await call("GET", "/v1/models", undefined, { bearer: true })).data.map((m) => m.id);
  const wanted = params.get("checkpoint");
  if (wanted && !models.includes(wanted)) models.unshift(wanted);  // e.g. someone's published one
  const prompt = el("textarea", { id: "prompt", placeholder: "Message" });
  const temperature = el("input", { id: "temperature", type: "number", step: "0.1", min: "0", max: "2", value: "0.7" });
  const maxTokens = el("input", { id: "max-tokens", type: "number", min: "1", value: "128" });
  const topP = el("input", { id: "top-p", type: "number", step: "0.05", min: "0.05", max: "1", value: "1" });
  const pane = (side, selected) => {
    const select = el("select", { class: "model", id: `model-${side}` },
      el("option", { value: "" }, "(none)"),
      ...models.map((id) => el("option", { value: id, selected: id === selected ? "" : false }, id)));
    const output = el("div", { class: "output", id: `output-${side}` });
    const meta = el("p", { class: "muted", id: `meta-${side}` });
    return { select, output, meta, node: el("div", { class: "pane" }, select, output, meta) };
  };
  const a = pane("a", wanted || models[0]), b = pane("b", "");
  const sample = async (p) => {
    if (!p.select.value) return;
    p.output.textContent = "…";
    p.meta.textContent = "";
    const reply = await call("POST", "/v1/chat/completions", {
      model: p.select.value,
      messages: [{ role: "user", content: prompt.value }],
      temperature: Number(temperature.value), max_tokens: Number(maxTokens.value), top_p: Number(topP.value),
    }, { bearer: true });
    const choice = reply.choices[0];
    p.output.textContent = choice.message.content || "";
    p.meta.textContent = `${choice.finish_reason} · ${reply.usage.completion_tokens} tokens`;
  };
  const run = el("button", { class: "primary", type: "button", id: "sample", onclick: () => {
    for (const p of [a, b]) sample(p).catch((error) => { p.output.textContent = ""; showError(error); });
  } }, "Sample");
  view(el("h1", {}, "Playground"), prompt,
    el("div", { class: "params" },
      el("label", {}, "temperature ", temperature), el("label", {}, "max tokens ", maxTokens),
      el("label", {}, "top p ", topP), run),
    el("div", { class: "panes" }, a.node, b.node));
}

// --- routing ------------------------------------------------------------------------------

async function route() {
  for (const t of timers) clearInterval(t);
  timers = [];
  const signedIn = Boolean(apiKey());
  document.getElementById("nav").hidden = !signedIn;
  if (!signedIn) return signIn();
  const who = document.getElementById("who");
  if (!who.textContent) api("GET", "/auth/apikey/me").then((me) => { who.textContent = me.name; }).catch(() => {});
  const parts = location.pathname.slice(BASE.length).split("/").filter(Boolean).map(decodeURIComponent);
  switch (parts[0] || "training_runs") {
    case "training_runs": return parts[1] ? runView(parts[1]) : runsView();
    case "checkpoints": return runView(parts[1], parts[2]);
    case "sessions": return sessionsView();
    case "keys": return keysView();
    case "playground": return playgroundView();
    case "status": return statusView();
    default: view(el("h1", {}, "Not found"), link(`${BASE}/training_runs`, "Training runs"));
  }
}

document.addEventListener("click", (event) => {
  const a = event.target.closest("a[data-nav]");
  if (!a || event.ctrlKey || event.metaKey) return;
  event.preventDefault();
  go(a.getAttribute("href"));
});
window.addEventListener("popstate", () => route().catch(showError));
document.getElementById("signout").addEventListener("click", () => {
  sessionStorage.removeItem(KEY);
  go(`${BASE}/`);
});
route().catch(showError);
