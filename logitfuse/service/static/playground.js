// The logitfuse playground: one prompt to the base alone (`fusion: {method: "none"}` on the same model: exact)
// and to the fused model (`fusion: {influence: true}`), both streamed over SSE; each fused token is a span
// coloured by its influence `shift` (fused minus base log-probability) with its alternatives in a tooltip.
"use strict";

const $ = (id) => document.getElementById(id);
const SCALE = 4;          // nats at which the colour saturates (the legend's ends)
const FAINT = 0.01;       // |shift| below this is left uncoloured
const RAISED = [33, 102, 172], LOWERED = [178, 24, 43];
let running = null;       // the AbortController of the submission in flight

function headers() {
  const h = {"Content-Type": "application/json"};
  const key = $("key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    return `${resp.status}: ${body.error ? body.error.message : JSON.stringify(body)}`;
  } catch (e) {
    return `${resp.status} ${resp.statusText}`;
  }
}

async function loadModels() {
  const resp = await fetch("/v1/models", {headers: headers()});
  if (!resp.ok) {
    $("status").textContent = "Cannot list the models: " + await errorText(resp) +
      (resp.status === 401 ? " (type the API key above)" : "");
    return;
  }
  const select = $("model"), keep = select.value;
  select.replaceChildren();
  const groups = {ensembles: [], models: []};
  for (const m of (await resp.json()).data) (m.method && m.method !== "none" ? groups.ensembles : groups.models).push(m);
  for (const [label, list] of Object.entries(groups)) {
    if (!list.length) continue;
    const group = document.createElement("optgroup");
    group.label = label;
    for (const m of list) group.append(new Option(m.method && m.method !== "none" ? `${m.id} (${m.method})` : m.id, m.id));
    select.append(group);
  }
  if (keep) select.value = keep;
  $("status").textContent = "";
}

function fusionOverride() {
  const f = {influence: true};
  if ($("method").value) f.method = $("method").value;
  for (const k of ["alpha", "beta"]) if ($(k).value !== "") f[k] = Number($(k).value);
  const experts = $("experts").value.split(",").map((s) => s.trim()).filter(Boolean);
  if (experts.length) f.experts = experts;
  return f;
}

function requestBody(fusion) {
  const chat = document.querySelector("input[name=mode]:checked").value === "chat";
  const body = {model: $("model").value, max_tokens: Number($("max_tokens").value),
                temperature: Number($("temperature").value), stream: true,
                stream_options: {include_usage: true}, fusion};
  if (chat) body.messages = [{role: "user", content: $("prompt").value}];
  else body.prompt = $("prompt").value;
  return [chat ? "/v1/chat/completions" : "/v1/completions", body];
}

// Calls onChoice(choice) for every choice of every SSE event until [DONE]; returns the usage; throws on an
// error event.
async function stream(url, body, signal, onChoice) {
  const resp = await fetch(url, {method: "POST", headers: headers(), body: JSON.stringify(body), signal});
  if (!resp.ok) throw new Error(await errorText(resp));
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let pending = "", usage = null;
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return usage;
    pending += value;
    const events = pending.split("\n\n");
    pending = events.pop();
    for (const event of events) {
      const data = event.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (!data || data === "[DONE]") continue;
      const obj = JSON.parse(data);
      if (obj.error) throw new Error(obj.error.message);
      if (obj.usage) usage = obj.usage;
      for (const choice of obj.choices || []) onChoice(choice);
    }
  }
}

function textOf(choice) {
  return choice.delta ? (choice.delta.content || "") : (choice.text || "");
}

function colour(shift) {
  if (!(Math.abs(shift) >= FAINT)) return "";
  const t = Math.min(Math.abs(shift) / SCALE, 1), rgb = shift > 0 ? RAISED : LOWERED;
  return `rgba(${rgb.join(",")},${(0.15 + 0.75 * t).toFixed(3)})`;
}

function tokenSpan(text, info) {
  const span = document.createElement("span");
  span.className = "tok";
  span.tabIndex = 0;
  span.textContent = text;
  if (text === "") {  // a token with no text in the answer (an end token): its name, drawn by the CSS
    span.classList.add("special");
    span.dataset.mark = info.token || "\u2205";
  }
  span.dataset.shift = String(info.shift);
  const bg = colour(info.shift);
  if (bg) {
    span.classList.add("coloured");
    span.style.backgroundColor = bg;
    if (Math.abs(info.shift) / SCALE > 0.6) span.classList.add("strong");
  }
  span.influence = info;
  return span;
}

// One chunk of the fused stream: with one influence entry the chunk's own text is the span (exact bytes),
// with several (a speculative step) each entry's decoded token is one.
function appendFused(out, choice) {
  const entries = choice.influence || [];
  const text = textOf(choice);
  if (entries.length === 1) out.append(tokenSpan(text, entries[0]));
  else if (entries.length) for (const e of entries) out.append(tokenSpan(e.token, e));
  else if (text) out.append(document.createTextNode(text));
}

function fmt(x) {
  return typeof x === "number" && isFinite(x) ? x.toFixed(2) : "–";
}

function show(text) {
  return JSON.stringify(text);  // quotes make spaces and empty tokens visible
}

function altTable(title, rows, chosen) {
  const table = document.createElement("table");
  table.className = "alts";
  const cap = table.createCaption();
  cap.textContent = title;
  for (const r of rows || []) {
    const tr = table.insertRow();
    if (r.token_id === chosen) tr.className = "chosen";
    tr.insertCell().textContent = show(r.token);
    tr.insertCell().textContent = fmt(r.logprob);
    tr.insertCell().textContent = `${(100 * Math.exp(r.logprob)).toFixed(1)}%`;
  }
  return table;
}

function line(text) {
  const p = document.createElement("p");
  p.textContent = text;
  return p;
}

function tipContent(info) {
  const parts = [line(`${show(info.token)}  shift ${info.shift >= 0 ? "+" : ""}${fmt(info.shift)}`),
                 line(`fused ${fmt(info.logprob)} (rank ${info.rank}) · base ${fmt(info.base_logprob)} (rank ${info.base_rank})`)];
  parts[0].className = "head";
  if (info.base_choice) parts.push(line(`the base would pick ${show(info.base_choice.token)} (${fmt(info.base_choice.logprob)})`));
  const tables = document.createElement("div");
  tables.className = "tables";
  tables.append(altTable("fused top", info.top, info.token_id), altTable("base top", info.base_top, info.token_id));
  parts.push(tables);
  for (const e of info.experts || []) parts.push(line(`expert ${e.expert}: push ${fmt(e.push)} × weight ${fmt(e.weight)}`));
  if (typeof info.q === "number") parts.push(line(`Q ${fmt(info.q)}`));
  return parts;
}

function openTip(span) {
  const tip = $("tip");
  tip.replaceChildren(...tipContent(span.influence));
  tip.hidden = false;
  const box = span.getBoundingClientRect(), w = tip.offsetWidth, h = tip.offsetHeight;
  const left = Math.max(4, Math.min(box.left + window.scrollX, window.scrollX + document.documentElement.clientWidth - w - 4));
  const below = box.bottom + window.scrollY + 6;
  const top = box.bottom + h + 6 > window.innerHeight && box.top > h + 6 ? box.top + window.scrollY - h - 6 : below;
  tip.style.left = `${left}px`;
  tip.style.top = `${top}px`;
  tip.owner = span;
}

function closeTip() {
  $("tip").hidden = true;
  $("tip").owner = null;
}

function wireTips() {
  const out = $("fused-out");
  const target = (ev) => ev.target.closest && ev.target.closest(".tok");
  out.addEventListener("mouseover", (ev) => { const s = target(ev); if (s) openTip(s); });
  out.addEventListener("mouseout", (ev) => { if (target(ev) && !out.contains(ev.relatedTarget)) closeTip(); });
  out.addEventListener("focusin", (ev) => { const s = target(ev); if (s) openTip(s); });
  out.addEventListener("focusout", closeTip);
  document.addEventListener("click", (ev) => {  // a tap: open on a token (no toggle: a tap's mouseover opened
    const s = target(ev);                         // it already), close elsewhere
    if (s) openTip(s);
    else if (!$("tip").contains(ev.target)) closeTip();
  });
  document.addEventListener("keydown", (ev) => { if (ev.key === "Escape") closeTip(); });
}

async function runColumn(name, url, body, signal, onChoice) {
  const col = $(name), meta = $(`${name}-meta`), t0 = performance.now();
  let finish = "";
  col.dataset.state = "running";
  meta.textContent = "…";
  try {
    const usage = await stream(url, body, signal, (choice) => {
      if (choice.finish_reason) finish = choice.finish_reason;
      onChoice(choice);
    });
    col.dataset.state = "done";
    const secs = (performance.now() - t0) / 1000;
    meta.textContent = `${usage ? usage.completion_tokens + " tokens · " : ""}${secs.toFixed(1)} s · ${finish}`;
  } catch (err) {
    col.dataset.state = signal.aborted ? "stopped" : "error";
    const msg = document.createElement("p");
    msg.className = "error";
    msg.textContent = signal.aborted ? "stopped" : String(err.message || err);
    $(`${name}-out`).append(msg);
    meta.textContent = "";
  }
}

async function submit(ev) {
  ev.preventDefault();
  if (running) running.abort();
  const ctl = running = new AbortController();
  closeTip();
  if (!$("model").value) await loadModels();
  const baseOut = $("base-out"), fusedOut = $("fused-out");
  baseOut.replaceChildren();
  fusedOut.replaceChildren();
  const [url, fused] = requestBody(fusionOverride());
  const [, base] = requestBody({method: "none"});
  $("status").textContent = `${fused.model}: generating…`;
  await Promise.all([
    runColumn("base", url, base, ctl.signal, (c) => { const t = textOf(c); if (t) baseOut.append(t); }),
    runColumn("fused", url, fused, ctl.signal, (c) => appendFused(fusedOut, c)),
  ]);
  if (running === ctl) {
    running = null;
    $("status").textContent = "";
  }
}

$("form").addEventListener("submit", submit);
$("key").addEventListener("change", loadModels);
wireTips();
loadModels();
