// The settings form, built from the server's own table (GET /v1/parameters): one field per
// parameter it lists, with the value an empty field sends as placeholder (its chat_default: the
// terminal chat's defaults, which keep small models from looping) and the core's range as hint.
// The page checks nothing itself: the server refuses a bad value and its message is shown.

function field(param, value, onInput) {
  const label = document.createElement("label");
  label.className = "field";
  label.dataset.param = param.name;
  const name = document.createElement("span");
  name.className = "name";
  name.textContent = param.name;
  const input = document.createElement("input");
  input.type = "text";
  input.name = param.name;
  input.dataset.testid = `param-${param.name}`;
  input.inputMode = param.type === "integer" ? "numeric" : "decimal";
  input.autocomplete = "off";
  const shown = param.chat_default ?? param.default;
  input.placeholder = shown === null || shown === undefined ? "off" : String(shown);
  input.value = value ?? "";
  input.addEventListener("input", () => onInput(input.value));
  const hint = document.createElement("span");
  hint.className = "range";
  hint.textContent = [param.range, ...(param.choices ?? []).map((c) => `or "${c}"`)].filter(Boolean).join(" ");
  if (param.choices?.length) {
    const list = document.createElement("datalist");
    list.id = `choices-${param.name}`;
    for (const c of param.choices) list.append(new Option(c, c));
    input.setAttribute("list", list.id);
    label.append(list);
  }
  label.prepend(name);
  label.append(input, hint);
  return label;
}

// Fills the method selector and the settings panel; `settings` (store.js) is updated as the user
// types and `save()` called.
export function buildSettings(table, settings, { methodSelect, fields, avFields, save }) {
  fields.replaceChildren();
  avFields.replaceChildren();
  for (const param of table.parameters) {
    if (param.name === "method") {
      methodSelect.replaceChildren(...param.choices.map((m) => new Option(m, m)));
      methodSelect.value = param.choices.includes(settings.method) ? settings.method : param.default;
      continue;
    }
    fields.append(field(param, settings.values[param.name], (text) => {
      settings.values[param.name] = text;
      save();
    }));
  }
  const av = Object.entries(table.av_scales ?? {});
  if (av.length) {
    const heading = document.createElement("h3");
    heading.textContent = "Alignment Vector scales";
    avFields.append(heading);
  }
  for (const [name, scale] of av) {
    avFields.append(field({ name, type: "number", default: scale, range: "a finite number" }, settings.av[name],
      (text) => {
        settings.av[name] = text;
        save();
      }));
  }
}

// A typed value as JSON: true or false, a number where it reads as one, else the text as typed
// (the server accepts "auto" for alpha and refuses the rest with its own message).
function value(text) {
  if (text === "true" || text === "false") return text === "true";
  const n = Number(text);
  return text.trim() !== "" && Number.isFinite(n) ? n : text;
}

// The request fields the settings add: what was typed, else the chat's default where it is not
// the server's (the rest is left to the server).
export function requestFields(table, settings) {
  const body = {};
  for (const param of table.parameters) {
    if (param.name === "method") continue;
    const text = (settings.values[param.name] ?? "").trim();
    if (text !== "") body[param.name] = value(text);
    else if (param.chat_default !== undefined && param.chat_default !== param.default) body[param.name] = param.chat_default;
  }
  const av = Object.entries(settings.av).filter(([name, text]) => name in (table.av_scales ?? {}) && text.trim());
  if (av.length) body.av_scales = Object.fromEntries(av.map(([name, text]) => [name, value(text.trim())]));
  return body;
}

// Marks the field the server refused (or none).
export function markInvalid(container, param) {
  for (const el of container.querySelectorAll(".field")) el.classList.toggle("invalid", el.dataset.param === param);
}
