// The web app of `node/tests/browser_clients.rs`, loaded by a page on its own origin.
// Each function tries one way a page can reach the node and resolves with what the
// browser let it see; nothing here decides pass or fail (the Rust test does).
"use strict";

const WAIT_MS = 10000;

function within(ms, what, promise) {
  let timer;
  const late = new Promise((resolve) => {
    timer = setTimeout(() => resolve({ timeout: what }), ms);
  });
  return Promise.race([promise, late]).finally(() => clearTimeout(timer));
}

function wsUrl(node, path) {
  return node.replace(/^http/, "ws") + path;
}

/// An EventSource on one topic's watch with `?token=`; `open` resolves when the stream
/// is up (or refused), `until(nonce)` when the event carrying `nonce` arrived.
function eventSource(cfg, topic) {
  const url = `${cfg.node}/v1/topics/${topic}/events?watch=true&token=${cfg.token}`;
  const es = new EventSource(url);
  const state = { opened: false, errored: false, readyState: null, events: [] };
  const waiters = [];
  es.onmessage = (e) => {
    state.events.push({ id: e.lastEventId, data: JSON.parse(e.data) });
    waiters.forEach((w) => w());
  };
  const open = new Promise((resolve) => {
    es.onopen = () => {
      state.opened = true;
      resolve();
    };
    es.onerror = () => {
      state.errored = true;
      state.readyState = es.readyState;
      resolve();
    };
  });
  const until = (nonce) =>
    new Promise((resolve) => {
      const check = () => {
        if (state.events.some((e) => e.data.nonce === nonce)) resolve();
      };
      waiters.push(check);
      check();
    });
  return { es, state, open, until };
}

/// A WebSocket with `?token=` and the JSON subprotocol that subscribes to `topic`.
function webSocket(cfg, topic) {
  const ws = new WebSocket(wsUrl(cfg.node, `/v1/ws?token=${cfg.token}`), "weft.v1.json");
  const state = {
    opened: false,
    protocol: null,
    closeCode: null,
    subscribed: null,
    events: [],
  };
  const waiters = [];
  const closed = new Promise((resolve) => {
    ws.onclose = (e) => {
      state.closeCode = e.code;
      resolve();
    };
  });
  ws.onmessage = (e) => {
    for (const line of String(e.data).split("\n")) {
      if (!line.trim()) continue;
      const msg = JSON.parse(line);
      if (msg.id === 1) state.subscribed = msg.result ? true : msg.error;
      if (msg.push && msg.push.event) {
        state.events.push({ topic: msg.push.topic, offset: msg.push.event.offset, data: msg.push.event.data });
      }
    }
    waiters.forEach((w) => w());
  };
  const open = new Promise((resolve) => {
    ws.onopen = () => {
      state.opened = true;
      state.protocol = ws.protocol;
      ws.send(JSON.stringify({ id: 1, subscribe: { topic } }));
      resolve();
    };
    closed.then(resolve);
  });
  const when = (test) =>
    new Promise((resolve) => {
      const check = () => {
        if (test()) resolve();
      };
      waiters.push(check);
      check();
    });
  return {
    ws,
    state,
    open,
    subscribed: when(() => state.subscribed !== null),
    until: (nonce) => when(() => state.events.some((e) => e.data.nonce === nonce)),
  };
}

/// A CORS `fetch` that publishes as a browser app would: bearer token, JSON body.
async function publish(cfg, topic, body) {
  try {
    const r = await fetch(`${cfg.node}/v1/topics/${topic}/events`, {
      method: "POST",
      headers: { Authorization: `Bearer ${cfg.token}`, "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    return { status: r.status, body: await r.json() };
  } catch (e) {
    return { error: String(e) };
  }
}

/// A CORS GET of a topic's state with `?token=` (a simple request: no preflight).
async function readState(cfg, topic) {
  try {
    const r = await fetch(`${cfg.node}/v1/topics/${topic}?token=${cfg.token}`);
    return { status: r.status, body: await r.json() };
  } catch (e) {
    return { error: String(e) };
  }
}

/// A plain HTML form POST into a hidden frame, as a cross-site attacker would send it.
function formPost(url, enctype) {
  return new Promise((resolve) => {
    const name = `frame-${Math.random().toString(36).slice(2)}`;
    const frame = document.createElement("iframe");
    frame.name = name;
    // The frame's first load is its own about:blank (same origin as this page, and
    // fired as soon as it is attached); the node's answer is a cross-origin document,
    // whose location this page may not read. Only that second load means the node
    // has answered, so the test's counters are read after the node counted the POST.
    frame.onload = () => {
      try {
        if (frame.contentWindow.location.href === "about:blank") return;
      } catch (_) {
        // cross-origin: the node's response
      }
      resolve({ submitted: true });
    };
    document.body.appendChild(frame);
    const form = document.createElement("form");
    form.method = "POST";
    form.action = url;
    form.enctype = enctype;
    form.target = name;
    // As text/plain the body is `{"form":"x", "pad":"=1"}`: it parses as JSON, so
    // only the Content-Type check stands between it and a publish.
    const input = document.createElement("input");
    input.name = '{"form":"x", "pad":"';
    input.value = '1"}';
    form.appendChild(input);
    document.body.appendChild(form);
    form.submit();
  });
}

const FORM_TYPES = ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"];

async function formPosts(cfg, topic) {
  const out = {};
  for (const enctype of FORM_TYPES) {
    out[enctype] = await within(
      WAIT_MS,
      "form",
      formPost(`${cfg.node}/v1/topics/${topic}/events?token=${cfg.token}`, enctype),
    );
  }
  return out;
}

/// `no-cors` POSTs to the drain route, without a credential and with the admin key.
async function drains(cfg) {
  const out = {};
  for (const [name, query] of [
    ["anonymous", ""],
    ["admin_key", `?token=${cfg.admin_key}`],
  ]) {
    try {
      const r = await fetch(`${cfg.node}/v1/admin/drain${query}`, { method: "POST", mode: "no-cors" });
      out[name] = { type: r.type, status: r.status };
    } catch (e) {
      out[name] = { error: String(e) };
    }
  }
  return out;
}

/// The allowed origin: watch, subscribe, publish and see the event on both.
async function asAllowed(cfg) {
  const topic = cfg.live_topic;
  const nonce = `n-${Date.now()}`;
  const sse = eventSource(cfg, topic);
  const ws = webSocket(cfg, topic);
  await within(WAIT_MS, "sse open", sse.open);
  await within(WAIT_MS, "ws open", ws.open);
  await within(WAIT_MS, "ws subscribe", ws.subscribed);
  const published = await publish(cfg, topic, { nonce });
  const sseGot = await within(WAIT_MS, "sse event", sse.until(nonce));
  const wsGot = await within(WAIT_MS, "ws event", ws.until(nonce));
  sse.es.close();
  ws.ws.close(1000);
  return {
    nonce,
    sse: { ...sse.state, wait: sseGot || null },
    ws: { ...ws.state, wait: wsGot || null },
    publish: published,
    state: await readState(cfg, topic),
    forms: await formPosts(cfg, cfg.form_topic),
    drain: await drains(cfg),
  };
}

/// The disallowed origin: the same attempts with a valid token, every one refused.
async function asDenied(cfg) {
  const topic = cfg.denied_topic;
  const sse = eventSource(cfg, topic);
  const ws = webSocket(cfg, topic);
  const sseWait = await within(WAIT_MS, "sse open", sse.open);
  const wsWait = await within(WAIT_MS, "ws open", ws.open);
  sse.es.close();
  return {
    sse: { ...sse.state, wait: sseWait || null },
    ws: { ...ws.state, wait: wsWait || null },
    publish: await publish(cfg, topic, { nonce: "denied" }),
    state: await readState(cfg, topic),
    forms: await formPosts(cfg, cfg.form_topic),
    drain: await drains(cfg),
  };
}

window.weft = { asAllowed, asDenied };
