// The chat page of `rxrt serve --http` (docs/http.md, "The page"). It speaks the server's own API:
// POST /v1/conversations, then POST /v1/responses with stream: true, read as server-sent events.
// After each answer the stream carries rxrt.memory.update_started and rxrt.memory.updated, whose
// `layers` (per STM layer: change, gate) fill one column of the heatmap. No build step, no library.
"use strict";

const KEY = "rxrt-api-key";
const $ = (id) => document.getElementById(id);
const state = { model: null, layers: 0, conversation: null, turns: 0, columns: [] };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem(KEY);
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function call(method, path, body) {
  const init = { method, headers: headers() };
  if (body !== undefined) init.body = JSON.stringify(body);
  const response = await fetch(path, init);
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      message = (await response.json()).error.message || message;
    } catch (_) { /* not OpenAI's error object */ }
    throw new ApiError(response.status, message);
  }
  return response;
}

// Server-sent events: blocks split by a blank line; each block's data lines hold one JSON object.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (data) yield JSON.parse(data);
    }
  }
}

function status(text) {
  $("status").textContent = text;
}

function askForKey(message) {
  $("key-form").hidden = false;
  $("key-error").textContent = message;
  $("key").focus();
}

function ready(on) {
  $("query").disabled = !on;
  $("send").disabled = !on;
  if (on) $("query").focus();
}

async function connect() {
  try {
    const models = await (await call("GET", "/v1/models")).json();
    const model = models.data[0];
    state.model = model.id;
    state.layers = model.rxrt ? model.rxrt.layers : 0;
    $("key-form").hidden = true;
    const shape = model.rxrt ? ` · STM of ${model.rxrt.layers} layers × ${model.rxrt.stm_size} slots × ${model.rxrt.dim}` : "";
    $("model").textContent = `Model ${model.id}${shape}`;
    ready(true);
  } catch (err) {
    if (err.status === 401) {
      $("model").textContent = "This server needs an API key.";
      askForKey(sessionStorage.getItem(KEY) ? err.message : "");
    } else if (err.status === 503) {
      $("model").textContent = `Waiting for the model: ${err.message}`;
      setTimeout(connect, 1000);
    } else {
      $("model").textContent = `Cannot reach the API: ${err.message}`;
    }
  }
}

function addItem(role, text) {
  const li = document.createElement("li");
  li.className = role;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Model";
  const p = document.createElement("p");
  p.className = "text";
  p.textContent = text;
  li.append(who, p);
  $("transcript").append(li);
  return li;
}

function number(id) {
  const raw = $(id).value.trim();
  return raw === "" ? undefined : Number(raw);
}

async function startConversation() {
  const body = {};
  const seed = number("seed");
  if (seed !== undefined) body.seed = seed;
  const conv = await (await call("POST", "/v1/conversations", body)).json();
  state.conversation = conv.id;
  state.turns = 0;
}

async function send(text) {
  if (!state.conversation) await startConversation();
  addItem("user", text);
  const item = addItem("assistant", "");
  const answer = item.querySelector(".text");
  answer.setAttribute("aria-live", "polite");
  answer.setAttribute("aria-busy", "true"); // read once whole, not token by token
  item.dataset.state = "streaming";
  const memory = document.createElement("p");
  memory.className = "memory";
  memory.setAttribute("aria-live", "polite");
  item.append(memory);
  const turn = state.turns + 1; // counted once the server has taken it: a refused query is no turn
  item.dataset.turn = String(turn);

  const body = { model: state.model, input: text, conversation: state.conversation, stream: true };
  const temperature = number("temperature");
  const maxTokens = number("max-tokens");
  if (temperature !== undefined) body.temperature = temperature;
  if (maxTokens !== undefined) body.max_output_tokens = maxTokens;
  const response = await call("POST", "/v1/responses", body);
  state.turns = turn;
  for await (const ev of events(response)) {
    if (ev.type === "response.output_text.delta") {
      answer.textContent += ev.delta;
    } else if (ev.type === "response.completed" || ev.type === "response.incomplete") {
      answer.textContent = outputText(ev.response);
      answer.setAttribute("aria-busy", "false");
      item.dataset.state = ev.type === "response.completed" ? "answered" : "cut";
      ready(true); // the next turn queues behind this memory update: the engine orders them
      status(ev.type === "response.incomplete" ? "The answer reached its token limit." : "");
    } else if (ev.type === "rxrt.memory.update_started") {
      memory.dataset.state = "started";
      memory.textContent = `Memory: taking turn ${turn} in, from STM version ${ev.stm_version}…`;
    } else if (ev.type === "rxrt.memory.updated") {
      memory.dataset.state = "committed";
      const mean = ev.layers.reduce((s, l) => s + l.change, 0) / Math.max(ev.layers.length, 1);
      memory.textContent = `Memory: turn ${turn} committed as STM version ${ev.stm_version} in ` +
        `${(ev.duration_s * 1000).toFixed(0)} ms; mean change ${mean.toFixed(3)}.`;
      addColumn(turn, ev);
    } else if (ev.type === "rxrt.memory.failed") {
      memory.dataset.state = "failed";
      memory.textContent = `Memory: the update failed: ${ev.message}`;
    } else if (ev.type === "error") {
      throw new ApiError(500, ev.message);
    }
  }
}

function outputText(response) {
  const message = response.output.find((item) => item.type === "message");
  return message ? message.content.map((part) => part.text).join("") : "";
}

// ------------------------------------------------------------------ the heatmap
function addColumn(turn, ev) {
  state.columns.push({ turn, layers: ev.layers, version: ev.stm_version });
  const table = $("heatmap");
  const th = document.createElement("th");
  th.scope = "col";
  th.dataset.turn = String(turn);
  th.textContent = `turn ${turn}`;
  table.tHead.rows[0].append(th);
  const body = table.tBodies[0];
  ev.layers.forEach((layer, i) => {
    let row = body.rows[i];
    if (!row) {
      row = body.insertRow();
      const head = document.createElement("th");
      head.scope = "row";
      head.textContent = `layer ${i}`;
      row.append(head);
    }
    const cell = row.insertCell();
    cell.dataset.change = String(layer.change);
    cell.dataset.gate = String(layer.gate);
    const words = `change ${layer.change.toFixed(3)}, gates ${(layer.gate * 100).toFixed(0)}% open`;
    cell.title = `turn ${turn}, layer ${i}: ${words}`;
    const text = document.createElement("span");
    text.className = "sr-only";
    text.textContent = words;
    cell.append(text);
  });
  paint();
}

// A log scale: a fresh memory (small random values) moves by far more on its first turn than a
// settled one does later, and a linear scale would leave every later column blank.
function paint() {
  const cells = [...$("heatmap").querySelectorAll("td")];
  const logs = cells.map((c) => Math.log10(Math.max(Number(c.dataset.change), 1e-6)));
  const low = Math.min(...logs);
  const high = Math.max(...logs);
  cells.forEach((c, i) => {
    const v = high > low ? (logs[i] - low) / (high - low) : 1;
    // from a pale to a deep blue; lightness carries the value, so it reads in greyscale too
    c.style.backgroundColor = `hsl(220, 80%, ${Math.round(94 - 64 * v)}%)`;
  });
  $("scale").textContent = cells.length
    ? `Log scale: palest ${(10 ** low).toPrecision(2)}, darkest ${(10 ** high).toPrecision(2)}.`
    : "";
}

function clearConversation() {
  state.conversation = null;
  state.turns = 0;
  state.columns = [];
  $("transcript").replaceChildren();
  const head = $("heatmap").tHead.rows[0];
  while (head.cells.length > 1) head.deleteCell(-1);
  $("heatmap").tBodies[0].replaceChildren();
  $("scale").textContent = "";
  status("A new conversation starts with your next message.");
}

// ------------------------------------------------------------------ wiring
$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem(KEY, $("key").value.trim());
  $("key").value = "";
  connect();
});

$("ask").addEventListener("submit", async (e) => {
  e.preventDefault();
  const text = $("query").value.trim();
  if (!text) return;
  $("query").value = "";
  ready(false);
  status("");
  try {
    await send(text);
  } catch (err) {
    const last = $("transcript").querySelector("li.assistant:last-child");
    if (last) {
      last.dataset.state = "failed";
      last.querySelector(".text").setAttribute("aria-busy", "false");
    }
    if (err.status === 401) askForKey(err.message);
    status(`Error: ${err.message}`);
    ready(state.model !== null && $("key-form").hidden);
  }
});

$("query").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("ask").requestSubmit();
  }
});

$("new").addEventListener("click", clearConversation);

connect();
