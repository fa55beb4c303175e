// meshnode console: speaks the MASQ UI protocol over the node's own websocket.
//
// Live view: the `status` opcode once a second (one request at a time), plus the
// `shuttingDown` broadcast. Shut down: the `shutdown` opcode with {"report": true}. Once the
// node is known to be going down, the page stops polling, checks once that the node stopped
// answering, and waits for a person to ask again: no loop runs against a stopped node. A
// connection lost for no known reason is retried with a growing pause (1 s doubling to 15 s).
"use strict";

(function () {
  const SUBPROTOCOL = "MASQNode-UIv2";
  const POLL_MS = 1000;
  const REQUEST_TIMEOUT_MS = 5000;
  // As masq: a shutdown answer may take the node's whole deadline.
  const SHUTDOWN_TIMEOUT_MS = 60000;
  const RETRY_FIRST_MS = 1000;
  const RETRY_MAX_MS = 15000;
  // Past this many nodes the graph labels only this node (the rest would overlap).
  const MAX_LABELS = 24;

  const $ = (id) => document.getElementById(id);
  const SVG = "http://www.w3.org/2000/svg";

  const st = {
    ws: null,
    nextContext: 1,
    pending: new Map(),
    pollTimer: null,
    retryTimer: null,
    retryMs: RETRY_FIRST_MS,
    status: null,
    // "connecting" | "login" | "running" | "shuttingDown" | "stopped" | "unreachable"
    phase: "connecting",
    goingDown: null,
    // Set once this page has asked for the shutdown: no more polling.
    asked: false,
    report: null,
    guarded: false,
  };

  // ---------- small helpers ----------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else if (k.startsWith("data-")) node.setAttribute(k, v);
      else node[k] = v;
    }
    for (const c of children) node.append(c);
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    return node;
  }

  const short = (id) => String(id || "").slice(0, 8);
  const clock = () => new Date().toLocaleTimeString();
  const words = (camel) => camel.replace(/([A-Z])/g, " $1").toLowerCase();

  function setPhase(phase, text) {
    st.phase = phase;
    const badge = $("phase");
    badge.dataset.phase = phase;
    badge.textContent = text || words(phase);
    const live = phase === "running";
    $("shutdown").disabled = !live || st.report !== null;
  }

  function banner(kind, text) {
    const b = $("banner");
    if (!text) {
      b.hidden = true;
      return;
    }
    b.dataset.kind = kind;
    b.textContent = text;
    b.hidden = false;
  }

  // ---------- connection ----------

  // fetch, given up after REQUEST_TIMEOUT_MS: a node that accepts but never answers (frozen,
  // say) must not hold the page.
  async function fetchWithin(url, options) {
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), REQUEST_TIMEOUT_MS);
    try {
      return await fetch(url, Object.assign({ signal: abort.signal, credentials: "same-origin" }, options));
    } finally {
      clearTimeout(timer);
    }
  }

  function wsUrl() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    return scheme + "//" + location.host + "/";
  }

  // Asks over plain HTTP first: it tells "wants the token" (401) from "not answering", which a
  // browser's WebSocket cannot.
  async function start() {
    clearTimeout(st.retryTimer);
    st.retryTimer = null;
    setPhase("connecting");
    let response;
    try {
      response = await fetchWithin("/status", { cache: "no-store" });
    } catch (e) {
      unreachable();
      return;
    }
    if (response.status === 401) {
      showLogin(null);
      return;
    }
    if (!response.ok) {
      let message = "HTTP " + response.status;
      try {
        const body = await response.json();
        if (body.error) message = body.error.message;
      } catch (e) { /* not JSON */ }
      if (st.goingDown || st.report) {
        stopped("The node stopped: " + message + ".");
      } else {
        unreachable("The node answered: " + message + ".");
      }
      return;
    }
    try {
      render(await response.json());
    } catch (e) { /* the websocket's answer follows */ }
    openSocket();
  }

  function openSocket() {
    let ws;
    try {
      ws = new WebSocket(wsUrl(), SUBPROTOCOL);
    } catch (e) {
      unreachable();
      return;
    }
    st.ws = ws;
    // A handshake that never finishes counts as a lost connection.
    const opening = setTimeout(() => ws.close(), REQUEST_TIMEOUT_MS);
    ws.onopen = () => {
      clearTimeout(opening);
      st.retryMs = RETRY_FIRST_MS;
      $("login").hidden = true;
      $("live").hidden = false;
      if (!st.goingDown) banner(null, null);
      poll();
    };
    ws.onmessage = (event) => receive(event.data);
    ws.onclose = () => {
      clearTimeout(opening);
      closed(ws);
    };
    ws.onerror = () => { /* onclose follows */ };
  }

  function request(opcode, payload, timeoutMs) {
    const ws = st.ws;
    return new Promise((resolve, reject) => {
      if (!ws || ws.readyState !== WebSocket.OPEN) {
        reject(new Error("not connected"));
        return;
      }
      const contextId = st.nextContext++;
      const timer = setTimeout(() => {
        st.pending.delete(contextId);
        reject(new Error(opcode + ": no answer within " + timeoutMs / 1000 + " s"));
      }, timeoutMs);
      st.pending.set(contextId, { resolve, reject, timer });
      ws.send(JSON.stringify({ opcode, contextId, payload }));
    });
  }

  function receive(text) {
    let msg;
    try {
      msg = JSON.parse(text);
    } catch (e) {
      return;
    }
    if (typeof msg.contextId === "number") {
      const waiter = st.pending.get(msg.contextId);
      if (!waiter) return;
      st.pending.delete(msg.contextId);
      clearTimeout(waiter.timer);
      if (msg.error) waiter.reject(new Error(msg.error.message));
      else waiter.resolve(msg.payload || {});
      return;
    }
    if (msg.opcode === "shuttingDown") {
      goingDown(msg.payload || {});
    }
  }

  function closed(ws) {
    if (st.ws !== ws) return;
    st.ws = null;
    clearTimeout(st.pollTimer);
    st.pollTimer = null;
    for (const waiter of st.pending.values()) {
      clearTimeout(waiter.timer);
      waiter.reject(new Error("the connection closed"));
    }
    st.pending.clear();
    if (st.goingDown || st.report) {
      confirmStopped();
    } else if (st.phase !== "login") {
      unreachable();
    }
  }

  const polling = () => st.ws && !st.goingDown && !st.asked;

  async function poll() {
    st.pollTimer = null;
    if (!polling()) return;
    try {
      const status = await request("status", {}, REQUEST_TIMEOUT_MS);
      if (polling()) render(status);
    } catch (e) {
      // Once the node is going down, a refused status is expected news, not an error.
      if (!polling()) return;
      banner("warn", "Status failed: " + e.message);
    }
    if (polling()) st.pollTimer = setTimeout(poll, POLL_MS);
  }

  function unreachable(why) {
    setPhase("unreachable", "not answering");
    const wait = st.retryMs;
    st.retryMs = Math.min(st.retryMs * 2, RETRY_MAX_MS);
    banner("stopped", (why || "The node is not answering") + " (since " + clock() +
      "); trying again in " + Math.round(wait / 1000) + " s.");
    st.retryTimer = setTimeout(start, wait);
  }

  // The node said it is going down (our own request, or another UI's, or a signal).
  function goingDown(payload) {
    st.goingDown = payload;
    clearTimeout(st.pollTimer);
    st.pollTimer = null;
    setPhase("shuttingDown", "shutting down");
    $("node-state").textContent = "shutting down";
    const trigger = payload.trigger ? describeTrigger(payload.trigger) : "a request";
    const deadline = payload.deadlineMs ? " (deadline " + payload.deadlineMs + " ms)" : "";
    banner("warn", "This node is shutting down, asked by " + trigger + deadline + ".");
  }

  // After the node went down: one check that it no longer answers, then quiet.
  async function confirmStopped() {
    let answered = false;
    try {
      const response = await fetchWithin("/status", { cache: "no-store" });
      answered = response.ok;
    } catch (e) {
      answered = false;
    }
    const by = st.goingDown && st.goingDown.trigger
      ? "Shut down by " + describeTrigger(st.goingDown.trigger) + ". "
      : "";
    if (answered) {
      stopped(by + "The node was shutting down but still answers; press Check again to reconnect.");
    } else {
      stopped(by + "The node stopped: it no longer answers (checked at " + clock() + ").");
    }
  }

  function stopped(text) {
    clearTimeout(st.retryTimer);
    st.retryTimer = null;
    setPhase("stopped", "stopped");
    $("node-state").textContent = "stopped";
    const b = $("banner");
    b.dataset.kind = "stopped";
    b.replaceChildren(text + " ");
    const again = el("button", { type: "button", id: "check-again" }, "Check again");
    again.addEventListener("click", () => {
      st.goingDown = null;
      st.asked = false;
      st.report = null;
      start();
    });
    b.append(again);
    b.hidden = false;
  }

  // ---------- login ----------

  function showLogin(error) {
    st.guarded = true;
    setPhase("login", "token needed");
    $("live").hidden = true;
    $("login").hidden = false;
    banner(null, null);
    const e = $("login-error");
    e.textContent = error || "";
    e.hidden = !error;
    $("token").focus();
  }

  async function login(event) {
    event.preventDefault();
    const body = new URLSearchParams({ token: $("token").value });
    let response;
    try {
      response = await fetchWithin("/console/login", { method: "POST", body });
    } catch (e) {
      showLogin("The node did not answer.");
      return;
    }
    $("token").value = "";
    if (response.ok) {
      $("logout").hidden = false;
      start();
    } else if (response.status === 401) {
      showLogin("That is not this node's token.");
    } else {
      showLogin("The node refused the login (HTTP " + response.status + ").");
    }
  }

  async function logout() {
    try {
      await fetchWithin("/console/logout", { method: "POST" });
    } catch (e) { /* the cookie dies with the node anyway */ }
    if (st.ws) {
      st.phase = "login";
      st.ws.close();
    }
    showLogin(null);
  }

  // ---------- shutdown ----------

  function askShutdown() {
    $("confirm-id").textContent = st.status ? st.status.nodeId : "";
    $("confirm").hidden = false;
    $("confirm-cancel").focus();
  }

  async function shutdown() {
    $("confirm").hidden = true;
    $("shutdown").disabled = true;
    st.asked = true;
    clearTimeout(st.pollTimer);
    st.pollTimer = null;
    setPhase("shuttingDown", "shutting down");
    banner("warn", "Shutdown requested; waiting for the report.");
    try {
      const report = await request("shutdown", { report: true }, SHUTDOWN_TIMEOUT_MS);
      st.report = report;
      if (!st.goingDown) st.goingDown = { trigger: report.trigger };
      showReport(report);
      setPhase("stopped", "stopped");
      banner("warn", "The node has shut down; checking that it stopped answering.");
      if (!st.ws) confirmStopped();
    } catch (e) {
      st.asked = false;
      banner("stopped", "The shutdown request failed: " + e.message);
      if (st.ws) poll();
      else if (!st.goingDown) unreachable();
    }
  }

  function describeTrigger(t) {
    switch (t.kind) {
      case "ui": return "a UI websocket request from " + t.client;
      case "http": return "an HTTP request from " + t.client;
      case "signal": return t.name;
      case "api": return "the program running the node";
      case "fault": return "a fault: the " + t.subsystem + " stopped unexpectedly";
      default: return t.kind || "unknown";
    }
  }

  function outcomeText(o) {
    if (!o) return "?";
    if (o.kind === "failed") return "failed: " + o.reason;
    return o.kind;
  }

  function subsystemTree(r) {
    const item = el("li", { "data-subsystem": r.subsystem },
      el("strong", {}, r.subsystem), ": ",
      el("span", { class: "outcome-" + (r.outcome ? r.outcome.kind : "") }, outcomeText(r.outcome)),
      " in " + r.elapsed + " ms",
      r.summary ? " — " + r.summary : "");
    if (r.children && r.children.length) {
      item.append(el("ul", {}, ...r.children.map(subsystemTree)));
    }
    return item;
  }

  function showReport(r) {
    const verdicts = { graceful: "graceful", deadlineExpired: "deadline expired", failed: "failed" };
    const body = $("report-body");
    body.replaceChildren(
      el("p", { class: "verdict " + r.outcome, id: "report-outcome", "data-outcome": r.outcome },
        "Shutdown " + (verdicts[r.outcome] || r.outcome) + " after " + r.elapsedMs +
        " ms (deadline " + r.deadlineMs + " ms)"),
      el("dl", {},
        el("dt", {}, "node"), el("dd", {}, el("code", {}, r.nodeId)),
        el("dt", {}, "trigger"), el("dd", { id: "report-trigger" }, describeTrigger(r.trigger || {})),
        el("dt", {}, "requests"), el("dd", {}, String(r.requests)),
        el("dt", {}, "still running"),
        el("dd", { id: "report-still-running" },
          r.stillRunning && r.stillRunning.length ? r.stillRunning.join(", ") : "nothing")),
      el("ul", { id: "report-tree" }, subsystemTree(r.subsystems)));
    $("report").hidden = false;
    $("report").scrollIntoView({ block: "nearest" });
  }

  // ---------- rendering ----------

  function render(s) {
    if (!s || !s.nodeId) return;
    st.status = s;
    if (!st.goingDown && !st.report) {
      setPhase(s.state === "shuttingDown" ? "shuttingDown" : "running",
        s.state === "shuttingDown" ? "shutting down" : "running");
    }
    document.title = "meshnode " + short(s.nodeId);
    $("title-id").textContent = short(s.nodeId);
    $("node-id").textContent = s.nodeId;
    $("node-state").textContent = words(s.state);
    $("node-listen").textContent = s.listen;
    $("node-ui").textContent = s.ui;
    $("node-version").textContent = String(s.version);
    $("node-software").textContent = "meshnode " + s.softwareVersion;
    $("node-updated").textContent = clock();
    $("logout").hidden = !st.guarded;
    renderNeighbors(s);
    renderStats(s.stats || {});
    renderGraph(s);
  }

  function streamText(n) {
    return n.stream || "none";
  }

  function streamTitle(n) {
    if (n.stream === "dialed") return "this node dialed the neighbor";
    if (n.stream === "accepted") return "the neighbor dialed this node";
    return "no stream open to this neighbor";
  }

  function renderNeighbors(s) {
    const rows = (s.neighbors || []).slice().sort((a, b) => a.nodeId < b.nodeId ? -1 : 1);
    $("neighbor-count").textContent = "(" + rows.length + ")";
    $("no-neighbors").hidden = rows.length > 0;
    $("neighbors").tBodies[0].replaceChildren(...rows.map((n) =>
      el("tr", { class: n.full ? "full" : "half", "data-node-id": n.nodeId },
        el("td", { title: n.nodeId }, el("code", {}, short(n.nodeId))),
        el("td", {}, el("code", {}, n.addr)),
        el("td", {}, n.full ? "full" : "half"),
        el("td", { class: "stream", title: streamTitle(n) }, streamText(n)))));
  }

  function renderStats(stats) {
    $("stats").tBodies[0].replaceChildren(...Object.keys(stats).map((k) =>
      el("tr", { "data-stat": k },
        el("td", {}, words(k)),
        el("td", { class: "num" }, String(stats[k])))));
  }

  // Every record as a node on a circle (sorted by id, so the layout holds still between
  // polls); an edge for each pair where one lists the other: solid when both do, dashed when
  // only one does.
  function renderGraph(s) {
    const graph = $("graph");
    const known = new Map((s.knownNodes || []).map((k) => [k.nodeId, k]));
    const ids = new Set(known.keys());
    ids.add(s.nodeId);
    for (const k of known.values()) for (const n of k.neighbors || []) ids.add(n);
    const order = Array.from(ids).sort();
    const W = 600, H = 420, R = Math.min(W, H) / 2 - 50;
    const place = new Map(order.map((id, i) => {
      const a = (2 * Math.PI * i) / order.length - Math.PI / 2;
      return [id, { x: W / 2 + R * Math.cos(a), y: H / 2 + R * Math.sin(a) }];
    }));
    const lists = (a, b) => {
      const k = known.get(a);
      return !!k && (k.neighbors || []).includes(b);
    };
    const edges = new Map();
    for (const [a, k] of known) {
      for (const b of k.neighbors || []) {
        const key = a < b ? a + " " + b : b + " " + a;
        if (edges.has(key)) continue;
        const [x, y] = key.split(" ");
        edges.set(key, { a: x, b: y, full: lists(x, y) && lists(y, x) });
      }
    }
    const parts = [];
    for (const e of edges.values()) {
      const p = place.get(e.a), q = place.get(e.b);
      parts.push(svg("line", {
        x1: p.x.toFixed(1), y1: p.y.toFixed(1), x2: q.x.toFixed(1), y2: q.y.toFixed(1),
        class: e.full ? "full" : "half", "data-a": e.a, "data-b": e.b,
        "data-kind": e.full ? "full" : "half",
      }));
    }
    let gone = 0;
    const labelled = order.length <= MAX_LABELS;
    const radius = order.length <= MAX_LABELS ? 10 : 5;
    for (const id of order) {
      const p = place.get(id);
      const k = known.get(id);
      let kind = "node";
      if (id === s.nodeId) kind = "self";
      else if (!k) kind = "unknown";
      else if (!(k.neighbors || []).length) { kind = "gone"; gone++; }
      const g = svg("g", { class: kind, "data-node-id": id, "data-kind": kind });
      g.append(svg("circle", { cx: p.x.toFixed(1), cy: p.y.toFixed(1), r: id === s.nodeId ? 14 : radius }));
      // A large mesh keeps only this node's label; every node still has its tooltip.
      if (labelled || id === s.nodeId) {
        const label = svg("text", { x: p.x.toFixed(1), y: (p.y + (p.y < H / 2 ? -18 : 26)).toFixed(1), "text-anchor": "middle" });
        label.textContent = short(id) + (id === s.nodeId ? " (this node)" : "");
        g.append(label);
      }
      const title = svg("title", {});
      title.textContent = id + (k ? " at " + k.addr + ", record version " + k.version : " (no record)");
      g.append(title);
      parts.push(g);
    }
    graph.replaceChildren(...parts);
    const full = Array.from(edges.values()).filter((e) => e.full).length;
    $("graph-note").textContent = order.length + " nodes known, " + full + " full and " +
      (edges.size - full) + " half neighborships" + (gone ? ", " + gone + " withdrawn" : "") + ".";
  }

  // ---------- wiring ----------

  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", login);
    $("logout").addEventListener("click", logout);
    $("shutdown").addEventListener("click", askShutdown);
    $("confirm-cancel").addEventListener("click", () => { $("confirm").hidden = true; });
    $("confirm-yes").addEventListener("click", shutdown);
    document.addEventListener("keydown", (e) => {
      if (e.key === "Escape") $("confirm").hidden = true;
    });
    start();
  });
})();
