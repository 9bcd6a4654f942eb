// olmo-tap chat page: streams answers from /v1/chat/completions and shows each token's trust signals.
"use strict";

const ENTROPY_FULL = 2.5; // nats at which the entropy shade is darkest
const MAX_ALPHA = 0.7;
const SETTINGS_KEY = "olmo-tap-settings";

const $ = (id) => document.getElementById(id);
const state = { history: [], textHeads: null, controller: null };

// ----- settings -------------------------------------------------------------------------------------------------

function readSettings() {
  const form = $("settings-form");
  const body = {};
  for (const name of ["temperature", "gamma", "beta", "max_tokens", "seed", "veto_threshold"]) {
    const raw = form.elements[name].value.trim();
    if (raw !== "") body[name] = Number(raw);
  }
  body.mode = form.elements.mode.value;
  body.mcq = form.elements.mcq.checked;
  return body;
}

function saveSettings() {
  const form = $("settings-form");
  const saved = {};
  for (const el of form.elements) if (el.name) saved[el.name] = el.type === "checkbox" ? el.checked : el.value;
  localStorage.setItem(SETTINGS_KEY, JSON.stringify(saved));
}

function restoreSettings() {
  let saved;
  try { saved = JSON.parse(localStorage.getItem(SETTINGS_KEY) || "{}"); } catch { saved = {}; }
  const form = $("settings-form");
  for (const [name, value] of Object.entries(saved)) {
    const el = form.elements[name];
    if (!el) continue;
    if (el.type === "checkbox") el.checked = Boolean(value); else el.value = value;
  }
}

// ----- shading --------------------------------------------------------------------------------------------------

function signal() { return $("signal").value; }

// How many verifier votes a decoder has: PoE's jury excludes the drafter; a single head has no vote to flip.
function verifierCount(mode) {
  if (!state.textHeads) return 0;
  return mode === "poe" ? state.textHeads - 1 : mode === "naive" ? state.textHeads : 1;
}

function shadeAlpha(span) {
  if (signal() === "entropy") {
    const entropy = Number(span.dataset.entropy);
    return MAX_ALPHA * Math.min(1, Math.sqrt(Math.max(0, entropy) / ENTROPY_FULL));
  }
  // Stability radius: vote flips the token survives. 0 = one flip could change it (darkest).
  const maxRadius = Math.floor(Number(span.closest(".msg").dataset.verifiers || 0) / 2);
  if (maxRadius === 0) return 0;
  return MAX_ALPHA * (1 - Math.min(1, Number(span.dataset.radius) / maxRadius));
}

function shade(span) {
  span.style.backgroundColor = `rgba(var(--shade), ${shadeAlpha(span).toFixed(3)})`;
}

function updateLegend() {
  const legend = $("legend");
  legend.textContent = "";
  const swatch = document.createElement("span");
  swatch.className = "swatch";
  legend.append(swatch, " ");
  legend.append(signal() === "entropy"
    ? `darker = higher entropy of the jury's distribution (darkest at ≥ ${ENTROPY_FULL} nats)`
    : "darker = lower stability radius (darkest: one vote flip could change the token)");
  legend.append(" · wavy underline = the jury rejected the draft and resampled · hover or tap a token for details");
  document.querySelectorAll(".tok").forEach(shade);
}

// ----- tooltips -------------------------------------------------------------------------------------------------

function fmt(x, digits = 3) {
  if (x === null || x === undefined) return "–";
  if (Math.abs(x) > 0 && Math.abs(x) < 1e-3) return x.toExponential(1);
  return Number(x).toFixed(digits);
}

function showTip(span) {
  const d = span.dataset;
  const tip = $("tip");
  tip.textContent = "";
  const line = (...parts) => {
    const div = document.createElement("div");
    for (const p of parts) {
      if (typeof p === "string") div.append(p);
      else { const b = document.createElement("b"); b.textContent = p.bold; div.append(b); }
    }
    tip.append(div);
  };
  line("token ", { bold: JSON.stringify(span.textContent) }, ` (id ${d.id})`);
  line(`entropy ${fmt(Number(d.entropy))} nats · stability radius ${d.radius} · margin ${fmt(Number(d.margin))}`);
  if (d.draft !== undefined) {
    line("rejected draft ", { bold: JSON.stringify(d.draft) }, ` (id ${d.draftId})`);
    line(`validity radius ${d.validity} · suppression (jury's p of the draft) ${fmt(Number(d.suppression))}`);
  }
  tip.hidden = false;
  const box = span.getBoundingClientRect();
  const tipBox = tip.getBoundingClientRect();
  const left = Math.min(Math.max(4, box.left), window.innerWidth - tipBox.width - 4);
  const above = box.top - tipBox.height - 6;
  tip.style.left = `${left}px`;
  tip.style.top = `${above > 4 ? above : box.bottom + 6}px`;
}

function hideTip() { $("tip").hidden = true; }

// ----- rendering ------------------------------------------------------------------------------------------------

function addMessage(role, text) {
  $("empty")?.remove();
  const msg = document.createElement("div");
  msg.className = `msg ${role}`;
  if (role === "user") msg.textContent = text;
  $("chat").append(msg);
  msg.scrollIntoView({ block: "end" });
  return msg;
}

function addToken(answer, t) {
  const span = document.createElement("span");
  span.className = "tok";
  span.tabIndex = 0;
  span.textContent = t.text;
  Object.assign(span.dataset, {
    id: t.token_id, entropy: t.entropy, radius: t.stability_radius, margin: t.stability_margin,
  });
  if (t.resampled) {
    span.classList.add("resampled");
    Object.assign(span.dataset, {
      draft: t.draft_text ?? "", draftId: t.draft_token_id, validity: t.validity_radius,
      suppression: t.suppression_score,
    });
  }
  answer.append(span);
  shade(span);
}

function stat(label, value) {
  const el = document.createElement("span");
  el.className = "stat";
  const strong = document.createElement("strong");
  strong.textContent = value;
  el.append(`${label} `, strong);
  return el;
}

function verdict(trust) {
  // trust.verdict is the server's wording (PoEOutput.verdict): it never claims more than the weights deliver
  const words = trust.verdict.charAt(0).toUpperCase() + trust.verdict.slice(1);
  if (trust.abstained) return ["bad", words];
  return [trust.certified ? "ok" : "warn", words];
}

function renderCard(msg, trust) {
  const card = document.createElement("div");
  card.className = "card";
  const [kind, label] = verdict(trust);
  const badge = document.createElement("span");
  badge.className = `badge ${kind}`;
  badge.textContent = label;
  card.append(badge);
  const acc = trust.acceptance;
  if (trust.mode === "poe" && acc.n_drafted) {
    card.append(stat("acceptance", `${Math.round(100 * acc.rate)}% (${acc.n_accepted}/${acc.n_drafted})`));
    card.append(stat("resampled", String(trust.n_resampled)));
  }
  card.append(stat("tokens", String(trust.n_tokens)));
  card.append(stat("lowest stability", trust.min_stability_radius ?? "–"));
  card.append(stat("mean entropy", `${fmt(trust.mean_entropy, 2)} nats`));
  if (trust.mcq) {
    const p = trust.p_correct;
    card.append(stat("p(correct)", p === null ? "n/a (no uncertainty head)" : fmt(p, 2)));
  }
  card.append(stat("seed", String(trust.seed)));
  if (trust.digest) {
    // The transcript's content digest (settings + ids): quote it with the answer; `olmo-tap audit` prints it.
    const digest = stat("digest", `${trust.digest.replace("sha256:", "").slice(0, 12)}…`);
    digest.title = `${trust.digest}: sha256 of the settings and token ids this answer was decoded from`;
    digest.classList.add("digest");
    card.append(digest);
  }
  if (trust.signed_by) card.append(stat("signed by", trust.signed_by));
  if (trust.tokens_per_second) card.append(stat("speed", `${trust.tokens_per_second.toFixed(1)} tok/s`));
  const download = document.createElement("button");
  download.type = "button";
  download.className = "secondary download";
  download.textContent = "Download transcript";
  download.title = "JSON for `olmo-tap audit`: replays the answer through the jury";
  download.addEventListener("click", () => downloadTranscript(trust));
  card.append(download);
  msg.append(card);
}

function downloadTranscript(trust) {
  const blob = new Blob([JSON.stringify(trust.transcript, null, 2)], { type: "application/json" });
  const url = URL.createObjectURL(blob);
  const a = document.createElement("a");
  a.href = url;
  a.download = `olmo-tap-transcript-seed${trust.seed}.json`;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

function showError(msg, message) {
  const el = document.createElement("div");
  el.className = "error";
  el.textContent = message;
  msg.append(el);
}

// ----- talking to the server ------------------------------------------------------------------------------------

async function* serverSentEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

async function ask(text) {
  const settings = readSettings();
  state.history.push({ role: "user", content: text });
  addMessage("user", text);
  const msg = addMessage("assistant");
  msg.dataset.verifiers = verifierCount(settings.mode);
  const answer = document.createElement("div");
  answer.className = "answer streaming";
  msg.append(answer);
  state.controller = new AbortController();
  setBusy(true);
  let reply = "";
  let finished = false;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ messages: state.history, stream: true, ...settings }),
      signal: state.controller.signal,
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error(body.error?.message || `HTTP ${response.status}`);
    }
    for await (const chunk of serverSentEvents(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices[0];
      if (!choice) continue;
      if (choice.finish_reason) {
        if (choice.delta.content) answer.append(choice.delta.content);
        reply += choice.delta.content || "";
        msg.dataset.verifiers = chunk.trust.verifier_heads.length;
        answer.querySelectorAll(".tok").forEach(shade);
        renderCard(msg, chunk.trust);
        finished = true;
      } else if (chunk.trust) {
        addToken(answer, chunk.trust);
        reply += chunk.trust.text;
        msg.scrollIntoView({ block: "end" });
      }
    }
    if (!finished) throw new Error("the stream ended before the answer did");
    state.history.push({ role: "assistant", content: reply });
  } catch (err) {
    state.history.pop(); // the question was not answered: let the user ask again
    showError(msg, err.name === "AbortError" ? "Stopped." : `Error: ${err.message}`);
  } finally {
    answer.classList.remove("streaming");
    state.controller = null;
    setBusy(false);
  }
}

function setBusy(busy) {
  const send = $("send");
  send.textContent = busy ? "Stop" : "Send";
  send.classList.toggle("secondary", busy);
  $("prompt").disabled = busy;
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models");
    const card = (await response.json()).data[0];
    $("model-name").textContent = card.id;
    state.textHeads = card.olmo_tap.n_text_heads;
  } catch {
    $("model-name").textContent = "(model unavailable)";
  }
}

// ----- wiring ---------------------------------------------------------------------------------------------------

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  if (state.controller) { state.controller.abort(); return; }
  const text = $("prompt").value.trim();
  if (!text) return;
  $("prompt").value = "";
  ask(text).finally(() => $("prompt").focus());
});

$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});

$("new-chat").addEventListener("click", () => {
  state.controller?.abort();
  state.history = [];
  $("chat").textContent = "";
});

$("signal").addEventListener("change", updateLegend);
$("settings-form").addEventListener("change", saveSettings);

const chat = $("chat");
chat.addEventListener("mouseover", (e) => { if (e.target.classList.contains("tok")) showTip(e.target); });
chat.addEventListener("mouseout", (e) => { if (e.target.classList.contains("tok")) hideTip(); });
chat.addEventListener("focusin", (e) => { if (e.target.classList.contains("tok")) showTip(e.target); });
chat.addEventListener("focusout", hideTip);
window.addEventListener("scroll", hideTip, { passive: true });

restoreSettings();
updateLegend();
loadModel();
