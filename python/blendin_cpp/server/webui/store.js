// What the page keeps in the browser (localStorage): the conversations and the settings.
// Nothing is sent anywhere but to this server's API.

const CONVERSATIONS = "blendin.conversations";
const SETTINGS = "blendin.settings";

function read(key, fallback) {
  try {
    const value = JSON.parse(localStorage.getItem(key));
    return value ?? fallback;
  } catch {
    return fallback; // storage off, or a value another version wrote: start afresh
  }
}

function write(key, value) {
  try {
    localStorage.setItem(key, JSON.stringify(value));
    return true;
  } catch {
    return false; // full or disabled: the page still works, it just forgets on reload
  }
}

// A conversation: {id, title, turns: [{role: "user", content} | {role: "assistant", answers: [...]}]};
// an answer: {method, tokens: [step, ...], stats, error, stopped}. Newest conversation first.
export function loadConversations() {
  return read(CONVERSATIONS, []);
}

// When the browser's storage is full, the oldest conversations are forgotten first.
export function saveConversations(conversations) {
  for (let kept = conversations.length; kept > 0; kept--) {
    if (write(CONVERSATIONS, conversations.slice(0, kept))) return;
  }
}

export function newConversation() {
  return { id: `${Date.now()}-${Math.random().toString(36).slice(2, 8)}`, title: "New chat", turns: [] };
}

// Settings: {values: {name: text typed}, av: {name: text}, apiKey, method, compare}. An empty value
// is left out of requests (the server's default applies).
export function loadSettings() {
  return { values: {}, av: {}, apiKey: "", method: "", compare: false, ...read(SETTINGS, {}) };
}

export function saveSettings(settings) {
  write(SETTINGS, settings);
}
