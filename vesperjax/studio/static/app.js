// Vesper Studio's front end: hash-routed pages over the JSON API (vesperjax/studio/app.py),
// uPlot charts fed by server-sent events. No build step, nothing fetched from a CDN.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => (
  { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
const fmt = (x, d = 4) => (x === null || x === undefined ? "–" :
  (typeof x !== "number" ? esc(x) : Number.isInteger(x) || Math.abs(x) >= 1000 ?
    x.toFixed(0) : x.toPrecision(d)));
// axis labels: 3 significant digits, exponent notation for small values (learning rates)
const tick = (u, vals) => vals.map((v) => (v === null ? "" : v !== 0 && Math.abs(v) < 0.01 ?
  v.toExponential(1) : +v.toPrecision(3)));
const COLORS = ["#6b3fa0", "#1e8e3e", "#1a73e8", "#e37400", "#c5221f", "#12a4af",
                "#9334e6", "#795548"];
let cleanup = [];  // what the current page must close when the route changes

async function api(path, body) {
  const opts = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body) };
  const r = await fetch(path, opts);
  const data = await r.json().catch(() => ({ error: `HTTP ${r.status}` }));
  if (!r.ok) throw new Error(data.error || `HTTP ${r.status}`);
  return data;
}

function stateBadge(s) { return `<span class="state ${esc(s)}">${esc(s)}</span>`; }

// ---- charts -------------------------------------------------------------------------
// A chart: series = [{label, key, run?}], drawn over step; values missing at a step are
// gaps bridged by the line (eval points are sparser than train points).
function makeChart(el, title, series, opts = {}) {
  const box = document.createElement("div");
  box.className = "chart";
  box.innerHTML = `<div class="title">${esc(title)}</div>`;
  el.appendChild(box);
  const width = () => Math.max(300, box.clientWidth - 12);
  const plot = new uPlot({
    width: width(), height: 220,
    scales: { x: { time: false }, y: { distr: opts.log ? 3 : 1 } },
    axes: [{ label: "step" }, { values: tick, size: 60 }],
    series: [{ label: "step" }, ...series.map((s, i) => ({
      label: s.label, stroke: s.color || COLORS[i % COLORS.length], width: 1.5,
      spanGaps: true, points: { show: !!s.points } }))],
  }, [[], ...series.map(() => [])], box);
  box.dataset.series = JSON.stringify(series.map((s) => s.label));
  return { box, plot, series, resize: () => plot.setSize({ width: width(), height: 220 }) };
}

// records: {run: [metric records]}; sets each chart's aligned data.
function drawCharts(charts, records) {
  for (const c of charts) {
    const steps = new Set();
    const rows = c.series.map((s) => {
      const m = new Map();
      for (const r of records[s.run || ""] || []) {
        const v = r[s.key];
        if (typeof v === "number" && isFinite(v)) { m.set(r.step, v); steps.add(r.step); }
      }
      return m;
    });
    const xs = [...steps].sort((a, b) => a - b);
    c.plot.setData([xs, ...rows.map((m) => xs.map((x) => (m.has(x) ? m.get(x) : null)))]);
    c.box.dataset.points = String(xs.length);
  }
}

const RUN_CHARTS = [
  ["loss", [["train", "loss"], ["eval", "eval_loss", true]]],
  ["perplexity", [["train", "perplexity"], ["eval", "eval_perplexity", true]], true],
  ["learning rate", [["lr", "learning_rate"]]],
  ["Velvet beta1", [["beta1", "b1"]]],
  ["Velvet scales", [["entropy scale", "entropy_scale"],
                     ["perplexity scale", "perplexity_scale"]]],
  ["gradient norm", [["grad norm", "grad_norm"]], true],
  ["tokens/s", [["tokens/s", "tokens_per_s"]]],
];

// ---- pages --------------------------------------------------------------------------
async function pageRuns(el) {
  el.innerHTML = `<h1>Runs</h1><div class="row"><button id="cmp" class="secondary">
    Compare selected</button><span class="muted">live: refreshed every 2 s</span></div>
    <table id="runs"></table>`;
  $("#cmp").onclick = () => {
    const names = [...el.querySelectorAll("input.pick:checked")].map((x) => x.value);
    location.hash = `#/compare?runs=${encodeURIComponent(names.join(","))}`;
  };
  const picked = new Set();
  async function refresh() {
    const rows = await api("/api/runs");
    el.querySelectorAll("input.pick:checked").forEach((x) => picked.add(x.value));
    el.querySelectorAll("input.pick:not(:checked)").forEach((x) => picked.delete(x.value));
    $("#runs").innerHTML = `<tr><th></th><th>run</th><th>kind</th><th>preset</th>
      <th>optimizer</th><th>step</th><th>train loss</th><th>eval loss</th>
      <th>tokens/s</th><th>state</th></tr>` + (rows.map((r) => `<tr data-run="${esc(r.name)}">
      <td><input type="checkbox" class="pick" value="${esc(r.name)}"
        ${picked.has(r.name) ? "checked" : ""}></td>
      <td><a href="#/run/${encodeURIComponent(r.name)}">${esc(r.name)}</a></td>
      <td>${esc(r.kind)}</td><td>${esc(r.preset)}</td><td>${esc(r.optimizer)}</td>
      <td class="num">${fmt(r.step)} / ${fmt(r.max_steps)}</td>
      <td class="num">${fmt(r.loss)}</td><td class="num">${fmt(r.eval_loss)}</td>
      <td class="num">${fmt(r.tokens_per_s)}</td>
      <td>${stateBadge(r.state)}${r.error ? ` <span class="error">${esc(r.error)}</span>` : ""}
      </td></tr>`).join("") || `<tr><td colspan="10" class="muted">No runs yet: start one
      from New run.</td></tr>`);
  }
  await refresh();
  const timer = setInterval(() => refresh().catch(() => {}), 2000);
  cleanup.push(() => clearInterval(timer));
}

async function pageRun(el, name) {
  const info = await api(`/api/runs/${encodeURIComponent(name)}`);
  el.innerHTML = `<h1>${esc(name)} <span id="state"></span></h1>
    <div class="row"><span id="progress" class="muted"></span>
      <button id="stop" class="secondary">Stop</button>
      <button id="resume" class="secondary">Resume</button>
      <a href="#/chat?run=${encodeURIComponent(name)}">Chat with it</a></div>
    <div id="msg" class="error"></div>
    <div id="bench"></div><div class="charts" id="charts"></div>
    <h2>Console <label class="muted"><input type="checkbox" id="follow" checked>
      auto-scroll</label></h2><pre class="console" id="console"></pre>
    <h2>Checkpoints</h2><div id="ckpts" class="muted"></div>
    <details><summary><h2 style="display:inline">Config</h2></summary>
      <pre id="config"></pre></details>`;
  $("#config").textContent = JSON.stringify(info.config, null, 2);
  $("#ckpts").textContent = info.checkpoints.length ? `latest: ${info.checkpoints.join(", ")}` +
    (info.best !== null ? `; best (lowest eval loss): ${info.best}` : "") : "none yet";
  const act = (what) => async () => {
    $("#msg").textContent = "";
    try { await api(`/api/runs/${encodeURIComponent(name)}/${what}`, {}); }
    catch (e) { $("#msg").textContent = e.message; }
  };
  $("#stop").onclick = act("stop");
  $("#resume").onclick = act("resume");
  const charts = RUN_CHARTS.map(([title, series, log]) => makeChart($("#charts"), title,
    series.map(([label, key, points]) => ({ label, key, points })), { log }));
  const records = { "": [] };
  let expertChart = null;
  let dirty = false;
  const redraw = () => {
    if (!dirty) return;
    dirty = false;
    const last = records[""][records[""].length - 1] || {};
    const experts = Object.keys(last).filter((k) => /^expert_load\/\d+$/.test(k));
    if (experts.length && !expertChart) {
      expertChart = makeChart($("#charts"), "MoE expert load (share of routed tokens)",
        experts.map((k) => ({ label: k.split("/")[1], key: k })));
      charts.push(expertChart);
    }
    drawCharts(charts, records);
  };
  const timer = setInterval(redraw, 500);
  const src = new EventSource(`/api/runs/${encodeURIComponent(name)}/events`);
  src.addEventListener("metrics", (e) => { records[""].push(...JSON.parse(e.data)); dirty = true; });
  src.addEventListener("metrics-reset", () => { records[""] = []; dirty = true; });
  src.addEventListener("console", (e) => {
    const box = $("#console");
    box.textContent += JSON.parse(e.data).join("\n") + "\n";
    if ($("#follow").checked) box.scrollTop = box.scrollHeight;
  });
  src.addEventListener("state", (e) => {
    const r = JSON.parse(e.data);
    $("#state").innerHTML = stateBadge(r.state);
    $("#progress").textContent = `step ${fmt(r.step)} / ${fmt(r.max_steps)}` +
      (r.error ? ` — ${r.error}` : "");
    $("#stop").disabled = r.state !== "running";
    $("#resume").disabled = r.state === "running" || r.state === "finished";
    if (r.kind === "benchmark" && r.state === "finished") showBenchmark(name);
  });
  const onResize = () => charts.forEach((c) => c.resize());
  window.addEventListener("resize", onResize);
  cleanup.push(() => { src.close(); clearInterval(timer);
                       window.removeEventListener("resize", onResize); });
}

async function showBenchmark(name) {
  const box = $("#bench");
  if (!box || box.dataset.done) return;
  box.dataset.done = "1";
  const [rep, info] = await Promise.all([api(`/api/runs/${encodeURIComponent(name)}/benchmark`),
                                         api(`/api/runs/${encodeURIComponent(name)}`)]);
  box.innerHTML = `<h2>Result</h2><pre id="bench-table"></pre>` + info.plots.map((p) =>
    `<img class="plot" alt="${esc(p)}" src="/api/runs/${encodeURIComponent(name)}/plots/${
      encodeURIComponent(p)}">`).join("");
  $("#bench-table").textContent = rep.table;
}

async function pageCompare(el, params) {
  const all = await api("/api/runs");
  const chosen = (params.get("runs") || "").split(",").filter(Boolean);
  el.innerHTML = `<h1>Compare</h1><div class="row">${all.filter((r) => r.kind === "train")
    .map((r) => `<label><input type="checkbox" class="pick" value="${esc(r.name)}"
    ${chosen.includes(r.name) ? "checked" : ""}> ${esc(r.name)}</label>`).join(" ")}
    <button id="go" class="secondary">Overlay</button></div><div class="charts" id="charts"></div>`;
  $("#go").onclick = () => {
    const names = [...el.querySelectorAll("input.pick:checked")].map((x) => x.value);
    location.hash = `#/compare?runs=${encodeURIComponent(names.join(","))}`;
  };
  if (!chosen.length) return;
  const records = {};
  await Promise.all(chosen.map(async (n) => {
    records[n] = await api(`/api/runs/${encodeURIComponent(n)}/metrics`); }));
  const per = (key, points) => chosen.map((n, i) => ({ label: n, key, run: n, points,
                                                        color: COLORS[i % COLORS.length] }));
  const charts = [["train loss", "loss"], ["eval loss", "eval_loss", true],
                  ["train perplexity", "perplexity", false, true], ["learning rate", "learning_rate"],
                  ["gradient norm", "grad_norm", false, true], ["tokens/s", "tokens_per_s"]]
    .map(([title, key, points, log]) => makeChart($("#charts"), title, per(key, points), { log }));
  drawCharts(charts, records);
}

function field(label, html) { return `<label for="${label.id}">${esc(label.text)}</label>${html}`; }

async function pageForm(el, kind) {
  const opt = await api("/api/options");
  const datasets = [`<option value="stdlib">stdlib (the embedded corpus)</option>`,
    ...opt.datasets.map((d) => `<option value="${esc(d.name)}">${esc(d.name)}</option>`)];
  const bench = kind === "benchmark";
  el.innerHTML = `<h1>${bench ? "Velvet vs AdamW" : "New run"}</h1>
    <form class="grid" id="form">
    ${field({ id: "name", text: "run name" }, `<input id="name" required
      value="${bench ? "bench" : "run"}-${Date.now().toString(36)}">`)}
    ${field({ id: "dataset", text: "dataset" }, `<select id="dataset">${datasets.join("")}</select>`)}
    ${field({ id: "tokenizer", text: "tokenizer" }, `<input id="tokenizer" value="bpe:8192">`)}
    ${field({ id: "preset", text: "model preset" }, `<select id="preset">${opt.presets.map((p) =>
      `<option>${esc(p)}</option>`).join("")}</select>`)}
    ${field({ id: "model", text: "model overrides" }, `<input id="model"
      placeholder="hidden_size=128, num_layers=2">`)}
    ${bench ? field({ id: "arms", text: "arms" }, opt.arms.map((a) => `<label><input
      type="checkbox" class="arm" value="${esc(a)}" ${["velvet", "adamw"].includes(a) ?
      "checked" : ""}> ${esc(a)}</label>`).join("<br>")) :
      field({ id: "optimizer", text: "optimizer" }, `<select id="optimizer">${opt.optimizers
        .map((o) => `<option>${esc(o)}</option>`).join("")}</select>`)}
    ${field({ id: "steps", text: "steps" }, `<input id="steps" type="number" value="${bench ? 100 : 150}">`)}
    ${field({ id: "batch_size", text: "batch size" }, `<input id="batch_size" type="number" value="8">`)}
    ${field({ id: "seq_len", text: "sequence length" }, `<input id="seq_len" type="number" value="256">`)}
    ${bench ? field({ id: "lrs", text: "learning rates" }, `<input id="lrs" value="1e-3,2e-3">`) +
      field({ id: "seeds", text: "seeds" }, `<input id="seeds" type="number" value="1">`) :
      field({ id: "lr", text: "learning rate" }, `<input id="lr" value="1e-3">`)}
    <span></span><button id="start">${bench ? "Run the benchmark" : "Start training"}</button>
    </form><div id="msg" class="error"></div>`;
  $("#form").onsubmit = async (e) => {
    e.preventDefault();
    const v = (id) => $(`#${id}`).value.trim();
    const model = {};
    for (const part of v("model").split(",").map((s) => s.trim()).filter(Boolean)) {
      const [k, val] = part.split("=").map((s) => s.trim());
      model[k] = val === "true" ? true : val === "false" ? false :
        (val !== "" && !isNaN(Number(val)) ? Number(val) : val);
    }
    const body = { name: v("name"), dataset: v("dataset"), tokenizer: v("tokenizer"),
      preset: v("preset"), model, steps: Number(v("steps")), batch_size: Number(v("batch_size")),
      seq_len: Number(v("seq_len")) };
    if (bench) {
      Object.assign(body, { lrs: v("lrs").split(",").map((s) => s.trim()).filter(Boolean),
        seeds: Number(v("seeds")),
        arms: [...el.querySelectorAll("input.arm:checked")].map((x) => x.value) });
    } else {
      Object.assign(body, { optimizer: v("optimizer"), lr: v("lr") });
    }
    $("#msg").textContent = "";
    try {
      const r = await api(`/api/jobs/${bench ? "benchmark" : "train"}`, body);
      location.hash = `#/run/${encodeURIComponent(r.name)}`;
    } catch (err) { $("#msg").textContent = err.message; }
  };
}

async function pageChat(el, params) {
  const all = (await api("/api/runs")).filter((r) => r.kind === "train");
  const want = params.get("run");
  el.innerHTML = `<h1>Chat</h1><div class="row">
    <select id="run">${all.map((r) => `<option ${r.name === want ? "selected" : ""}>${esc(r.name)}
      </option>`).join("")}</select>
    <select id="checkpoint"><option>latest</option><option>best</option></select>
    <label>temperature <input id="temperature" size="4" value="0.8"></label>
    <label>top-k <input id="top_k" size="4" value="40"></label>
    <label>top-p <input id="top_p" size="4" value="0.95"></label>
    <label>max tokens <input id="max_tokens" size="5" value="100"></label></div>
    <textarea id="prompt" rows="4" cols="90" placeholder="def "></textarea>
    <div class="row"><button id="send">Generate</button><span id="stats" class="muted"></span></div>
    <div id="msg" class="error"></div><pre class="chat-out" id="out"></pre>`;
  $("#send").onclick = async () => {
    const v = (id) => $(`#${id}`).value;
    const body = { run: v("run"), checkpoint: v("checkpoint"), prompt: v("prompt") || "def ",
      temperature: v("temperature"), top_k: v("top_k"), top_p: v("top_p"),
      max_tokens: v("max_tokens") };
    $("#msg").textContent = ""; $("#stats").textContent = "loading the model…";
    $("#out").textContent = body.prompt;
    $("#send").disabled = true;
    try { await streamChat(body); } catch (e) { $("#msg").textContent = e.message; }
    $("#send").disabled = false;
  };
}

async function streamChat(body) {
  const r = await fetch("/api/chat", { method: "POST", body: JSON.stringify(body),
                                       headers: { "Content-Type": "application/json" } });
  if (!r.ok) throw new Error((await r.json().catch(() => ({}))).error || `HTTP ${r.status}`);
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const chunk = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      const event = /^event: (.*)$/m.exec(chunk)[1];
      const data = JSON.parse(/^data: (.*)$/m.exec(chunk)[1]);
      if (event === "text") { $("#out").textContent += data; $("#stats").textContent = "generating…"; }
      else if (event === "error") throw new Error(data);
      else if (event === "done") {
        $("#stats").textContent = `${data.tokens} tokens in ${data.seconds.toFixed(2)} s ` +
          `(checkpoint step ${data.step})`;
      }
    }
  }
}

// ---- routing ------------------------------------------------------------------------
async function route() {
  cleanup.forEach((f) => f());
  cleanup = [];
  const el = $("#page");
  const [path, query] = (location.hash.slice(1) || "/").split("?");
  const params = new URLSearchParams(query || "");
  el.innerHTML = "";
  try {
    if (path.startsWith("/run/")) await pageRun(el, decodeURIComponent(path.slice(5)));
    else if (path === "/compare") await pageCompare(el, params);
    else if (path === "/new") await pageForm(el, "train");
    else if (path === "/benchmark") await pageForm(el, "benchmark");
    else if (path === "/chat") await pageChat(el, params);
    else await pageRuns(el);
  } catch (e) {
    el.innerHTML = `<div class="error">${esc(e.message)}</div>`;
  }
}
window.addEventListener("hashchange", route);
if (location.search.includes("token=")) history.replaceState(null, "", "/" + location.hash);
route();
