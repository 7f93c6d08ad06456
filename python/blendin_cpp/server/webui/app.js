// The chat page: conversations, sending a question, streaming the answer(s), stop, compare.

import { ApiError, getParameters, streamChat } from "./api.js";
import { addToken, answerElement, answerText, installTooltip, updateAnswer } from "./answer.js";
import { buildSettings, markInvalid, requestFields } from "./settings.js";
import { loadConversations, loadSettings, newConversation, saveConversations, saveSettings } from "./store.js";

const $ = (id) => document.getElementById(id);
const ui = {
  sidebar: $("sidebar"), conversations: $("conversations"), transcript: $("transcript"), prompt: $("prompt"),
  composer: $("composer"), send: $("send"), stop: $("stop"), method: $("method"), compare: $("compare"),
  settings: $("settings"), fields: $("settings-fields"), avFields: $("av-fields"), apiKey: $("api-key"),
  error: $("error"),
};

// Compare answers the same prompt with these two, then with the chosen method (the answer the
// conversation goes on from, so it comes last).
const COMPARED = ["base", "guide"];
// What the page keeps of each token's trace (the rest would only fill the browser's storage).
const KEPT = ["text", "token", "source", "alpha", "pb_max", "pg_max", "intervened", "capped"];
const TITLE_CHARS = 48;

const settings = loadSettings();
let conversations = loadConversations();
let current = null;
let table = null; // GET /v1/parameters
let running = []; // AbortControllers of the answers streaming now

function showError(message, param = null) {
  ui.error.textContent = message ?? "";
  ui.error.hidden = !message;
  markInvalid(ui.settings, param);
  if (param && param !== "messages") ui.settings.hidden = false; // the refused field is in the panel
}

// ---- conversations ----------------------------------------------------------------------------
function save() {
  saveConversations(conversations);
  renderList();
}

function renderList() {
  ui.conversations.replaceChildren(...conversations.map((c) => {
    const li = document.createElement("li");
    li.classList.toggle("current", c === current);
    const open = document.createElement("button");
    open.type = "button";
    open.className = "open";
    open.textContent = c.title;
    open.addEventListener("click", () => select(c));
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "remove";
    remove.title = "delete this conversation";
    remove.textContent = "\u00d7";
    remove.addEventListener("click", () => {
      conversations = conversations.filter((x) => x !== c);
      if (c === current) select(conversations[0] ?? null);
      save();
    });
    li.append(open, remove);
    return li;
  }));
}

function select(conversation) {
  stop();
  current = conversation;
  ui.transcript.replaceChildren(...(current?.turns ?? []).map(turnElement));
  ui.transcript.scrollTop = ui.transcript.scrollHeight;
  renderList();
  document.body.classList.remove("sidebar-open");
}

function startNewChat() {
  select(null); // a conversation is stored once it has a question
  ui.prompt.focus();
}

// ---- turns ------------------------------------------------------------------------------------
async function copyText(answer, button) {
  const text = answerText(answer);
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    // no clipboard API (a page on plain http from another machine): the old way
    const area = document.createElement("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  button.textContent = "copied";
  setTimeout(() => { button.textContent = "copy"; }, 1500);
}

function turnElement(turn) {
  const el = document.createElement("div");
  el.className = `turn ${turn.role}`;
  if (turn.role === "user") {
    el.dataset.testid = "user";
    el.textContent = turn.content;
    return el;
  }
  el.classList.toggle("compare", turn.answers.length > 1);
  el.append(...turn.answers.map((a) => answerElement(a, { onCopy: copyText })));
  return el;
}

// The messages the server reads: the terminal chat's system prompt (none on the demo pair; the
// guide reads it, the base's transcript leaves it out), each
// question, and each earlier answer the conversation went on from.
function messages(turns) {
  const system = table && table.system ? [{ role: "system", content: table.system }] : [];
  return system.concat(turns.map((t) => (t.role === "user" ? { role: "user", content: t.content }
    : { role: "assistant", content: answerText(t.answers[t.answers.length - 1]) }))
    .filter((m) => m.content));
}

async function runAnswer(el, history, fields) {
  const answer = el.blendin.answer;
  const controller = new AbortController();
  running.push(controller);
  try {
    answer.stats = await streamChat({ ...fields, messages: history, method: answer.method }, {
      apiKey: settings.apiKey,
      signal: controller.signal,
      onStep: (step) => {
        const kept = Object.fromEntries(KEPT.map((k) => [k, step[k]]));
        answer.tokens.push(kept);
        addToken(el, kept);
      },
    });
  } catch (e) {
    if (e.name === "AbortError") {
      answer.stopped = true;
    } else {
      answer.error = e.message;
      answer.refused = e instanceof ApiError && e.status !== null && answer.tokens.length === 0;
      showError(e.message, e.param);
    }
  } finally {
    running = running.filter((c) => c !== controller);
    updateAnswer(el);
  }
}

async function send() {
  const question = ui.prompt.value.trim();
  if (!question || running.length || !table) return;
  showError(null);
  if (!current) {
    current = newConversation();
    conversations.unshift(current);
  }
  if (current.turns.length === 0) current.title = question.slice(0, TITLE_CHARS);
  const chosen = ui.method.value;
  const methods = ui.compare.checked ? [...COMPARED, chosen] : [chosen];
  const history = messages([...current.turns, { role: "user", content: question }]);
  const user = { role: "user", content: question };
  const reply = { role: "assistant", answers: methods.map((method) => ({ method, tokens: [], stats: null })) };
  current.turns.push(user, reply);
  const userEl = turnElement(user);
  const replyEl = turnElement(reply);
  ui.transcript.append(userEl, replyEl);
  ui.transcript.scrollTop = ui.transcript.scrollHeight;
  ui.prompt.value = "";
  setStreaming(true);
  save();
  const fields = requestFields(table, settings);
  await Promise.all([...replyEl.querySelectorAll(".answer")].map((el) => runAnswer(el, history, fields)));
  setStreaming(false);
  if (reply.answers.every((a) => a.refused)) {
    // the server refused the request: nothing was said, the question goes back to the box
    current.turns.splice(current.turns.indexOf(user), 2);
    userEl.remove();
    replyEl.remove();
    ui.prompt.value = question;
    if (current.turns.length === 0) conversations = conversations.filter((c) => c !== current);
  }
  save();
}

function stop() {
  for (const controller of running) controller.abort();
}

function setStreaming(on) {
  ui.send.hidden = on;
  ui.stop.hidden = !on;
  document.body.classList.toggle("streaming", on);
}

// ---- settings ---------------------------------------------------------------------------------
async function loadTable() {
  try {
    table = await getParameters(settings.apiKey);
  } catch (e) {
    showError(`the server's parameters could not be read: ${e.message}`);
    if (e.status === 401) ui.settings.hidden = false; // the API key goes in the panel
    return;
  }
  buildSettings(table, settings, {
    methodSelect: ui.method, fields: ui.fields, avFields: ui.avFields, save: () => saveSettings(settings),
  });
  showError(null);
}

// ---- wiring -----------------------------------------------------------------------------------
ui.composer.addEventListener("submit", (e) => {
  e.preventDefault();
  send();
});
ui.prompt.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    send();
  }
});
ui.stop.addEventListener("click", stop);
$("new-chat").addEventListener("click", startNewChat);
$("toggle-sidebar").addEventListener("click", () => document.body.classList.toggle("sidebar-open"));
$("toggle-settings").addEventListener("click", () => { ui.settings.hidden = !ui.settings.hidden; });
$("reset-settings").addEventListener("click", () => {
  settings.values = {};
  settings.av = {};
  settings.method = "";
  saveSettings(settings);
  loadTable();
});
ui.method.addEventListener("change", () => {
  settings.method = ui.method.value;
  saveSettings(settings);
});
ui.compare.checked = settings.compare;
ui.compare.addEventListener("change", () => {
  settings.compare = ui.compare.checked;
  saveSettings(settings);
});
ui.apiKey.value = settings.apiKey;
ui.apiKey.addEventListener("change", () => {
  settings.apiKey = ui.apiKey.value;
  saveSettings(settings);
  loadTable();
});

installTooltip($("tooltip"));
select(conversations[0] ?? null);
loadTable();
