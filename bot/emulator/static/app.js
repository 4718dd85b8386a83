// Sandbox chat page: plays a Telegram user against the local Bot API emulator.
// Everything from the bot or the user is rendered with textContent / DOM nodes, never innerHTML.
"use strict";

const API = "/_emulator";
const CONTROL = { "X-Emulator-Control": "1" };
const POLL_MS = 700;
const $ = (id) => document.getElementById(id);

const state = {
  userId: loadUserId(),
  lastSeq: 0,
  answered: new Set(),
  polling: false,
  primed: false,
};

function loadUserId() {
  let id = Number(localStorage.getItem("sandbox.userId"));
  if (!Number.isSafeInteger(id) || id <= 0) {
    id = 100000000 + Math.floor(Math.random() * 899999999);
    localStorage.setItem("sandbox.userId", String(id));
  }
  return id;
}

function userPath(suffix) {
  return `${API}/users/${state.userId}/${suffix}`;
}

function profile() {
  return { first_name: $("first-name").value.trim() || "Patient", language_code: $("language").value };
}

async function call(method, path, body) {
  const init = { method, headers: { ...CONTROL } };
  if (body instanceof FormData) {
    init.body = body;
  } else if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.error || `HTTP ${response.status}`);
  return data;
}

function toast(text) {
  const box = $("toast");
  box.textContent = text;
  box.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { box.hidden = true; }, 3500);
}

// --- rendering ---------------------------------------------------------------------------------------
const ENTITY_CLASS = { bold: "b", italic: "i", underline: "u", strikethrough: "s", code: "code", pre: "code", spoiler: "spoiler" };

function safeHref(url) {
  try {
    const parsed = new URL(url, window.location.href);
    return parsed.protocol === "https:" || parsed.protocol === "http:" ? parsed.href : null;
  } catch {
    return null;
  }
}

// Text with Telegram entities (offsets are UTF-16 units, which is what JS strings index).
function richText(text, entities, className) {
  const root = document.createElement("div");
  root.className = className;
  const cuts = new Set([0, text.length]);
  for (const e of entities || []) { cuts.add(e.offset); cuts.add(e.offset + e.length); }
  const points = [...cuts].filter((n) => n >= 0 && n <= text.length).sort((a, b) => a - b);
  for (let k = 0; k < points.length - 1; k++) {
    const [start, end] = [points[k], points[k + 1]];
    const active = (entities || []).filter((e) => e.offset <= start && e.offset + e.length >= end);
    const link = active.find((e) => e.type === "text_link" || e.type === "url");
    const href = link ? safeHref(link.type === "url" ? text.slice(link.offset, link.offset + link.length) : link.url) : null;
    const node = document.createElement(href ? "a" : "span");
    if (href) { node.href = href; node.target = "_blank"; node.rel = "noopener noreferrer"; }
    node.className = active.map((e) => ENTITY_CLASS[e.type]).filter(Boolean).join(" ");
    node.textContent = text.slice(start, end);
    root.append(node);
  }
  return root;
}

function fileUrl(url) {
  // Only the emulator's own file URLs are ever used as sources.
  return typeof url === "string" && url.startsWith(`${API}/files/`) ? url : null;
}

function image(url, alt) {
  const img = document.createElement("img");
  const src = fileUrl(url);
  if (src) img.src = src;
  img.alt = alt;
  img.loading = "lazy";
  return img;
}

function inlineKeyboard(view) {
  const rows = (view.reply_markup && view.reply_markup.inline_keyboard) || [];
  if (!rows.length || view.from !== "bot") return null;
  const box = document.createElement("div");
  box.className = "keyboard";
  for (const row of rows) {
    const line = document.createElement("div");
    line.className = "row";
    for (const button of row) {
      const href = button.url ? safeHref(button.url) : null;
      let node;
      if (href) {
        node = document.createElement("a");
        node.href = href; node.target = "_blank"; node.rel = "noopener noreferrer";
      } else {
        node = document.createElement("button");
        node.type = "button";
        if (typeof button.callback_data === "string") {
          node.addEventListener("click", () => press(node, view.message_id, button.callback_data));
        } else {
          node.disabled = true;
        }
      }
      node.textContent = button.text;
      line.append(node);
    }
    box.append(line);
  }
  return box;
}

function renderBubble(view) {
  const item = document.createElement("li");
  item.className = `msg ${view.from === "bot" ? "bot" : "user"}`;
  item.dataset.mid = String(view.message_id);
  item.dataset.kind = view.kind;
  if (view.kind === "text") {
    item.append(richText(view.text || "", view.entities, "text"));
  } else if (view.kind === "photo") {
    item.append(image(view.files[0], view.caption || "photo"));
  } else if (view.kind === "media_group") {
    const grid = document.createElement("div");
    grid.className = "album";
    view.files.forEach((url, index) => {
      const figure = document.createElement("figure");
      const caption = (view.captions || [])[index];
      figure.append(image(url, caption || `photo ${index + 1}`));
      if (caption) {
        const text = document.createElement("figcaption");
        text.textContent = caption;
        figure.append(text);
      }
      grid.append(figure);
    });
    item.append(grid);
  } else if (view.kind === "document") {
    const link = document.createElement("a");
    link.className = "document";
    const href = fileUrl(view.files[0]);
    if (href) link.href = href;
    link.download = view.file_name || "document";
    link.textContent = `\u{1F4C4} ${view.file_name || "document"}`;
    item.append(link);
  }
  if (view.caption && view.kind !== "media_group") {
    const caption = document.createElement("div");
    caption.className = "caption";
    caption.textContent = view.caption;
    item.append(caption);
  }
  const keyboard = inlineKeyboard(view);
  if (keyboard) item.append(keyboard);
  const meta = document.createElement("div");
  meta.className = "meta";
  const time = view.date ? new Date(view.date * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }) : "";
  meta.textContent = view.edited ? `edited ${time}` : time;
  item.append(meta);
  return item;
}

function place(view) {
  const chat = $("chat");
  const existing = chat.querySelector(`li[data-mid="${Number(view.message_id)}"]`);
  if (view.deleted) {
    if (existing) existing.remove();
    return;
  }
  const bubble = renderBubble(view);
  if (existing) {
    existing.replaceWith(bubble); // edits update the message in place
    return;
  }
  const later = [...chat.children].find((li) => Number(li.dataset.mid) > view.message_id);
  chat.insertBefore(bubble, later || null);
  chat.scrollTop = chat.scrollHeight;
}

function quickReplies(views) {
  // The latest reply keyboard (or its removal) from the bot decides what is shown under the chat.
  const box = $("quick-replies");
  const withKeyboard = views.filter((v) => v.from === "bot" && v.reply_markup && !v.reply_markup.inline_keyboard);
  if (!withKeyboard.length) return;
  const markup = withKeyboard[withKeyboard.length - 1].reply_markup;
  box.replaceChildren();
  box.hidden = !markup.keyboard;
  for (const row of markup.keyboard || []) {
    for (const button of row) {
      const label = typeof button === "string" ? button : button.text;
      const node = document.createElement("button");
      node.type = "button";
      node.textContent = label;
      node.addEventListener("click", () => {
        sendText(label);
        if (markup.one_time_keyboard) box.hidden = true;
      });
      box.append(node);
    }
  }
}

// --- talking to the bot ------------------------------------------------------------------------------
async function sendText(text) {
  if (!text.trim()) return;
  try {
    await call("POST", userPath("text"), { text, ...profile() });
    await poll();
  } catch (error) {
    toast(`Not sent: ${error.message}`);
  }
}

async function sendFiles(files) {
  const asDocument = $("as-document").checked;
  const caption = $("text").value;
  try {
    if (asDocument) {
      for (const file of files) {
        const form = new FormData();
        form.append("file", file, file.name);
        Object.entries(profile()).forEach(([k, v]) => form.append(k, v));
        await call("POST", userPath("document"), form);
      }
    } else if (files.length === 1) {
      const form = new FormData();
      form.append("file", files[0], files[0].name);
      if (caption) form.append("caption", caption);
      Object.entries(profile()).forEach(([k, v]) => form.append(k, v));
      await call("POST", userPath("photo"), form);
    } else {
      const form = new FormData();
      for (const file of files.slice(0, 10)) form.append("files", file, file.name);
      if (caption) form.append("caption", caption);
      Object.entries(profile()).forEach(([k, v]) => form.append(k, v));
      await call("POST", userPath("album"), form);
      if (files.length > 10) toast("Only the first 10 photos were sent (Telegram's album limit).");
    }
    if (!asDocument && caption) $("text").value = "";
    await poll();
  } catch (error) {
    toast(`Not sent: ${error.message}`);
  }
}

async function press(button, messageId, data) {
  button.disabled = true;
  try {
    await call("POST", userPath("press"), { message_id: messageId, data });
  } catch (error) {
    toast(error.message);
  } finally {
    setTimeout(() => { button.disabled = false; }, 800);
  }
}

function showCommands(commands) {
  const box = $("commands");
  box.replaceChildren();
  for (const command of commands) {
    const button = document.createElement("button");
    button.type = "button";
    const name = document.createElement("span");
    name.className = "cmd";
    name.textContent = `/${command.command}`;
    const description = document.createElement("span");
    description.textContent = command.description;
    button.append(name, description);
    button.addEventListener("click", () => { box.hidden = true; sendText(`/${command.command}`); });
    box.append(button);
  }
  $("menu-button").hidden = commands.length === 0;
}

// --- polling -----------------------------------------------------------------------------------------
async function poll() {
  if (state.polling) return;
  state.polling = true;
  try {
    const response = await fetch(`${userPath("messages")}?include_user=1&after=${state.lastSeq}`);
    if (response.ok) {
      const views = await response.json();
      for (const view of views) {
        place(view);
        state.lastSeq = Math.max(state.lastSeq, view.seq);
      }
      quickReplies(views);
    }
    const info = await fetch(`${userPath("state")}?language_code=${encodeURIComponent($("language").value)}`);
    if (info.ok) {
      const data = await info.json();
      $("status").textContent = data.chat_action === "typing" ? "typing\u2026"
        : data.chat_action ? data.chat_action.replace(/_/g, " ") + "\u2026" : "sandbox";
      showCommands(data.commands || []);
      for (const [id, answer] of Object.entries(data.callback_answers || {})) {
        if (answer.answered && !state.answered.has(id)) {
          state.answered.add(id);
          if (answer.text && state.primed) toast(answer.text); // no replay of old answers after a reload
        }
      }
      state.primed = true;
    }
  } catch {
    $("status").textContent = "emulator unreachable";
  } finally {
    state.polling = false;
  }
}

function resetChat() {
  state.lastSeq = 0;
  state.answered.clear();
  state.primed = false;
  $("chat").replaceChildren();
  $("quick-replies").hidden = true;
  $("user-id").textContent = String(state.userId);
}

function init() {
  $("first-name").value = localStorage.getItem("sandbox.firstName") || "Patient";
  $("language").value = localStorage.getItem("sandbox.language")
    || ((navigator.language || "en").slice(0, 2) === "de" ? "de" : "en");
  $("first-name").addEventListener("change", () => localStorage.setItem("sandbox.firstName", $("first-name").value));
  $("language").addEventListener("change", () => localStorage.setItem("sandbox.language", $("language").value));
  $("new-user").addEventListener("click", () => {
    localStorage.removeItem("sandbox.userId");
    state.userId = loadUserId();
    resetChat();
  });
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("text").value;
    $("text").value = "";
    sendText(text);
  });
  $("files").addEventListener("change", () => {
    const files = [...$("files").files];
    $("files").value = "";
    if (files.length) sendFiles(files);
  });
  $("menu-button").addEventListener("click", () => { $("commands").hidden = !$("commands").hidden; });
  resetChat();
  poll();
  setInterval(poll, POLL_MS);
}

document.addEventListener("DOMContentLoaded", init);
