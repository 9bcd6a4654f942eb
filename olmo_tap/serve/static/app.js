// olmo-tap chat page: streams answers from /v1/chat/completions and shows each token's trust signals, then the
// answer as safe Markdown with its Certainty, Security and Robustness cards.
"use strict";

const ENTROPY_FULL = 2.5; // nats at which the entropy shade is darkest
const MAX_ALPHA = 0.7;
const SETTINGS_KEY = "olmo-tap-settings";
const CERTAINTY_TIERS = { high: 0.8, moderate: 0.65 }; // the claim ledger's thresholds (olmo_tap.certainty.claims)
const RISK_TIERS = { low: 0.8, moderate: 0.4 }; // share of the largest validity radius (olmo_tap.serve.trust)
const FLIP_WARN_RATIO = 1 / 3; // at most this share of the suffixes flipped the answer: "some flips" (the original's)
const QUIET_MS = 2000; // no token for this long while KLE may be measuring: say so

const $ = (id) => document.getElementById(id);
const state = { history: [], textHeads: null, controller: null };

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = text;
  if (className) node.className = className;
  return node;
}

// ----- lossless JSON --------------------------------------------------------------------------------------------
// Seeds are 63-bit integers: a JavaScript number rounds them past 2^53, and a downloaded transcript whose KLE sample
// seeds were rounded no longer matches its digest. Where the browser shows a number's source text to JSON.parse's
// reviver (and has JSON.rawJSON to write it back), such integers stay exact as BigInt.
const LOSSLESS_JSON = typeof JSON.rawJSON === "function";

function parseJson(text) {
  if (!LOSSLESS_JSON) return JSON.parse(text);
  return JSON.parse(text, (key, value, context) =>
    typeof value === "number" && !Number.isSafeInteger(value) && /^-?\d+$/.test(context?.source ?? "")
      ? BigInt(context.source) : value);
}

function toJson(value, space) {
  return JSON.stringify(value, (key, v) => (typeof v === "bigint" ? JSON.rawJSON(v.toString()) : v), space);
}

// ----- settings -------------------------------------------------------------------------------------------------

function readSettings() {
  const form = $("settings-form");
  const body = {};
  for (const name of ["temperature", "gamma", "beta", "max_tokens", "seed", "veto_threshold"]) {
    const raw = form.elements[name].value.trim();
    if (raw !== "") body[name] = Number(raw);
  }
  body.mode = form.elements.mode.value;
  body.certainty = form.elements.certainty.value;
  body.robustness = form.elements.robustness.checked;
  return body;
}

function saveSettings() {
  const form = $("settings-form");
  const saved = {};
  for (const field of form.elements) {
    if (field.name) saved[field.name] = field.type === "checkbox" ? field.checked : field.value;
  }
  localStorage.setItem(SETTINGS_KEY, JSON.stringify(saved));
}

function restoreSettings() {
  let saved;
  try { saved = JSON.parse(localStorage.getItem(SETTINGS_KEY) || "{}"); } catch { saved = {}; }
  const form = $("settings-form");
  for (const [name, value] of Object.entries(saved)) {
    const field = form.elements[name];
    if (!field) continue; // a setting this page no longer has (the old "mcq" checkbox)
    if (field.type === "checkbox") field.checked = Boolean(value); else field.value = value;
    if (field.tagName === "SELECT" && field.selectedIndex < 0) field.selectedIndex = 0; // a value it no longer offers
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
  legend.append(" · wavy underline = the jury rejected the draft and resampled · hover or tap a token for details"
    + " (an answer's tokens view)");
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

// ----- safe Markdown --------------------------------------------------------------------------------------------
// The model's text becomes DOM nodes made with createElement and text nodes, never parsed as HTML: whatever it
// writes (<script>, <img onerror=…>, a javascript: link) can only ever show as text. A deliberately small subset:
// paragraphs and line breaks, headings, bullet and numbered lists, fenced code, `code`, **bold**, *italic* and
// http(s) links.

const FENCE = /^ {0,3}(```|~~~)(.*)$/;
const HEADING = /^ {0,3}(#{1,6})[ \t]+(.+?)[ \t]*$/;
const RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
const LIST_ITEM = /^([ \t]*)(?:([-*+•])|(\d{1,9})[.)])[ \t]+(.*)$/;
const INLINE = new RegExp([
  /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/.source, // 1, 2: `code`
  /\[([^[\]\n]+)\]\(([^()\s]+)\)/.source, // 3, 4: [text](url)
  /\*\*(?=\S)([\s\S]*?\S)\*\*/.source, // 5: **bold**
  /(?<!\w)__(?=\S)([\s\S]*?\S)__(?!\w)/.source, // 6: __bold__ (never inside snake_case names)
  /\*(?=[^\s*])([\s\S]*?[^\s*])\*/.source, // 7: *italic* (not "2 * 3 * 4")
  /(?<!\w)_(?=[^\s_])([\s\S]*?[^\s_])_(?!\w)/.source, // 8: _italic_
].join("|"), "g");

/** The Markdown `text` as a DocumentFragment of safe DOM nodes (see above). */
function renderMarkdown(text) {
  const out = document.createDocumentFragment();
  const lines = String(text ?? "").replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if (!line.trim()) i += 1;
    else if ((m = line.match(FENCE))) i = codeBlock(out, lines, i, m);
    else if ((m = line.match(HEADING))) { out.append(heading(m)); i += 1; }
    else if (RULE.test(line)) { out.append(el("hr")); i += 1; }
    else if (LIST_ITEM.test(line)) i = list(out, lines, i);
    else i = paragraph(out, lines, i);
  }
  return out;
}

// A line that opens a block of its own, so it ends the paragraph or list item above it.
function startsBlock(line) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || LIST_ITEM.test(line);
}

function codeBlock(out, lines, start, fence) {
  const [, marker, info] = fence;
  const code = el("code");
  const lang = info.trim().split(/\s+/)[0];
  if (lang) code.dataset.lang = lang;
  const body = [];
  let i = start + 1;
  while (i < lines.length && !lines[i].trimStart().startsWith(marker)) body.push(lines[i++]);
  code.textContent = body.join("\n");
  const pre = el("pre");
  pre.append(code);
  out.append(pre);
  return i + 1; // past the closing fence; an unclosed fence runs to the end
}

// "#" to "###" are three levels under the page's own headings; deeper ones read as the smallest.
function heading(m) {
  const h = el(`h${2 + Math.min(3, m[1].length)}`);
  h.append(inline(m[2]));
  return h;
}

function paragraph(out, lines, start) {
  const p = el("p");
  let i = start;
  while (i < lines.length && lines[i].trim() && (i === start || !startsBlock(lines[i]))) {
    if (i > start) p.append(el("br")); // models do not hard-wrap: a line break is meant
    p.append(inline(lines[i].trim()));
    i += 1;
  }
  out.append(p);
  return i;
}

function listItem(line) {
  const m = line.match(LIST_ITEM);
  if (!m || RULE.test(line)) return null;
  return { indent: m[1].replace(/\t/g, "    ").length, kind: m[2] ? "ul" : "ol", number: Number(m[3]), text: m[4] };
}

// Whether `item` belongs to the list that `first` opened (deeper items nest in it).
function continues(item, first) {
  return item.indent > first.indent || (item.indent === first.indent && item.kind === first.kind);
}

// One list from lines[start]. A more indented item opens a list inside the current item, and blank lines between
// items do not end the list: models write "1. …\n\n2. …" and mean one list.
function list(out, lines, start) {
  const first = listItem(lines[start]);
  const listEl = el(first.kind);
  if (first.kind === "ol" && first.number !== 1) listEl.start = first.number;
  let li = null;
  let i = start;
  while (i < lines.length) {
    if (!lines[i].trim()) {
      let next = i;
      while (next < lines.length && !lines[next].trim()) next += 1;
      const after = next < lines.length ? listItem(lines[next]) : null;
      if (!after || !continues(after, first)) break;
      i = next;
      continue;
    }
    const item = listItem(lines[i]);
    if (item && li && item.indent > first.indent) {
      i = list(li, lines, i);
    } else if (item) {
      if (!continues(item, first)) break;
      li = el("li");
      li.append(inline(item.text));
      listEl.append(li);
      i += 1;
    } else if (startsBlock(lines[i])) {
      break;
    } else {
      li.append(el("br"), inline(lines[i].trim())); // a wrapped line of the item
      i += 1;
    }
  }
  out.append(listEl);
  return i;
}

function inline(text, links = true) {
  const out = document.createDocumentFragment();
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    out.append(text.slice(last, m.index), inlineNode(m, links));
    last = m.index + m[0].length;
  }
  out.append(text.slice(last));
  return out;
}

function inlineNode(m, links) {
  if (m[2] !== undefined) return el("code", m[2]);
  if (m[3] !== undefined) return link(m[3], m[4], links) ?? m[0]; // not a safe link: its text, as written
  const bold = m[5] ?? m[6];
  const node = el(bold !== undefined ? "strong" : "em");
  node.append(inline(bold ?? m[7] ?? m[8], links));
  return node;
}

// Only http(s) URLs become links (never javascript:, data:, …), opened in a new tab that cannot reach this page.
function link(text, href, allowed) {
  const url = allowed ? safeUrl(href) : null;
  if (!url) return null;
  const a = el("a");
  a.href = url;
  a.target = "_blank";
  a.rel = "noopener noreferrer";
  a.append(inline(text, false)); // no link inside a link
  return a;
}

function safeUrl(raw) {
  if (!/^https?:\/\//i.test(raw)) return null;
  try {
    const url = new URL(raw);
    return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
  } catch {
    return null;
  }
}

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

// KLE's certainty and the robustness probe come with the last chunk, seconds after the last token (the sampled and
// the attacked answers are still being decoded and compared): the answer says so rather than look stuck. The stream
// does not announce its last token, so it is inferred: the token budget is spent, an empty token (end of text), or
// no token for QUIET_MS.
function certaintyWait(msg, settings) {
  const kle = settings.certainty === "auto" || settings.certainty === "kle";
  const what = [kle && "certainty", settings.robustness && "robustness"].filter(Boolean).join(" and ");
  const note = el("div", `measuring ${what}…`, "measuring");
  note.setAttribute("role", "status");
  note.hidden = true;
  msg.append(note);
  const measures = Boolean(what);
  let timer = null;
  return {
    token(t) {
      clearTimeout(timer);
      note.hidden = true;
      if (!measures) return;
      const last = t.text === "" || (settings.max_tokens && t.index + 1 >= settings.max_tokens);
      if (last) note.hidden = false;
      else timer = setTimeout(() => { note.hidden = false; }, QUIET_MS);
    },
    done() {
      clearTimeout(timer);
      note.remove();
    },
  };
}

// A finished answer reads best formatted; the shaded tokens stay one click away.
function addViews(msg, answer, text) {
  const formatted = el("div", null, "formatted");
  formatted.append(renderMarkdown(text));
  const toggle = el("div", null, "view-toggle");
  toggle.setAttribute("role", "group");
  toggle.setAttribute("aria-label", "show the answer as");
  const views = [
    ["formatted", "the answer as formatted text"],
    ["tokens", "every token shaded by its trust signal; hover or tap one for details"],
  ];
  for (const [view, title] of views) {
    const button = el("button", view, `secondary view-${view}`);
    button.type = "button";
    button.title = title;
    button.dataset.view = view;
    button.addEventListener("click", () => showView(msg, view));
    toggle.append(button);
  }
  answer.after(formatted, toggle);
  showView(msg, "formatted");
}

function showView(msg, view) {
  msg.querySelector(".answer").hidden = view !== "tokens";
  msg.querySelector(".formatted").hidden = view !== "formatted";
  for (const button of msg.querySelectorAll(".view-toggle button")) {
    button.setAttribute("aria-pressed", String(button.dataset.view === view));
  }
}

function stat(label, value) {
  const span = el("span", null, "stat");
  span.append(`${label} `, el("strong", value));
  return span;
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
  const blob = new Blob([toJson(trust.transcript, 2)], { type: "application/json" });
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
  msg.append(el("div", message, "error"));
}

// ----- Certainty, Security, Robustness --------------------------------------------------------------------------
// Each card: a value, its tier (coloured ok / warn / bad, or na without one), what it was measured with, a caption,
// and an explanation behind its (i) button (also its tooltip).

const pct = (x) => `${Math.round(100 * x)}%`;
const riskRule = (top) => `low ≥ ${pct(RISK_TIERS.low)} of ${top}, moderate ≥ ${pct(RISK_TIERS.moderate)}, else high`;

const ABOUT = {
  certainty: "How likely the answer is to be right. Multiple choice: the uncertainty head's probability that the "
    + "chosen option is correct. Free text: Kernel Language Entropy (KLE); the jury writes a few more answers at "
    + "temperature 1, and the more they agree in meaning, the higher the certainty. High from "
    + `${pct(CERTAINTY_TIERS.high)}, moderate from ${pct(CERTAINTY_TIERS.moderate)}, low below. The Certainty `
    + "setting picks the method.",
  security: (top) => "Guards against poisoned training data: the other heads check every token a head drafts, and a "
    + "draft they reject is resampled. A resampled token's validity radius is how many verifier votes would have to "
    + `flip to let the rejected draft through (at most ${top ?? "V/2 + 1"} with this jury): higher is more decisive. `
    + `Risk from the mean radius: ${riskRule("the largest possible")}; low when nothing was resampled.`,
  robustness: "Whether the answer holds when adversarial (jailbreak) suffixes, found by GCG against the model, are "
    + "appended to the question: the jury answers again with each (the same settings and seed) and the share of "
    + "suffixes that left the answer as it was is the robustness. Multiple choice: a suffix flips the answer when "
    + "the chosen letter changes. Free text: when the two answers' similarity (both directions summed, 0 to 2) is "
    + "at most 1. Stable when nothing flipped; some flips up to a third of the suffixes; many beyond. The "
    + "Robustness probe setting turns it on (3 more answers).",
};

function certaintyCard(c) {
  const card = { key: "certainty", name: "Certainty", about: ABOUT.certainty, value: "n/a", level: "na" };
  if (!c) return { ...card, caption: "this server reports no certainty" };
  const kle = c.n_samples ? `KLE over ${c.n_samples} answers` : "KLE";
  card.method = { uncertainty_head: "uncertainty head", kle }[c.method] ?? "not measured";
  if (typeof c.value !== "number") return { ...card, caption: c.reason ?? "no value" };
  const tier = c.value >= CERTAINTY_TIERS.high ? "high" : c.value >= CERTAINTY_TIERS.moderate ? "moderate" : "low";
  const caption = c.method === "uncertainty_head"
    ? "p(correct) of the option the jury chose"
    : "how much the sampled answers agree in meaning";
  return { ...card, value: pct(c.value), tier, level: { high: "ok", moderate: "warn", low: "bad" }[tier], caption };
}

function securityCard(s) {
  const card = { key: "security", name: "Security", about: ABOUT.security(s?.max_validity_radius), value: "n/a",
    level: "na" };
  if (!s) return { ...card, caption: "this server reports no security summary" };
  if (!s.risk) return { ...card, caption: s.reason };
  const level = { low: "ok", moderate: "warn", high: "bad" }[s.risk];
  const tier = `${s.risk} risk`;
  if (!s.n_resampled) return { ...card, value: "0 resampled", tier, level, caption: `low: ${s.reason}` };
  const tokens = `${s.n_resampled} resampled token${s.n_resampled === 1 ? "" : "s"}`;
  return {
    ...card, tier, level,
    value: `${s.mean_validity_radius.toFixed(2)} / ${s.max_validity_radius}`,
    method: `mean validity radius of ${tokens}`,
    caption: riskRule(s.max_validity_radius),
  };
}

function robustnessCard(r) {
  const card = { key: "robustness", name: "Robustness", about: ABOUT.robustness, value: "n/a", level: "na" };
  if (!r) return { ...card, caption: "this server reports no robustness" };
  if (typeof r.value !== "number") return { ...card, value: "not measured", caption: r.reason ?? "no value" };
  const ratio = r.attempts ? r.flips / r.attempts : 0;
  const [tier, level] = r.flips === 0 ? ["stable", "ok"] : ratio <= FLIP_WARN_RATIO ? ["some flips", "warn"]
    : ["many flips", "bad"];
  return {
    ...card, tier, level,
    value: pct(r.value),
    method: r.type === "mcq" ? "the chosen letter under attack" : `the meaning under attack (${r.similarity})`,
    caption: `${r.flips} of ${r.attempts} suffix${r.attempts === 1 ? "" : "es"} flipped the answer`,
  };
}

let aboutIds = 0;

function metric(card) {
  const section = el("section", null, `metric ${card.key} ${card.level}`);
  section.setAttribute("aria-label", card.name);
  const about = el("p", card.about, "metric-about");
  about.id = `about-${++aboutIds}`;
  about.hidden = true;
  const info = el("button", "i", "info");
  info.type = "button";
  info.title = card.about;
  info.setAttribute("aria-label", `About ${card.name.toLowerCase()}`);
  info.setAttribute("aria-expanded", "false");
  info.setAttribute("aria-controls", about.id);
  info.addEventListener("click", () => {
    about.hidden = !about.hidden;
    info.setAttribute("aria-expanded", String(!about.hidden));
  });
  const head = el("div", null, "metric-head");
  head.append(el("span", card.name, "metric-name"), info);
  const value = el("div", null, "metric-value");
  value.append(el("span", card.value, "value"));
  if (card.tier) value.append(el("span", card.tier, "tier"));
  section.append(head, value);
  if (card.method) section.append(el("div", card.method, "metric-method"));
  if (card.caption) section.append(el("p", card.caption, "metric-caption"));
  section.append(about);
  return section;
}

function renderMetrics(msg, trust) {
  const metrics = el("div", null, "metrics");
  metrics.append(
    metric(certaintyCard(trust.certainty)),
    metric(securityCard(trust.security)),
    metric(robustnessCard(trust.robustness)),
  );
  msg.append(metrics);
}

// ----- the inspect panel (KLE) ----------------------------------------------------------------------------------

function renderInspect(msg, certainty) {
  if (certainty?.method !== "kle" || !certainty.samples?.length) return;
  const claims = certainty.claims ?? [];
  const details = el("details", null, "inspect certainty-inspect");
  const n = certainty.samples.length;
  details.append(el("summary", `Inspect the certainty: ${n} sampled answers, ${claims.length} `
    + `claim${claims.length === 1 ? "" : "s"}`));
  const facts = el("p", null, "inspect-facts");
  facts.append("similarity ", el("code", certainty.similarity ?? "–"),
    ` · kernel language entropy ${fmt(certainty.entropy, 3)}`,
    ` · answers sampled at temperature ${certainty.temperature ?? "–"}`);
  if (typeof certainty.overall_confidence === "number") {
    facts.append(` · claims overall ${pct(certainty.overall_confidence)}`);
  }
  details.append(facts, el("h4", "Claims in this answer"), claimList(claims),
    el("h4", "Sampled answers"), sampleList(certainty.samples));
  msg.append(details);
}

// Each claim of the answer with its confidence against the sampled answers, its tier and what to do about it.
function claimList(claims) {
  if (!claims.length) return el("p", "No claims: nothing in the answer states a fact to check.", "muted");
  const ol = el("ol", null, "claims");
  for (const claim of claims) {
    const level = claim.confidence_level ?? "none";
    const li = el("li", null, `claim ${level}`);
    const text = el("div", null, "claim-text");
    text.append(inline(claim.text));
    const score = el("div", null, "claim-score");
    score.append(el("strong", typeof claim.confidence === "number" ? pct(claim.confidence) : "n/a"),
      " ", el("span", claim.confidence_level ?? "", "tier"));
    const row = el("div", null, "claim-row");
    row.append(text, score);
    li.append(row);
    if (claim.guidance) li.append(el("p", claim.guidance, "guidance"));
    ol.append(li);
  }
  return ol;
}

function sampleList(samples) {
  const ol = el("ol", null, "samples");
  samples.forEach((sample, i) => {
    const li = el("li");
    const text = el("div", null, "sample-text");
    text.append(renderMarkdown(sample.text));
    li.append(el("div", `answer ${i + 1} · seed ${sample.seed}`, "sample-seed"), text);
    ol.append(li);
  });
  return ol;
}

// ----- the inspect panel (robustness) ---------------------------------------------------------------------------
// Each adversarial suffix, shown as text (never markup: it is arbitrary text a search produced), and the answer it
// got next to the clean one, both through the safe Markdown renderer.

function renderRobustness(msg, robustness, clean) {
  if (!robustness?.attacks?.length) return;
  const n = robustness.attacks.length;
  const details = el("details", null, "inspect robustness-inspect");
  details.append(el("summary", `Inspect the robustness: ${n} adversarial suffix${n === 1 ? "" : "es"}, `
    + `${robustness.flips} flipped the answer`));
  const facts = el("p", null, "inspect-facts");
  if (robustness.type === "mcq") {
    facts.append(`multiple choice: flipped when the letter differs from the clean answer's (${
      robustness.clean_choice ?? "none: the whole text is compared"})`);
  } else {
    facts.append("free text: flipped when the similarity ", el("code", robustness.similarity ?? "–"),
      ` is at most ${robustness.threshold} of 2`);
  }
  const bank = robustness.bank ?? {};
  facts.append(` · suffixes from the attack bank for ${bank.model || "an unnamed model"}`
    + (bank.matches_model ? " (these weights)" : " (other weights: transferred)"));
  facts.append(` · seed ${robustness.seed}`);
  const ol = el("ol", null, "attacks");
  robustness.attacks.forEach((attack, i) => {
    const li = el("li", null, `attack ${attack.flipped ? "flipped" : "held"}`);
    const head = el("div", null, "attack-head");
    head.append(el("strong", `suffix ${i + 1}`), " ", el("span", attack.flipped ? "flipped" : "held", "tier"));
    if (typeof attack.similarity === "number") head.append(` · similarity ${fmt(attack.similarity, 2)} of 2`);
    if (robustness.type === "mcq") head.append(` · letter ${attack.choice ?? "none"}`);
    const suffix = el("code", attack.suffix, "suffix");
    const pair = el("div", null, "attack-pair");
    for (const [label, text] of [["without the suffix", clean], ["with the suffix", attack.answer]]) {
      const side = el("div", null, "attack-answer");
      side.append(el("div", label, "sample-seed"), renderMarkdown(text));
      pair.append(side);
    }
    li.append(head, suffix, pair);
    ol.append(li);
  });
  details.append(facts, ol);
  msg.append(details);
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
      if (data) yield parseJson(data);
    }
  }
}

function finishAnswer(msg, answer, reply, trust) {
  msg.dataset.verifiers = trust.verifier_heads.length;
  answer.querySelectorAll(".tok").forEach(shade);
  addViews(msg, answer, reply);
  renderMetrics(msg, trust);
  renderCard(msg, trust);
  renderInspect(msg, trust.certainty);
  renderRobustness(msg, trust.robustness, reply);
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
  const wait = certaintyWait(msg, settings);
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
        wait.done();
        finishAnswer(msg, answer, reply, chunk.trust);
        finished = true;
      } else if (chunk.trust) {
        addToken(answer, chunk.trust);
        wait.token(chunk.trust);
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
    wait.done();
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

// For tests and the curious: the renderer every answer goes through.
window.olmoTap = Object.freeze({ renderMarkdown });

restoreSettings();
updateLegend();
loadModel();
