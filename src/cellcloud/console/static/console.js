// cellcloud console: a small vanilla-JS page per hash route, drawn from /console/api/… reads.
// No framework, no CDN; charts and the region map are inline SVG drawn here. Data is only
// ever put into the page as text nodes (never as HTML).
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const REFRESH_MS = 2000; // the metrics page's sampling period
const PAGE_REFRESH_MS = 5000; // other pages (each refresh reads every agent's full status)
const HISTORY_MAX = 90; // samples each chart keeps (3 minutes at REFRESH_MS)

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "text") e.textContent = String(v);
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function svg(tag, attrs, ...children) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "text") e.textContent = String(v);
    else e.setAttribute(k, String(v));
  }
  for (const c of children.flat()) if (c) e.append(c);
  return e;
}

function table(id, caption, headers, rows) {
  return el("table", {id},
    caption ? el("caption", {class: "muted", text: caption}) : null,
    el("thead", {}, el("tr", {}, headers.map(h => el("th", {scope: "col", text: h})))),
    el("tbody", {}, rows.map(r => el("tr", {}, r.map(c => el("td", {}, c))))));
}

async function api(what, query) {
  const q = query ? "?" + new URLSearchParams(query).toString() : "";
  const r = await fetch("/console/api/" + what + q, {credentials: "same-origin",
                                                      cache: "no-store"});
  if (r.status === 403) { window.location.assign("/console/login"); throw new Error("login"); }
  const doc = await r.json();
  if (!r.ok) throw new Error(doc.message || ("HTTP " + r.status));
  return doc;
}

function fmt(n, digits) {
  if (n === null || n === undefined || Number.isNaN(n)) return "–";
  return Number(n).toFixed(digits === undefined ? 0 : digits);
}

function setTitle(text) {
  document.getElementById("page-title").textContent = text;
  document.title = text + " · cellcloud console";
}

function stamp() {
  document.getElementById("updated").textContent =
    "Updated " + new Date().toLocaleTimeString();
}

// ---- the region map (also drawn on a function's page with its shard) ---------------------------
function drawMap(region, shard) {
  const inShard = new Set(shard ? shard.agents : []);
  const agentW = 220, gap = 16, pad = 14, envH = 18, cellGap = 24;
  let y = 10;
  let width = 400;
  const groups = [];
  for (const cell of region.cells) {
    const agents = cell.agents;
    const rows = Math.max(1, ...agents.map(a => a.envs.length));
    const agentH = 56 + rows * envH;
    const cellW = pad * 2 + Math.max(1, agents.length) * (agentW + gap) - gap;
    const cellH = 34 + agentH + pad;
    width = Math.max(width, cellW + 20);
    const g = svg("g", {transform: `translate(10, ${y})`});
    g.append(svg("rect", {x: 0, y: 0, width: cellW, height: cellH, rx: 6,
                          fill: "#f4f5f7", stroke: "#767676"}));
    g.append(svg("text", {x: pad, y: 22, "font-weight": 700, fill: "#1a1a1a",
                          text: `cell ${cell.cell_id}` + (cell.error ? ` — ${cell.error}` : "")
                            + (cell.k ? `  (shards of ${cell.k}, ${cell.sharding})` : "")}));
    agents.forEach((a, i) => {
      const x = pad + i * (agentW + gap);
      const failed = a.state === "failed";
      const picked = inShard.has(a.agent_id) && shard && shard.cell_id === cell.cell_id;
      const ag = svg("g", {transform: `translate(${x}, 34)`, "data-agent": a.agent_id,
                           "data-state": a.state, class: picked ? "in-shard" : ""});
      ag.append(svg("rect", {x: 0, y: 0, width: agentW, height: agentH, rx: 4,
                             fill: failed ? "#fde8ea" : "#ffffff",
                             stroke: picked ? "#6a1b9a" : (failed ? "#a00018" : "#767676"),
                             "stroke-width": picked ? 4 : 1.5,
                             "stroke-dasharray": failed ? "6 4" : "none"}));
      ag.append(svg("text", {x: 8, y: 18, "font-weight": 700, fill: "#1a1a1a",
                             text: a.agent_id}));
      ag.append(svg("text", {x: 8, y: 36, fill: failed ? "#a00018" : "#1b5e20",
                             "font-weight": 700,
                             text: (failed ? "FAILED" : "up") + (picked ? " · in shard" : "")}));
      ag.append(svg("text", {x: 8, y: 50, fill: "#4a4a4a", "font-size": 12,
                             text: a.status_error ? `no status: ${a.status_error}` :
                               `${a.envs.length} environment(s)`}));
      a.envs.forEach((e, j) => {
        const mine = shard && shard.key === `${e.account}/${e.function}`;
        ag.append(svg("rect", {x: 8, y: 56 + j * envH, width: agentW - 16, height: envH - 3,
                               fill: e.busy ? "#dbe8fb" : "#eef7ee",
                               stroke: mine ? "#6a1b9a" : "#767676",
                               "stroke-width": mine ? 2.5 : 1}));
        ag.append(svg("text", {x: 12, y: 56 + j * envH + 12, "font-size": 11, fill: "#1a1a1a",
                               text: `${e.function} pid ${e.pid}${e.busy ? " busy" : ""}`}));
      });
      g.append(ag);
    });
    groups.push(g);
    y += cellH + cellGap;
  }
  const label = "Region map: " + region.cells.map(c => `cell ${c.cell_id} with agents ` +
    c.agents.map(a => `${a.agent_id} ${a.state}`).join(", ")).join("; ") +
    (shard ? `; shard of the chosen function: ${shard.agents.join(", ")}` : "");
  return svg("svg", {viewBox: `0 0 ${width} ${y}`, width, height: y, role: "img",
                     "aria-label": label, id: "region-map"},
             svg("title", {text: label}), ...groups);
}

function agentTable(region) {
  const rows = [];
  for (const c of region.cells) for (const a of c.agents) {
    rows.push([c.cell_id, a.agent_id,
      el("span", {class: "state-" + a.state, id: "agent-state-" + a.agent_id, text: a.state}),
      a.backend || "–", a.status_error ? "–" : String(a.envs.length), a.status_error || ""]);
  }
  return table("agents", "cells and agents",
               ["cell", "agent", "state", "backend", "environments", "status read"], rows);
}

function envTable(region) {
  const rows = [];
  for (const c of region.cells) for (const a of c.agents) for (const e of a.envs) {
    rows.push([a.agent_id, e.env_id, e.function, e.account || "–", e.version || "–",
               String(e.pid), e.busy ? "busy" : "idle", String(e.invocations)]);
  }
  return table("environments", "environments",
               ["agent", "environment", "function", "account", "version", "pid", "state",
                "invocations"], rows);
}

const state = {route: "", timer: null, history: [], shardPick: "", metricsPick: ""};

async function pageMap(root) {
  setTitle("Region map");
  const body = el("div", {id: "map-body", class: "map"});
  const pick = el("select", {id: "shard-pick", onchange: () => {
    state.shardPick = pick.value; refresh();
  }});
  root.append(el("div", {class: "controls"},
    el("label", {for: "shard-pick", text: "Draw a function's shuffle shard"}), pick), body);
  async function refresh() {
    const region = await api("region");
    const keys = [];
    for (const c of region.cells) for (const k of Object.keys(c.shards)) keys.push([c, k]);
    const want = ["", ...keys.map(([, k]) => k)];
    if (pick.options.length !== want.length ||
        [...pick.options].some((o, i) => o.value !== want[i])) {
      pick.replaceChildren(el("option", {value: "", text: "(none)"}),
        ...keys.map(([, k]) => el("option", {value: k, text: k})));
      pick.value = state.shardPick;
    }
    let shard = null;
    for (const [c, k] of keys) if (k === state.shardPick) {
      shard = {cell_id: c.cell_id, agents: c.shards[k], key: k};
    }
    body.replaceChildren(drawMap(region, shard),
      el("p", {id: "shard-text", text: shard ? `Shard of ${state.shardPick}: ` +
               shard.agents.join(", ") : "Pick a function to draw its shard."}),
      el("h2", {text: "Agents"}), agentTable(region),
      el("h2", {text: "Environments"}), envTable(region));
    stamp();
  }
  await refresh();
  return refresh;
}

// ---- metrics: counters sampled every REFRESH_MS, rates computed here ---------------------------
function pickRow(summary, key) {
  if (!key) return summary.totals;
  return summary.functions.find(f => `${f.account}/${f.function}` === key) || null;
}

function rates(history, key) {
  const out = {inv: [], lat: [], err: [], thr: []};
  for (let i = 1; i < history.length; i++) {
    const a = pickRow(history[i - 1].doc, key), b = pickRow(history[i].doc, key);
    if (!a || !b) continue;
    const dt = (history[i].t - history[i - 1].t) / 1000;
    if (dt <= 0) continue;
    const t = history[i].t;
    const dInv = Math.max(0, b.invocations - a.invocations); // a restart resets counters
    const dCount = Math.max(0, b.duration_count - a.duration_count);
    const dSum = Math.max(0, b.duration_sum_s - a.duration_sum_s);
    out.inv.push([t, dInv / dt]);
    out.lat.push([t, dCount > 0 ? 1000 * dSum / dCount : null]);
    out.err.push([t, Math.max(0, b.errors - a.errors) / dt]);
    out.thr.push([t, Math.max(0, b.throttles - a.throttles) / dt]);
  }
  return out;
}

function lineChart(id, title, unit, series) {
  const W = 460, H = 200, L = 52, R = 10, T = 12, B = 28;
  const now = Date.now(), span = HISTORY_MAX * REFRESH_MS;
  let ymax = 0;
  for (const s of series) for (const [, v] of s.points) if (v !== null) ymax = Math.max(ymax, v);
  ymax = ymax > 0 ? ymax * 1.15 : 1;
  const X = t => L + (W - L - R) * (1 - (now - t) / span);
  const Y = v => T + (H - T - B) * (1 - v / ymax);
  const parts = [svg("rect", {x: L, y: T, width: W - L - R, height: H - T - B, fill: "#ffffff",
                              stroke: "#767676"})];
  for (const f of [0, 0.5, 1]) {
    const v = ymax * f;
    parts.push(svg("line", {x1: L, x2: W - R, y1: Y(v), y2: Y(v), stroke: "#d0d0d0"}));
    parts.push(svg("text", {x: L - 6, y: Y(v) + 4, "text-anchor": "end", "font-size": 11,
                            fill: "#1a1a1a", text: fmt(v, v < 10 ? 2 : 0)}));
  }
  parts.push(svg("text", {x: L, y: H - 8, "font-size": 11, fill: "#1a1a1a",
                          text: `last ${span / 60000} min`}));
  parts.push(svg("text", {x: W - R, y: H - 8, "font-size": 11, fill: "#1a1a1a",
                          "text-anchor": "end", text: "now"}));
  const latest = [];
  series.forEach((s, i) => {
    const pts = s.points.filter(([t, v]) => v !== null && now - t <= span);
    if (pts.length) {
      parts.push(svg("polyline", {fill: "none", stroke: s.color, "stroke-width": 2,
        points: pts.map(([t, v]) => `${X(t).toFixed(1)},${Y(v).toFixed(1)}`).join(" ")}));
      latest.push(`${s.name} ${fmt(pts[pts.length - 1][1], 2)} ${unit}`);
    }
    parts.push(svg("text", {x: L + 6 + i * 120, y: T + 14, "font-size": 11, fill: s.color,
                            "font-weight": 700, text: s.name}));
  });
  const label = `${title}: ` + (latest.length ? latest.join(", ") : "no samples yet");
  return el("figure", {class: "chart", id},
    el("figcaption", {text: title}),
    svg("svg", {viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img",
                "aria-label": label}, svg("title", {text: label}), ...parts),
    el("p", {class: "muted", id: id + "-latest", text: label}));
}

async function pageMetrics(root) {
  setTitle("Metrics");
  const pick = el("select", {id: "metrics-pick", onchange: () => {
    state.metricsPick = pick.value; draw();
  }});
  const charts = el("div", {class: "charts", id: "charts"});
  const tableBox = el("div", {id: "metrics-table"});
  root.append(el("p", {class: "muted", text:
      "From the region's /metrics (Prometheus counters of every cell), sampled every " +
      `${REFRESH_MS / 1000} s; rates are the difference between two samples.`}),
    el("div", {class: "controls"},
       el("label", {for: "metrics-pick", text: "Show"}), pick), charts, tableBox);
  function draw() {
    const r = rates(state.history, state.metricsPick);
    charts.replaceChildren(
      lineChart("chart-rate", "Invocations per second", "/s",
                [{name: "invocations", color: "#0b4f9c", points: r.inv}]),
      lineChart("chart-latency", "Mean latency (ms)", "ms",
                [{name: "latency", color: "#6a1b9a", points: r.lat}]),
      lineChart("chart-errors", "Errors and throttles per second", "/s",
                [{name: "errors", color: "#a00018", points: r.err},
                 {name: "throttles", color: "#8a4b00", points: r.thr}]));
  }
  async function refresh() {
    const doc = await api("metrics");
    state.history.push({t: Date.now(), doc});
    if (state.history.length > HISTORY_MAX) state.history.shift();
    const keys = ["", ...doc.functions.map(f => `${f.account}/${f.function}`)];
    if (pick.options.length !== keys.length ||
        [...pick.options].some((o, i) => o.value !== keys[i])) {
      pick.replaceChildren(el("option", {value: "", text: "whole region"}),
        ...keys.slice(1).map(k => el("option", {value: k, text: k})));
      pick.value = state.metricsPick;
    }
    draw();
    tableBox.replaceChildren(el("h2", {text: "Per function (totals since the cells started)"}),
      table("metrics-functions", null,
        ["account", "function", "invocations", "errors", "throttles", "cold starts",
         "mean latency (ms)", "in flight", "async queued"],
        doc.functions.map(f => [f.account, f.function, fmt(f.invocations), fmt(f.errors),
          fmt(f.throttles), fmt(f.cold_starts),
          f.duration_count ? fmt(1000 * f.duration_sum_s / f.duration_count, 1) : "–",
          fmt(f.concurrent), fmt(f.async_depth)])),
      el("p", {}, `Agents: ${fmt(doc.agents)}, failed: ${fmt(doc.agents_failed)}; ` +
        "environments: " + (Object.entries(doc.environments).map(([k, v]) => `${k} ${fmt(v)}`)
                              .join(", ") || "none")));
    stamp();
  }
  await refresh();
  return refresh;
}

// ---- functions -----------------------------------------------------------------------------
async function pageFunctions(root) {
  setTitle("Functions");
  const box = el("div", {id: "functions-body"});
  root.append(box);
  async function refresh() {
    const doc = await api("functions");
    box.replaceChildren(table("functions", null,
      ["account", "function", "runtime", "memory (MB)", "last modified"],
      doc.functions.map(f => [f.account,
        el("a", {href: `#/function/${f.account}/${encodeURIComponent(f.name)}`,
                 id: `fn-link-${f.name}`, text: f.name}),
        f.runtime || f.package_type || "–", fmt(f.memory_mb), f.last_modified || "–"])));
    stamp();
  }
  await refresh();
  return refresh;
}

async function pageFunction(root, account, name) {
  setTitle(`Function ${name}`);
  const box = el("div", {id: "function-body"});
  root.append(box);
  async function refresh() {
    const d = await api("function", {account, name});
    const c = d.configuration || {};
    const m = d.metrics || {};
    box.replaceChildren(
      el("dl", {class: "kv", id: "fn-config"},
        ...[["account", d.account], ["runtime", c.Runtime || c.PackageType],
            ["handler", c.Handler], ["memory", `${c.MemorySize} MB`],
            ["timeout", `${c.Timeout} s`], ["code SHA-256", c.CodeSha256],
            ["state", c.State], ["last modified", c.LastModified],
            ["dead-letter queue", (c.DeadLetterConfig || {}).TargetArn || "none"]]
          .flatMap(([k, v]) => [el("dt", {text: k}), el("dd", {text: v === undefined ? "–" : v})])),
      el("h2", {text: "Invocations"}),
      el("p", {}, el("span", {class: "big", id: "fn-invocations", text: fmt(m.invocations || 0)}),
        " invocations, ", el("span", {id: "fn-errors", text: fmt(m.errors || 0)}), " errors, ",
        el("span", {id: "fn-throttles", text: fmt(m.throttles || 0)}), " throttles, ",
        el("span", {id: "fn-cold", text: fmt(m.cold_starts || 0)}), " cold starts; mean ",
        el("span", {id: "fn-latency", text: m.duration_count ?
          fmt(1000 * m.duration_sum_s / m.duration_count, 1) : "–"}), " ms"),
      el("h2", {text: "Shuffle shard"}),
      el("p", {id: "fn-shard", text: d.shard ?
        `cell ${d.shard.cell_id}: agents ${d.shard.agents.join(", ")}` :
        "not placed yet (no invocation so far)"}),
      el("div", {class: "map"}, drawMap(d.region, d.shard)),
      el("h2", {text: "Versions"}),
      table("fn-versions", null, ["version", "description", "code SHA-256", "last modified"],
        d.versions.map(v => [v.version, v.description || "", v.code_sha256 || "",
                             v.last_modified || ""])),
      el("h2", {text: "Aliases"}),
      d.aliases.length ? table("fn-aliases", null, ["alias", "version", "weights"],
        d.aliases.map(a => [a.name, a.version, a.weights ? JSON.stringify(a.weights) : ""]))
        : el("p", {class: "muted", id: "fn-aliases", text: "no aliases"}),
      el("h2", {text: "Recent invocations and their logs"}),
      el("p", {class: "error", text: d.logs_error || ""}),
      el("div", {id: "fn-logs"}, d.invocations.length ? d.invocations.map(inv =>
        el("section", {class: "invocation"},
          el("h3", {}, el("code", {text: inv.request_id || "(no request id)"}), " ",
            el("span", {class: "muted", text: new Date(inv.timestamp).toISOString()})),
          el("pre", {text: inv.lines.join("\n")})))
        : el("p", {class: "muted", text: "no invocation logged yet"})));
    stamp();
  }
  await refresh();
  return refresh;
}

// ---- queues --------------------------------------------------------------------------------
async function pageQueues(root) {
  setTitle("Queues");
  const box = el("div", {id: "queues-body"});
  root.append(box);
  async function refresh() {
    const d = await api("queues");
    const backlog = [];
    for (const c of d.cells) for (const b of c.backlog) {
      backlog.push([c.cell_id, b.account, b.function, String(b.queued), String(b.in_flight),
                    fmt(b.oldest_age_ms / 1000, 1)]);
    }
    box.replaceChildren(
      el("h2", {text: "Async invocations (each cell's durable intake)"}),
      table("async-cells", null, ["cell", "accepted", "shed", "error"],
        d.cells.map(c => [c.cell_id, fmt(c.accepted), fmt(c.shed), c.error || ""])),
      table("async-backlog", "backlog per function",
        ["cell", "account", "function", "queued", "in flight", "oldest (s)"], backlog),
      el("h2", {text: "SQS queues"}),
      d.errors.map(x => el("p", {class: "error", text: `account ${x.account}: ${x.error}`})),
      table("sqs-queues", null,
        ["account", "queue", "visible", "in flight", "delayed", "dead-letter queue",
         "dead-letter queue of"],
        d.queues.map(q => [q.account, q.name, String(q.visible), String(q.in_flight),
          String(q.delayed), q.dead_letter_target || "–",
          q.dead_letter_for.length ? q.dead_letter_for.join(", ") : "–"])),
      el("h2", {text: "Functions' dead-letter queues"}),
      table("function-dlqs", null, ["account", "function", "target"],
        d.dead_letter_configs.map(x => [x.account, x.function, x.target])));
    stamp();
  }
  await refresh();
  return refresh;
}

// ---- the store colony ----------------------------------------------------------------------
async function pageStore(root) {
  setTitle("Configuration store");
  const box = el("div", {id: "store-body"});
  const cellBox = el("div", {id: "store-cell"});
  const input = el("input", {id: "store-cell-name", type: "text", name: "cell",
                             autocomplete: "off"});
  const form = el("form", {class: "controls", onsubmit: async (ev) => {
    ev.preventDefault();
    state.storeCell = input.value.trim();
    await refresh();
  }}, el("label", {for: "store-cell-name", text: "Store cell"}), input,
     el("button", {type: "submit", id: "store-cell-show", text: "Show replicas"}));
  root.append(box, form, cellBox);
  async function refresh() {
    const d = await api("store", state.storeCell ? {cell: state.storeCell} : null);
    if (!d.configured) {
      box.replaceChildren(el("p", {id: "store-none", text:
        "This region's router was started without a store colony (cellcloud up " +
        "--store-colony FILE); its control plane keeps its configuration in SQLite."}));
      form.hidden = true;
      return;
    }
    box.replaceChildren(el("h2", {text: "Nodes"}), table("store-nodes", null,
      ["node", "address", "zone", "rack", "health", "cells", "loaded", "requests",
       "fsync batches", "bad HMAC"],
      d.nodes.map(n => [n.node, n.address, n.labels.zone || "–", n.labels.rack || "–",
        el("span", {class: n.up ? "state-up" : "state-failed", id: "store-node-" + n.node,
                    text: n.up ? "up" : "down"}),
        fmt(n.cells), fmt(n.loaded), fmt(n.requests), fmt(n.fsync_batches),
        fmt(n.bad_hmac)])));
    if (d.cell) {
      cellBox.replaceChildren(el("h2", {text: `Cell ${d.cell.name}`}),
        d.cell.error ? el("p", {class: "error", id: "store-cell-error", text: d.cell.error}) :
        table("store-replicas", null, ["node", "health", "role", "ballot", "commit index",
                                       "members"],
          d.cell.replicas.map(r => [r.node,
            el("span", {class: r.up ? "state-up" : "state-failed",
                        text: r.up ? "up" : "unreachable"}),
            r.role || "–", r.ballot ? JSON.stringify(r.ballot) : "–", fmt(r.commit_index),
            (r.members || []).join(" ")])));
    }
    stamp();
  }
  await refresh();
  return refresh;
}

// ---- routing -------------------------------------------------------------------------------
async function route() {
  const hash = window.location.hash || "#/map";
  const parts = hash.slice(2).split("/").map(decodeURIComponent);
  if (state.timer) { clearInterval(state.timer); state.timer = null; }
  const root = document.getElementById("page");
  root.replaceChildren();
  for (const a of document.querySelectorAll("nav a")) {
    if (a.getAttribute("href") === "#/" + parts[0] ||
        (parts[0] === "function" && a.id === "nav-functions")) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  const token = {};
  state.route = token;
  let refresh;
  try {
    if (parts[0] === "metrics") refresh = await pageMetrics(root);
    else if (parts[0] === "functions") refresh = await pageFunctions(root);
    else if (parts[0] === "function") refresh = await pageFunction(root, parts[1], parts[2]);
    else if (parts[0] === "queues") refresh = await pageQueues(root);
    else if (parts[0] === "store") refresh = await pageStore(root);
    else refresh = await pageMap(root);
  } catch (e) {
    root.append(el("p", {class: "error", role: "alert", text: String(e.message || e)}));
    return;
  }
  if (state.route !== token) return;
  state.timer = setInterval(() => {
    refresh().catch(e => {
      document.getElementById("updated").textContent = "Update failed: " + (e.message || e);
    });
  }, parts[0] === "metrics" ? REFRESH_MS : PAGE_REFRESH_MS);
}

window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", route);
