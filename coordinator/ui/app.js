// quicmesh dashboard: plain DOM, no framework, no data in HTML strings (text nodes only).
"use strict";

const page = document.body.dataset.page;
let csrf = null;
let role = null;

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined) continue;
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const kid of kids.flat()) {
    if (kid === null || kid === undefined) continue;
    e.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return e;
}

function svg(tag, attrs, ...kids) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const kid of kids.flat()) e.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  return e;
}

async function api(path, opts) {
  const o = Object.assign({ headers: {} }, opts || {});
  if (o.body !== undefined && typeof o.body !== "string") {
    o.body = JSON.stringify(o.body);
    o.headers["content-type"] = "application/json";
  }
  if (o.method && o.method !== "GET" && csrf) o.headers["x-csrf-token"] = csrf;
  const r = await fetch("/api/v1" + path, o);
  if (r.status === 401 && page !== "login") {
    location.href = "/ui/login";
    throw new Error("signed out");
  }
  let body = null;
  try { body = await r.json(); } catch (_) { body = null; }
  return { ok: r.ok, status: r.status, body };
}

function show(...nodes) {
  const m = document.getElementById("main");
  m.replaceChildren(...nodes);
}

function ago(unix) {
  if (!unix) return "never";
  const s = Math.round(Date.now() / 1000 - unix);
  if (s < 60) return s + " s ago";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  return Math.round(s / 3600) + " h ago";
}

function inDays(unix) {
  if (!unix) return "-";
  const d = (unix - Date.now() / 1000) / 86400;
  return d < 1 ? Math.round(d * 24) + " h" : d.toFixed(1) + " days";
}

function bytes(n) {
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + u[i];
}

// A revoke button's handler: asks in `box` (with `question(name)`), then POSTs
// `<base><name>/revoke` and says how it went.
function revoker(box, base, question) {
  return (name) => {
    box.replaceChildren(el("div", { class: "confirm" },
      question(name),
      el("button", { class: "danger", id: "confirm-yes", type: "button", onclick: async () => {
        const res = await api(base + encodeURIComponent(name) + "/revoke", { method: "POST" });
        box.replaceChildren(el("p", { class: res.ok ? "ok" : "bad", id: "revoke-result" },
          res.ok ? "revoked " + name : (res.body && res.body.error) || "failed"));
        refresh();
      } }, "Yes, revoke"),
      " ",
      el("button", { type: "button", onclick: () => box.replaceChildren() }, "Cancel")));
  };
}

// ---- pages -----------------------------------------------------------------------------

async function overview() {
  const [st, nodes, svcs, pol, reps] = await Promise.all([
    api("/status"), api("/nodes"), api("/services"), api("/policy"), api("/replicas"),
  ]);
  const live = nodes.body.nodes.filter(n => !n.revoked_at);
  const online = live.filter(n => n.online).length;
  const soon = live.filter(n => n.cert_not_after && n.cert_not_after - Date.now() / 1000 < 86400 * 7);
  const services = Object.entries(svcs.body.services);
  const card = (id, n, label, cls) => el("div", { class: "card" }, el("div", { class: "n " + (cls || ""), id }, n), el("div", { class: "muted" }, label));
  show(
    el("h1", {}, "Overview"),
    el("div", { class: "cards" },
      card("nodes-online", online, "nodes online", "ok"),
      card("nodes-offline", live.length - online, "nodes offline", live.length - online ? "bad" : ""),
      card("services-count", services.length, "services"),
      card("policy-version", pol.body.version, "policy version"),
      card("mesh-version", st.body.mesh_version, "mesh version")),
    el("h2", {}, "Services"),
    el("table", { id: "overview-services" },
      el("tr", {}, el("th", {}, "service"), el("th", {}, "instances"), el("th", {}, "routable")),
      services.map(([name, inst]) => el("tr", { "data-service": name },
        el("td", {}, name), el("td", {}, inst.length),
        el("td", { class: inst.some(i => i.routable) ? "ok" : "bad" }, inst.filter(i => i.routable).length)))),
    el("h2", {}, "Coordinator replicas"),
    el("table", { id: "replicas" },
      el("tr", {}, el("th", {}, "replica"), el("th", {}, "state"), el("th", {}, "control"),
        el("th", {}, "sessions"), el("th", {}, "heartbeat")),
      ((reps.body && reps.body.replicas) || []).map(r => el("tr", { "data-replica": r.id },
        el("td", {}, r.id + (r.id === reps.body.this ? " (this one)" : "") + (r.id === reps.body.leader ? ", leader" : "")),
        el("td", { class: r.alive ? "ok" : "bad" }, r.alive ? "alive" : "dead"),
        el("td", {}, r.control),
        el("td", {}, r.sessions),
        el("td", {}, r.heartbeat_age_ms + " ms ago")))),
    el("h2", {}, "Certificates expiring within 7 days"),
    soon.length
      ? el("ul", { id: "expiring" }, soon.map(n => el("li", {}, n.name + ": " + inDays(n.cert_not_after))))
      : el("p", { class: "muted", id: "expiring" }, "none"),
  );
}

// A node's key exchange: its control session's group and its tunnels' (post-quantum
// X25519MLKEM768, or the classical peers by name), each read from its handshake.
function kxCell(n) {
  const t = n.tunnels || [];
  const pq = t.filter(x => x.key_exchange === "X25519MLKEM768").length;
  const classical = t.filter(x => x.key_exchange !== "X25519MLKEM768");
  const parts = ["control " + (n.control_key_exchange || "-")];
  if (t.length) {
    parts.push("tunnels: " + pq + " post-quantum" + (classical.length
      ? ", " + classical.map(x => x.peer + " " + x.key_exchange).join(", ")
      : ""));
  }
  const allPq = n.control_key_exchange === "X25519MLKEM768" && classical.length === 0;
  return el("td", { class: allPq ? "ok" : "" }, parts.join("; "));
}

async function nodes() {
  const r = await api("/nodes");
  const list = r.body.nodes.filter(n => !n.revoked_at);
  const confirmBox = el("div", { id: "confirm-box" });
  const ask = revoker(confirmBox, "/nodes/",
    (name) => "Revoke node " + name + "? Its certificate stops working at once and it leaves the mesh. ");
  show(
    el("h1", {}, "Nodes"),
    confirmBox,
    el("table", { id: "nodes" },
      el("tr", {}, ["node", "state", "labels", "endpoint", "overlay", "version", "key exchange", "cert expires", "acked snapshot", "last seen", ""].map(h => el("th", {}, h))),
      list.map(n => el("tr", { "data-node": n.name },
        el("td", {}, n.name),
        el("td", { class: n.online ? "ok" : "bad" }, n.online ? "online" : "offline"),
        el("td", {}, Object.entries(n.labels || {}).map(([k, v]) => k + "=" + v).join(", ")),
        el("td", {}, n.endpoint || "-"),
        el("td", {}, (n.overlay || []).join(", ")),
        el("td", {}, n.agent_version || "-"),
        kxCell(n),
        el("td", {}, inDays(n.cert_not_after)),
        el("td", {}, n.acked_version),
        el("td", {}, ago(n.last_seen)),
        el("td", {}, role === "admin"
          ? el("button", { class: "danger revoke", "data-node": n.name, type: "button", onclick: () => ask(n.name) }, "Revoke")
          : "")))),
  );
}

async function services() {
  const r = await api("/services");
  const rows = [];
  for (const [name, inst] of Object.entries(r.body.services)) {
    for (const i of inst) {
      rows.push(el("tr", { "data-service": name, "data-node": i.node },
        el("td", {}, name), el("td", {}, i.node),
        el("td", { class: i.routable ? "ok" : "bad" }, i.routable ? "routable" : "not routed"),
        el("td", {}, i.check ? i.check.health + (i.check.output ? " — " + i.check.output : "") : "no check"),
        el("td", {}, [i.labels.datacenter, i.labels.cloud].filter(Boolean).join(" / ") || "-")));
    }
  }
  show(el("h1", {}, "Services"),
    el("table", { id: "services" },
      el("tr", {}, ["service", "node", "routing", "health", "locality"].map(h => el("th", {}, h))),
      rows));
}

function diffLines(a, b) {
  // Longest common subsequence over lines: small policy files, quadratic is fine.
  const x = a.split("\n"), y = b.split("\n");
  const n = x.length, m = y.length;
  const t = Array.from({ length: n + 1 }, () => new Array(m + 1).fill(0));
  for (let i = n - 1; i >= 0; i--)
    for (let j = m - 1; j >= 0; j--)
      t[i][j] = x[i] === y[j] ? t[i + 1][j + 1] + 1 : Math.max(t[i + 1][j], t[i][j + 1]);
  const out = [];
  let i = 0, j = 0;
  while (i < n && j < m) {
    if (x[i] === y[j]) { out.push([" ", x[i]]); i++; j++; }
    else if (t[i + 1][j] >= t[i][j + 1]) out.push(["-", x[i++]]);
    else out.push(["+", y[j++]]);
  }
  while (i < n) out.push(["-", x[i++]]);
  while (j < m) out.push(["+", y[j++]]);
  return out;
}

let policyDraft = null;
// Kept across re-renders (a live update must not wipe the last apply's outcome).
const policyResult = el("div", { id: "policy-result" });

async function policy() {
  const [cur, hist] = await Promise.all([api("/policy"), api("/policy/history")]);
  const src = el("textarea", { id: "policy-source", spellcheck: "false" });
  src.value = policyDraft !== null ? policyDraft : (cur.body.source || "");
  src.addEventListener("input", () => { policyDraft = src.value; });
  const result = policyResult;
  const apply = async (dry) => {
    const r = await api("/policy", { method: "POST", body: { source: src.value, dry_run: dry } });
    if (r.ok) {
      result.replaceChildren(el("p", { class: "ok", id: "policy-ok" },
        dry ? "valid: " + r.body.rules + " rules, " + r.body.tests + " tests pass"
            : "applied as version " + r.body.version + " (" + r.body.rules + " rules, " + r.body.tests + " tests pass)"));
      if (!dry) policyDraft = null;
    } else {
      const failures = Array.isArray(r.body.failures) ? r.body.failures : [];
      result.replaceChildren(
        el("p", { class: "bad", id: "policy-error" }, "not applied: " + r.body.error),
        failures.length ? el("ul", { id: "policy-failures" }, failures.map(f => el("li", { class: "failure" },
          "test " + (f.index + 1) + ": " + f.from + " → " + f.to + " expected " + String(f.expect).toLowerCase() +
          ", got " + (f.got && f.got.decision && f.got.decision.Allow !== undefined ? "allow" : "deny") +
          (f.got && f.got.text ? " (" + f.got.text + ")" : "")))) : null);
    }
  };
  const versions = (hist.body.versions || []).slice().sort((a, b) => b.version - a.version);
  const diffBox = el("div", { id: "policy-diff", class: "diff" });
  const showDiff = (v) => {
    const prev = versions.find(p => p.version === v.version - 1);
    const d = diffLines(prev ? prev.source : "", v.source);
    diffBox.replaceChildren(el("h2", {}, "Version " + v.version + (prev ? " against " + prev.version : " (first)")),
      el("pre", {}, d.map(([k, line]) => el("div", { class: k === "+" ? "add" : k === "-" ? "del" : "" }, k + " " + line))));
  };
  const from = el("input", { type: "text", id: "explain-from", placeholder: "from service" });
  const to = el("input", { type: "text", id: "explain-to", placeholder: "to service" });
  const explained = el("div", { id: "explain-result" });
  const canChange = role === "admin";
  show(
    el("h1", {}, "Policy ", el("span", { class: "muted", id: "policy-current" }, "version " + cur.body.version)),
    src,
    el("p", {},
      el("button", { class: "primary", id: "policy-apply", type: "button", disabled: canChange ? null : "disabled", onclick: () => apply(false) }, "Apply"), " ",
      el("button", { id: "policy-check", type: "button", onclick: () => apply(true) }, "Check only"),
      canChange ? "" : el("span", { class: "muted" }, " read-only session")),
    result,
    el("h2", {}, "Explain"),
    el("p", {}, from, " → ", to, " ",
      el("button", { id: "explain-go", type: "button", onclick: async () => {
        const r = await api("/policy/explain?from=" + encodeURIComponent(from.value) + "&to=" + encodeURIComponent(to.value));
        explained.replaceChildren(r.ok
          ? el("p", { class: r.body.decision === "allow" ? "ok" : "bad" }, r.body.from + " → " + r.body.to + ": " + r.body.decision + " by " + r.body.rule)
          : el("p", { class: "bad" }, r.body.error));
      } }, "Explain")),
    explained,
    el("h2", {}, "History"),
    el("table", { id: "policy-history" },
      el("tr", {}, el("th", {}, "version"), el("th", {}, "applied"), el("th", {}, "")),
      versions.map(v => el("tr", { "data-version": v.version },
        el("td", {}, v.version), el("td", {}, new Date(v.applied_at * 1000).toISOString()),
        el("td", {}, el("button", { type: "button", onclick: () => showDiff(v) }, "diff"))))),
    diffBox,
  );
}

async function traffic() {
  const r = await api("/traffic");
  const pairs = r.body.pairs;
  const ms = (v) => v === null || v === undefined ? "-" : v.toFixed(2) + " ms";
  show(el("h1", {}, "Traffic"),
    el("p", { class: "muted" }, "Per service pair, as the nodes that start the flows report them (every status interval). Updates live."),
    el("table", { id: "traffic" },
      el("tr", {}, ["from", "to", "flows", "bytes", "denied", "denials by reason", "refused at ingress", "setup p50", "setup p99"].map(h => el("th", {}, h))),
      pairs.map(p => el("tr", { "data-pair": p.src + "->" + p.dst },
        el("td", {}, p.src), el("td", {}, p.dst),
        el("td", { class: "flows" }, p.flows),
        el("td", { class: "bytes" }, bytes(p.bytes)),
        el("td", { class: "denied " + (p.denied ? "bad" : "") }, p.denied),
        el("td", { class: "denials" }, Object.entries(p.denials).map(([k, v]) => k + ": " + v).join(", ") || "-"),
        el("td", { class: "ingress" }, Object.entries(p.ingress_denials).map(([k, v]) => k + ": " + v).join(", ") || "-"),
        el("td", { class: "p50" }, ms(p.setup_p50_ms)),
        el("td", { class: "p99" }, ms(p.setup_p99_ms))))),
    el("h2", {}, "HTTP routes"),
    el("p", { class: "muted" }, "Requests to services with protocol = \"http\": egress as the sending nodes' http upstreams count them (per route), ingress as the destinations do (every request that reached them)."),
    el("table", { id: "http-traffic" },
      el("tr", {}, ["side", "from", "to", "route", "requests", "by status", "p50", "p99"].map(h => el("th", {}, h))),
      (r.body.http || []).map(h => el("tr", { "data-route": h.side + ":" + h.src + "->" + h.dst + ":" + h.route },
        el("td", {}, h.side), el("td", {}, h.src), el("td", {}, h.dst), el("td", {}, h.route),
        el("td", { class: "requests" }, h.requests),
        el("td", { class: "classes " + ((h.classes["5xx"] || 0) > 0 ? "bad" : "") }, Object.entries(h.classes).map(([k, v]) => k + ": " + v).join(", ") || "-"),
        el("td", { class: "p50" }, ms(h.p50_ms)),
        el("td", { class: "p99" }, ms(h.p99_ms))))),
    el("h2", {}, "Route settings"),
    el("p", { class: "muted" }, "How each node's http upstreams route, as set in its node config (changed by restarting the node)."),
    el("table", { id: "http-routes" },
      el("tr", {}, ["node", "from", "to", "route", "match", "split", "timeout", "per try", "retries", "fault"].map(h => el("th", {}, h))),
      (r.body.http_routes || []).map(h => el("tr", { "data-route-setting": h.node + ":" + h.src + "->" + h.dst + ":" + h.route },
        el("td", {}, h.node), el("td", {}, h.src), el("td", {}, h.dst), el("td", {}, h.route),
        el("td", { class: "match" }, [h.path_prefix ? "prefix " + h.path_prefix : "", ...h.headers].filter(x => x).join(", ") || "any"),
        el("td", { class: "split" }, h.split.map(s => Object.entries(s.labels).map(([k, v]) => k + "=" + v).join(",") + " " + s.weight).join(", ") || "all instances"),
        el("td", {}, h.timeout_ms + " ms"),
        el("td", {}, h.per_try_timeout_ms == null ? "-" : h.per_try_timeout_ms + " ms"),
        el("td", {}, h.retries),
        el("td", { class: "fault" }, h.fault || "-")))));
}

async function topology() {
  const r = await api("/topology");
  const { services, edges } = r.body;
  const relayed = r.body.relayed || [];
  const W = 760, H = 520, cx = W / 2, cy = H / 2, R = Math.min(W, H) / 2 - 70;
  const pos = {};
  services.forEach((s, i) => {
    const a = (2 * Math.PI * i) / Math.max(services.length, 1) - Math.PI / 2;
    pos[s] = [cx + R * Math.cos(a), cy + R * Math.sin(a)];
  });
  const lines = edges.map(e => {
    // From the edge of one circle to the edge of the other, an arrowhead at the target.
    const [ax, ay] = pos[e.from], [bx, by] = pos[e.to];
    const len = Math.hypot(bx - ax, by - ay) || 1, ux = (bx - ax) / len, uy = (by - ay) / len;
    // Two directions of one pair side by side, not on top of each other.
    const ox = -uy * 5, oy = ux * 5;
    const x1 = ax + ux * 24 + ox, y1 = ay + uy * 24 + oy, x2 = bx - ux * 28 + ox, y2 = by - uy * 28 + oy;
    const cls = e.denied ? "denied" : e.flows ? "used" : "allowed";
    return svg("line", { x1, y1, x2, y2, class: cls, "marker-end": "url(#arrow-" + cls + ")", "data-edge": e.from + "->" + e.to },
      svg("title", {}, e.from + " → " + e.to + ": " + (e.allowed ? "allowed by " : "denied by ") + e.rule + ", " + e.flows + " flows, " + e.denied + " denied"));
  });
  const dots = services.map(s => svg("g", { "data-service": s },
    svg("circle", { cx: pos[s][0], cy: pos[s][1], r: 22 }),
    svg("text", { x: pos[s][0], y: pos[s][1] + 38, "text-anchor": "middle" }, s)));
  show(el("h1", {}, "Topology"),
    el("p", { class: "legend" }, el("span", { class: "muted" }, "- - allowed by policy"), el("span", { class: "ok" }, "— used"), el("span", { class: "bad" }, "— denied requests")),
    svg("svg", { id: "topology", width: W, height: H, viewBox: "0 0 " + W + " " + H },
      svg("defs", {}, ["allowed", "used", "denied"].map(k =>
        svg("marker", { id: "arrow-" + k, viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" },
          svg("path", { d: "M 0 0 L 10 5 L 0 10 z", class: "arrow " + k })))),
      lines, dots),
    // Node pairs whose tunnel runs through the coordinator (the relay of last resort).
    el("h2", {}, "Relayed by the coordinator"),
    relayed.length
      ? el("table", { id: "relayed" },
          el("tr", {}, ["from", "to", "replica", "datagrams", "bytes", "idle"].map(h => el("th", {}, h))),
          relayed.map(p => el("tr", { "data-pair": p.from + "->" + p.to },
            el("td", {}, p.from), el("td", {}, p.to), el("td", {}, p.replica),
            el("td", {}, p.datagrams), el("td", {}, p.bytes), el("td", {}, p.idle_secs + " s"))))
      : el("p", { class: "muted", id: "relayed" }, "None: every tunnel is direct or on a relay node."));
}

function login() {
  document.getElementById("nav").hidden = true;
  document.getElementById("signout").hidden = true;
  const token = el("input", { type: "password", id: "token", autocomplete: "off", placeholder: "admin or read-only token" });
  const err = el("p", { class: "bad", id: "error" });
  const go = async (ev) => {
    ev.preventDefault();
    const r = await api("/session", { method: "POST", body: { token: token.value } });
    if (r.ok) location.href = "/ui/overview";
    else err.textContent = (r.body && r.body.error) || "sign-in failed";
  };
  show(el("form", { class: "login", id: "login", onsubmit: go },
    el("h1", {}, "Sign in to quicmesh"),
    el("label", { for: "token" }, "API token (admin.token or reader.token in the coordinator's data dir)"),
    token,
    el("button", { class: "primary", id: "signin", type: "submit" }, "Sign in"),
    err));
}

// A QR code from the API's modules ("1" dark, row by row), with a quiet zone.
function qrSvg(qr) {
  const n = qr.width, q = 4, size = n + 2 * q;
  const s = svg("svg", { id: "wg-qr", viewBox: "0 0 " + size + " " + size, width: "260", height: "260", "shape-rendering": "crispEdges" });
  s.append(svg("rect", { width: String(size), height: String(size), fill: "#fff" }));
  for (let y = 0; y < n; y++) {
    for (let x = 0; x < n; x++) {
      if (qr.modules[y * n + x] === "1") s.append(svg("rect", { x: String(x + q), y: String(y + q), width: "1", height: "1", fill: "#000" }));
    }
  }
  return s;
}

// The add form and what it answered survive the page's live refreshes: the configuration
// (its private key) is shown once and must not vanish when the list updates.
const wg = { form: null, result: el("div", { id: "wg-result" }) };

function wgForm() {
  const f = (id, label, hint) => el("label", {}, label, " ", el("input", { type: "text", id, placeholder: hint || "" }), " ");
  const val = (id) => document.getElementById(id).value.trim();
  const list = (text) => text.split(",").map(x => x.trim()).filter(Boolean);
  return el("form", { id: "wg-add", onsubmit: async (ev) => {
      ev.preventDefault();
      const labels = {};
      for (const kv of list(val("wg-labels"))) {
        const i = kv.indexOf("=");
        if (i > 0) labels[kv.slice(0, i)] = kv.slice(i + 1);
      }
      const days = val("wg-ttl");
      const body = { name: val("wg-name"), service: val("wg-service"), labels, gateways: list(val("wg-gateways")) };
      if (days) body.ttl_secs = Math.round(Number(days) * 86400);
      if (val("wg-key")) body.public_key = val("wg-key");
      const res = await api("/wg", { method: "POST", body });
      if (!res.ok) {
        wg.result.replaceChildren(el("p", { class: "bad", id: "wg-error" }, (res.body && res.body.error) || "failed"));
        return;
      }
      wg.result.replaceChildren(
        el("h2", {}, "Configuration of " + res.body.client.name),
        el("p", { class: "warn" }, res.body.private_key
          ? "Shown this once: the private key in it is stored nowhere. Scan the code with the WireGuard app, or save the text as a .conf file."
          : "The device keeps its own private key: fill it in where the text says so."),
        res.body.config_qr ? qrSvg(res.body.config_qr) : el("p", { class: "muted" }, "(too long for a QR code)"),
        el("pre", { id: "wg-config" }, res.body.config),
        el("button", { type: "button", onclick: () => wg.result.replaceChildren() }, "Done: forget it"));
      refresh();
    } },
    el("h2", {}, "Add a client"),
    f("wg-name", "name", "alice-phone"), f("wg-service", "service", "laptop"),
    f("wg-labels", "labels", "owner=alice, team=ops"), f("wg-gateways", "gateways", "gw-1"),
    f("wg-ttl", "days", "(none: until revoked)"), f("wg-key", "public key", "(none: make a key pair)"),
    el("button", { class: "primary", type: "submit" }, "Add"));
}

async function clients() {
  const r = await api("/wg");
  const now = Date.now() / 1000;
  const confirmBox = el("div", { id: "confirm-box" });
  const ask = revoker(confirmBox, "/wg/",
    (name) => "Revoke WireGuard client " + name + "? It is cut at once, live flows included, and its name and key are never used again. ");
  if (role === "admin" && !wg.form) wg.form = wgForm();
  const state = (c) => c.revoked_at ? "revoked" : (c.expires_at && now >= c.expires_at ? "expired" : "active");
  show(
    el("h1", {}, "WireGuard clients"),
    confirmBox,
    el("table", { id: "wg-clients" },
      el("tr", {}, ["client", "state", "service", "labels", "address", "gateways", "last handshake", "to / from", "expires", ""].map(h => el("th", {}, h))),
      r.body.clients.map(c => el("tr", { "data-client": c.name },
        el("td", {}, c.name),
        el("td", { class: state(c) === "active" ? "ok" : "bad" }, state(c)),
        el("td", {}, c.service),
        el("td", {}, Object.entries(c.labels || {}).map(([k, v]) => k + "=" + v).join(", ")),
        el("td", {}, (c.addresses || []).join(", ")),
        el("td", {}, (c.gateways || []).join(", ")),
        el("td", {}, ago(c.last_handshake)),
        el("td", {}, bytes(c.tx_bytes || 0) + " / " + bytes(c.rx_bytes || 0)),
        el("td", {}, c.expires_at ? inDays(c.expires_at) : "never"),
        el("td", {}, role === "admin" && state(c) === "active"
          ? el("button", { class: "danger revoke", "data-client": c.name, type: "button", onclick: () => ask(c.name) }, "Revoke")
          : "")))),
    wg.form,
    wg.result,
  );
}

const PAGES = { overview, nodes, services, policy, traffic, topology, clients };
let pending = null;

function refresh() {
  if (pending) return;
  pending = setTimeout(async () => {
    pending = null;
    try { await PAGES[page](); } catch (e) { console.error(e); }
  }, 150);
}

async function start() {
  if (page === "login") return login();
  for (const a of document.querySelectorAll("[data-nav]")) if (a.dataset.nav === page) a.classList.add("active");
  const me = await api("/session");
  csrf = me.body.csrf;
  role = me.body.role;
  document.getElementById("who").textContent = role === "admin" ? "admin" : "read-only";
  document.getElementById("signout").addEventListener("click", async () => {
    await api("/session", { method: "DELETE" });
    location.href = "/ui/login";
  });
  const es = new EventSource("/api/v1/events");
  const dot = document.getElementById("live");
  // The page loads once the event stream is open: a change between the load and the
  // subscription would send no event of its own. A reconnect loads it again (changes
  // while disconnected sent none either).
  let opened = false;
  const open = new Promise(resolve => {
    es.onopen = () => { dot.classList.add("on"); if (opened) refresh(); opened = true; resolve(); };
    setTimeout(resolve, 2000);
  });
  es.onerror = () => dot.classList.remove("on");
  es.addEventListener("mesh", refresh);
  es.addEventListener("traffic", () => { if (page === "traffic" || page === "topology" || page === "overview") refresh(); });
  await open;
  await PAGES[page]();
  document.body.dataset.ready = "1";
}

start();
