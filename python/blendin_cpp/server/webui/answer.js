// One assistant answer on the page: a span per token coloured by its source (base / blend /
// guide), the tooltip that explains a token, the statistics line and the excessive-intervention
// warning the server sends.

const fixed = (x, digits = 2) => (x === null || x === undefined ? "n/a" : Number(x).toFixed(digits));

// Spaces and line ends made visible, so that a tooltip shows what the token really is.
const visible = (text) => text.replace(/ /g, "\u2423").replace(/\n/g, "\u23ce").replace(/\t/g, "\u21e5");

function gate(step, method) {
  if (method === "base") return "none: the base writes alone";
  if (step.capped) return "closed by max_intervention_rate (the base wrote it)";
  if (step.intervened) return "open: the guide was consulted";
  if (step.source === "guide") return "none: the guide writes alone";
  return "closed: the base was confident enough";
}

function tooltipText(step, method) {
  return [
    `token  ${JSON.stringify(visible(step.text))}  (id ${step.token})`,
    `source  ${step.source}`,
    `alpha  ${fixed(step.alpha)}`,
    `base top p  ${fixed(step.pb_max)}`,
    `guide top p  ${fixed(step.pg_max)}`,
    `gate  ${gate(step, method)}`,
  ].join("\n");
}

function statsText(answer) {
  const s = answer.stats;
  const parts = [];
  if (s) {
    parts.push(`${s.tokens} tokens`, `intervention rate ${Math.round(100 * s.intervention_rate)}%`,
      `${fixed(s.tokens_per_s, 1)} tok/s`);
    if (s.finish_reason !== "stop") parts.push(`ended by ${s.finish_reason}`);
  } else {
    parts.push(`${answer.tokens.length} tokens`); // stopped or failed: the server sent no statistics
  }
  parts.push(`method ${answer.method}`);
  if (answer.stopped) parts.push("stopped");
  return parts.join(" \u00b7 ");
}

// The answer's element: <article data-testid="assistant" data-method=...>, its tokens, its footer.
export function answerElement(answer, { onCopy } = {}) {
  const el = document.createElement("article");
  el.className = "answer";
  el.dataset.testid = "assistant";
  el.dataset.method = answer.method;
  const label = document.createElement("div");
  label.className = "answer-method";
  label.textContent = answer.method;
  const text = document.createElement("div");
  text.className = "tokens";
  const footer = document.createElement("footer");
  const stats = document.createElement("span");
  stats.className = "stats";
  stats.dataset.testid = "stats";
  const copy = document.createElement("button");
  copy.type = "button";
  copy.className = "copy";
  copy.dataset.testid = "copy";
  copy.textContent = "copy";
  copy.addEventListener("click", () => onCopy?.(answer, copy));
  footer.append(stats, copy);
  const warning = document.createElement("div");
  warning.className = "warning";
  warning.dataset.testid = "warning";
  const error = document.createElement("div");
  error.className = "answer-error";
  el.append(label, text, warning, error, footer);
  el.blendin = { answer, text, stats, warning, error, pending: [], scheduled: false };
  text.append(...answer.tokens.map(tokenSpan));
  updateAnswer(el);
  return el;
}

function tokenSpan(step) {
  const span = document.createElement("span");
  span.className = "tok";
  span.dataset.source = step.source;
  span.textContent = step.text;
  span.blendinStep = step;
  return span;
}

// Tokens arrive faster than a page can lay itself out after each (hundreds a second): they are
// added once per frame, so that the page stays responsive (Stop can be clicked) however fast they come.
function flush(el) {
  const { pending, text } = el.blendin;
  el.blendin.scheduled = false;
  if (!pending.length) return;
  const scroller = el.closest("#transcript");
  const atBottom = scroller && scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 40;
  text.append(...pending.splice(0).map(tokenSpan));
  if (atBottom) scroller.scrollTop = scroller.scrollHeight; // follow the answer unless the reader scrolled up
}

export function addToken(el, step) {
  el.blendin.pending.push(step);
  if (!el.blendin.scheduled) {
    el.blendin.scheduled = true;
    requestAnimationFrame(() => flush(el));
  }
}

// Refresh the footer: statistics once the answer ends, the warning, an error.
export function updateAnswer(el) {
  flush(el);
  const { answer, stats, warning, error } = el.blendin;
  stats.textContent = answer.stats || answer.stopped || answer.error ? statsText(answer) : "";
  warning.textContent = answer.stats?.warning ? `warning: ${answer.stats.warning}` : "";
  warning.hidden = !warning.textContent;
  error.textContent = answer.error ?? "";
  error.hidden = !answer.error;
  el.classList.toggle("streaming", !(answer.stats || answer.stopped || answer.error));
}

export const answerText = (answer) => answer.tokens.map((t) => t.text).join("");

// One tooltip for the whole page: shown for the token under the pointer, or the one tapped (phones).
export function installTooltip(tooltip) {
  let shownFor = null;
  const show = (span) => {
    shownFor = span;
    tooltip.textContent = tooltipText(span.blendinStep, span.closest(".answer").dataset.method);
    tooltip.dataset.source = span.dataset.source;
    tooltip.hidden = false;
    const r = span.getBoundingClientRect();
    const width = tooltip.offsetWidth;
    const left = Math.min(Math.max(4, r.left), window.innerWidth - width - 4);
    const below = r.bottom + 6 + tooltip.offsetHeight < window.innerHeight;
    tooltip.style.left = `${left + window.scrollX}px`;
    tooltip.style.top = `${(below ? r.bottom + 6 : r.top - tooltip.offsetHeight - 6) + window.scrollY}px`;
  };
  const hide = () => {
    shownFor = null;
    tooltip.hidden = true;
  };
  const tokenAt = (target) => (target instanceof Element ? target.closest(".answer .tok") : null);
  document.addEventListener("mouseover", (e) => {
    const span = tokenAt(e.target);
    if (span && span !== shownFor) show(span);
    else if (!span && shownFor) hide();
  });
  document.addEventListener("click", (e) => {
    const span = tokenAt(e.target);
    if (span && span !== shownFor) show(span);
    else if (!tooltip.contains(e.target)) hide();
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape") hide();
  });
}
