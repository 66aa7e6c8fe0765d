// The chat page: a sidebar of conversations, the open conversation (its address is /c/<id>) and a
// message box. It is a client like any other: REST for the conversations, the plain WebSocket at
// /ws for replies as they stream. Model text only ever reaches the page as text nodes (see
// markdown.js).
//
// Keeping a reply whole: a chunk's `content` is the reply so far, so a chunk replaces the text
// instead of adding to it, and a chunk whose `seq` is not newer than the last one applied is
// ignored. Opening a conversation joins it and then reads it; a reconnect joins again with the
// last `messageId` and `seq` seen, so the server sends only what was missed.
//
// Sign-in: the page asks `GET /api/me` first. A 401 means the server wants a token
// (AUTH_MODE=local): the page shows the sign-in form, keeps the token it gets in sessionStorage
// and sends it on every request (`credentials()`) and on /ws (`?token=`). A 401 later, or an
// `error` event UNAUTHORIZED, signs out: the token is forgotten and the form is back.

import { renderMarkdown } from "/markdown.js";

/** The contract's apology: a reply that ends with it is one the model failed to finish. */
const APOLOGY =
  "I apologize, but I encountered an error while processing your request. Please try again.";
/** The first pause before reconnecting the WebSocket; it doubles up to RETRY_MAX_MS. */
const RETRY_FIRST_MS = 500;
const RETRY_MAX_MS = 8000;
/** A reply silent for this long (the server sends heartbeats meanwhile) is read again. */
const STALL_MS = 30000;
/** Conversations listed in the sidebar. */
const LIST_LIMIT = 100;
/** Where the sign-in token is kept, for this tab's session. */
const TOKEN_KEY = "chat.token";
/** What a sign-out the user did not ask for says. */
const SESSION_ENDED = "Your session has ended. Sign in again.";

const ui = Object.fromEntries(
  [
    "sidebar",
    "new-chat",
    "open-sidebar",
    "close-sidebar",
    "conversation-list",
    "list-status",
    "title",
    "connection",
    "messages",
    "welcome",
    "missing",
    "message-list",
    "notice",
    "notice-text",
    "dismiss",
    "composer",
    "message",
    "send",
    "stop",
    "skip-link",
    "layout",
    "sign-in",
    "sign-in-form",
    "username",
    "password",
    "sign-in-error",
    "sign-in-button",
    "register",
    "account",
    "account-name",
    "sign-out",
  ].map((id) => [id.replace(/-(\w)/g, (_, c) => c.toUpperCase()), document.getElementById(id)]),
);

const state = {
  /** The sidebar: `{id, title, updatedAt}`, newest first. */
  conversations: [],
  /** The open conversation: `{id, title, messages, fresh, missing}`, or null on `/`. */
  current: null,
  /** The reply streaming in the open conversation: `{messageId, stopping}`. */
  reply: null,
  /** What this page asked for and has not seen start yet: "chat" or "regenerate". */
  asked: null,
  /** The conversation whose title is being edited in the sidebar. */
  renaming: null,
  /** When the open conversation last had news. */
  lastNews: 0,
};

// ---- REST ----------------------------------------------------------------------------------

/** A failed request, in the server's words (`{message, code}`). */
class RequestError extends Error {
  constructor(message, code, status) {
    super(message);
    this.code = code;
    this.status = status;
  }
}

/** Who is signed in: the token (null without sign-in) and the user `GET /api/me` named. */
const session = { token: sessionStorage.getItem(TOKEN_KEY), user: null };

/** Headers that say who is asking: the sign-in token, if there is one. */
function credentials() {
  return session.token ? { authorization: `Bearer ${session.token}` } : {};
}

/** A REST call; a 401 outside the sign-in routes ends the session it was made with. */
async function api(method, path, body) {
  const token = session.token;
  const init = { method, headers: credentials() };
  if (body !== undefined) {
    init.headers = { ...init.headers, "content-type": "application/json" };
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch {
    throw new RequestError("The server cannot be reached.", "NETWORK_ERROR", 0);
  }
  const data = await response.json().catch(() => null);
  if (response.status === 401 && !path.startsWith("/api/auth/") && session.token === token) {
    signOut(token ? SESSION_ENDED : "");
  }
  if (!response.ok) {
    const message = data?.message ?? `The server answered ${response.status}.`;
    throw new RequestError(message, data?.code ?? "HTTP_ERROR", response.status);
  }
  return data;
}

const conversationPath = (id) => `/api/conversations/${encodeURIComponent(id)}`;

// ---- The WebSocket -------------------------------------------------------------------------

/** The connection to /ws: reconnects by itself. */
class Live {
  constructor(onEvent, onOpen, onClose) {
    this.onEvent = onEvent;
    this.onOpen = onOpen;
    this.onClose = onClose;
    this.socket = null;
    this.retries = 0;
    this.timer = null;
    /** Whether the page wants a connection: from `connect` until `stop`. */
    this.wanted = false;
  }

  get isOpen() {
    return this.socket?.readyState === WebSocket.OPEN;
  }

  get isConnecting() {
    return this.socket?.readyState === WebSocket.CONNECTING;
  }

  connect() {
    clearTimeout(this.timer);
    this.wanted = true;
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const query = session.token ? `?token=${encodeURIComponent(session.token)}` : "";
    const socket = new WebSocket(`${scheme}//${location.host}/ws${query}`);
    this.socket = socket;
    socket.onopen = () => {
      this.retries = 0;
      this.onOpen();
    };
    socket.onmessage = (message) => {
      let frame;
      try {
        frame = JSON.parse(message.data);
      } catch {
        return;
      }
      if (typeof frame?.event === "string") {
        this.onEvent(frame.event, frame.data ?? {});
      }
    };
    socket.onclose = () => {
      if (this.socket !== socket) {
        return;
      }
      this.socket = null;
      this.onClose();
      const delay = Math.min(RETRY_MAX_MS, RETRY_FIRST_MS * 2 ** this.retries);
      this.retries += 1;
      this.timer = setTimeout(() => this.connect(), delay);
    };
  }

  /** Closes the connection for good, until `connect` is called again. */
  stop() {
    clearTimeout(this.timer);
    const socket = this.socket;
    this.socket = null;
    this.retries = 0;
    this.wanted = false;
    socket?.close();
  }

  /** Reconnects at once if the connection is down (the network is back). */
  wake() {
    if (this.wanted && !this.socket) {
      this.connect();
    }
  }

  /** Sends an event if connected; false when it could not be sent. */
  send(event, data) {
    if (!this.isOpen) {
      return false;
    }
    this.socket.send(JSON.stringify({ event, data }));
    return true;
  }
}

const live = new Live(onEvent, onConnected, onDisconnected);
let connectedBefore = false;

function onConnected() {
  ui.connection.textContent = "";
  const current = state.current;
  if (current && !current.fresh && !current.missing) {
    join(current.id, true);
    sync();
  }
  if (connectedBefore) {
    loadConversations(); // Conversations may have changed while the connection was down.
  }
  connectedBefore = true;
}

function onDisconnected() {
  if (session.token) {
    // A refused upgrade looks like any lost connection: asking who the token is for tells a
    // token the server no longer takes (the 401 signs out) from a network that is down.
    api("GET", "/api/me").catch(() => {});
  }
  ui.connection.textContent = navigator.onLine ? "Reconnecting…" : "Offline: waiting for the network…";
  if (state.asked) {
    // Whether the server got the request is unknown: the read after reconnecting shows it.
    withdrawPending();
    state.asked = null;
  }
  const current = state.current;
  if (current && !current.read && !current.fresh && !current.missing) {
    sync(); // Without a connection, the history still shows.
  }
  render();
}

/** Takes back the message that was sent but not answered, into the message box if it is empty. */
function withdrawPending() {
  const current = state.current;
  const unsent = current?.messages.findLast((m) => m.pending);
  if (unsent) {
    current.messages.splice(current.messages.indexOf(unsent), 1);
    if (!ui.message.value.trim()) {
      ui.message.value = unsent.content;
      fitMessageBox();
    }
  }
}

/** Joins a conversation; on a reconnect, with the last chunk seen of the reply in progress. */
function join(id, resume) {
  const data = { conversationId: id };
  const message = state.reply && findMessage(state.reply.messageId);
  if (resume && message && message.seq > 0 && Number.isFinite(message.seq)) {
    data.messageId = message.id;
    data.seq = message.seq;
  }
  live.send("join_conversation", data);
}

// ---- Server events -------------------------------------------------------------------------

function onEvent(name, data) {
  switch (name) {
    case "conversation_updated":
      renamed(data.conversationId, data.title);
      return;
    case "conversation_deleted":
      deleted(data.conversationId);
      return;
    case "error":
      if (data.code === "UNAUTHORIZED") {
        signOut(SESSION_ENDED);
      } else {
        failed(data);
      }
      return;
    default:
  }
  const current = state.current;
  if (!current || data.conversationId !== current.id) {
    return;
  }
  state.lastNews = Date.now();
  // News clears a connection notice, but not "Offline" while the browser says it is: events
  // already on their way still arrive after the network went.
  if (name !== "stream_heartbeat" && live.isOpen && navigator.onLine) {
    ui.connection.textContent = "";
  }
  switch (name) {
    case "stream_start":
      replyStarted(data.messageId);
      break;
    case "stream_chunk":
      replyGrew(data);
      break;
    case "stream_complete":
      replyEnded(data.messageId);
      break;
    case "stream_heartbeat":
      ui.connection.textContent = "The model is thinking…";
      break;
    default:
  }
}

function findMessage(id) {
  return state.current?.messages.find((message) => message.id === id);
}

function replyStarted(messageId) {
  const current = state.current;
  if (findMessage(messageId)) {
    return;
  }
  const asked = state.asked;
  state.asked = null;
  if (asked === "regenerate") {
    // The new reply replaces whatever followed the last user message.
    current.messages.splice(current.messages.findLastIndex((m) => m.role === "user") + 1);
  }
  for (const message of current.messages) {
    message.pending = false;
  }
  current.messages.push({ id: messageId, role: "assistant", content: "", status: "streaming", seq: 0 });
  state.reply = { messageId, stopping: false };
  if (current.fresh) {
    current.fresh = false;
    current.read = true; // Everything in it started on this page.
    loadConversations();
  } else if (!asked) {
    // Another tab asked: read the conversation for its message (or the reply it replaces).
    sync();
  }
  touch(current.id);
  render();
}

function replyGrew({ messageId, content, seq, isComplete }) {
  if (!findMessage(messageId)) {
    replyStarted(messageId);
  }
  const message = findMessage(messageId);
  if (typeof content !== "string" || !(seq > message.seq)) {
    return;
  }
  message.content = content;
  message.seq = seq;
  if (isComplete) {
    finish(message);
  }
  render();
}

function replyEnded(messageId) {
  const message = findMessage(messageId);
  if (message && message.status === "streaming") {
    finish(message);
  }
  if (state.reply?.messageId === messageId) {
    state.reply = null;
  }
  touch(state.current.id);
  render();
}

/** Marks a reply as over: stopped, failed or complete. */
function finish(message) {
  const stopped = state.reply?.messageId === message.id && state.reply.stopping;
  message.seq = Infinity;
  if (message.content.endsWith(APOLOGY)) {
    message.status = "error";
  } else {
    message.status = stopped ? "cancelled" : "complete";
  }
}

/** An `error` event: it answers the last thing this page asked for. */
function failed({ message, code }) {
  if (code === "CONVERSATION_NOT_FOUND" && !state.asked) {
    return; // A join of a conversation that is gone: reading it says so.
  }
  withdrawPending();
  state.asked = null;
  const current = state.current;
  if (current?.fresh && current.messages.length === 0) {
    // The conversation was never made: the address goes back to a new chat.
    state.current = null;
    history.replaceState(null, "", "/");
  }
  if (state.reply) {
    state.reply.stopping = false;
  }
  showNotice(describeError(code, message));
  render();
}

function describeError(code, message) {
  switch (code) {
    case "RATE_LIMIT_EXCEEDED":
      return "You are sending messages too fast. Wait a moment, then try again.";
    case "CONFLICT":
      return "A reply is already being written in this conversation.";
    case "UPSTREAM_ERROR":
      return "The model failed to answer. Try again.";
    case "NETWORK_ERROR":
      return "The server cannot be reached. Check the connection, then try again.";
    default:
      return message || "Something went wrong.";
  }
}

function showNotice(text) {
  ui.noticeText.textContent = text;
  ui.notice.hidden = false;
}

function hideNotice() {
  ui.notice.hidden = true;
  ui.noticeText.textContent = "";
}

// ---- Reading a conversation ----------------------------------------------------------------

let syncing = null;
let syncAgain = false;

/** Reads the open conversation and merges it with what arrived live; one read at a time. */
function sync() {
  if (syncing) {
    syncAgain = true;
    return;
  }
  syncing = readCurrent().finally(() => {
    syncing = null;
    if (syncAgain) {
      syncAgain = false;
      sync();
    }
  });
}

async function readCurrent() {
  const current = state.current;
  if (!current || current.fresh) {
    return;
  }
  let conversation;
  try {
    conversation = await api("GET", conversationPath(current.id));
  } catch (error) {
    if (state.current !== current) {
      return;
    }
    if (error.status === 404 || error.status === 400) {
      current.missing = true;
      render();
    } else {
      showNotice(describeError(error.code, error.message));
    }
    return;
  }
  if (state.current !== current) {
    return;
  }
  state.lastNews = Date.now();
  current.read = true;
  current.missing = false;
  current.title = conversation.title;
  merge(current, conversation.messages);
  render();
}

/** The stored messages, with what arrived live where it is newer. */
function merge(current, stored) {
  const known = new Map(current.messages.map((message) => [message.id, message]));
  const messages = stored.map((message) => {
    const mine = known.get(message.id);
    const status = message.status ?? "complete";
    if (status !== "streaming") {
      return { ...message, status, seq: Infinity };
    }
    // A reply in progress only grows: the longer text is the newer one.
    const content =
      mine && mine.content.length > message.content.length ? mine.content : message.content;
    return { ...message, status, content, seq: mine?.seq ?? 0 };
  });
  for (const message of current.messages) {
    if (message.pending && !messages.some((m) => m.id === message.id)) {
      messages.push(message);
    }
  }
  current.messages = messages;
  const streaming = messages.find((message) => message.status === "streaming");
  const stopping = Boolean(streaming && state.reply?.messageId === streaming.id && state.reply.stopping);
  state.reply = streaming ? { messageId: streaming.id, stopping } : null;
}

// A reply that has gone quiet for long (its end may have been missed while reconnecting) is
// read again from the server.
setInterval(() => {
  if (state.reply && live.isOpen && Date.now() - state.lastNews > STALL_MS) {
    state.lastNews = Date.now();
    sync();
  }
}, STALL_MS / 6);

// ---- The sidebar ---------------------------------------------------------------------------

async function loadConversations() {
  try {
    const list = await api("GET", `/api/conversations?limit=${LIST_LIMIT}`);
    state.conversations = list.map(({ id, title, updatedAt }) => ({ id, title, updatedAt }));
    ui.listStatus.textContent = state.conversations.length ? "" : "No conversations yet.";
    const listed = state.conversations.find((c) => c.id === state.current?.id);
    if (listed) {
      state.current.title = listed.title;
      renderTitle();
    }
  } catch (error) {
    ui.listStatus.textContent = describeError(error.code, error.message);
  }
  renderSidebar();
}

/** Moves a conversation to the top of the sidebar: it just changed. */
function touch(id) {
  const index = state.conversations.findIndex((c) => c.id === id);
  if (index > 0) {
    state.conversations.unshift(...state.conversations.splice(index, 1));
    renderSidebar();
  }
}

function renamed(id, title) {
  const listed = state.conversations.find((c) => c.id === id);
  if (listed) {
    listed.title = title;
  }
  if (state.current?.id === id) {
    state.current.title = title;
  }
  renderSidebar();
  renderTitle();
}

/** A conversation is gone: deleted here (`here`), or elsewhere. */
function deleted(id, here = false) {
  state.conversations = state.conversations.filter((c) => c.id !== id);
  renderSidebar();
  if (state.current?.id === id) {
    navigate("/", true);
    if (!here) {
      showNotice("This conversation was deleted.");
    }
  }
}

function icon(paths) {
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", "0 0 24 24");
  svg.setAttribute("aria-hidden", "true");
  for (const d of paths) {
    const path = document.createElementNS("http://www.w3.org/2000/svg", "path");
    path.setAttribute("d", d);
    svg.append(path);
  }
  return svg;
}

const PENCIL = ["M4 20h4L19 9l-4-4L4 16z", "M14 6l4 4"];
const TRASH = ["M4 7h16", "M9 7V4h6v3", "M6 7l1 13h10l1-13", "M10 11v6", "M14 11v6"];

function iconButton(label, paths, onClick) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "icon-button";
  button.setAttribute("aria-label", label);
  button.title = label;
  button.append(icon(paths));
  button.addEventListener("click", onClick);
  return button;
}

function renderSidebar() {
  if (state.renaming) {
    return; // The title being edited stays as it is until it is saved or given up.
  }
  // Focus inside the list stays on the same control of the same conversation.
  const focused = document.activeElement;
  const focusedItem = ui.conversationList.contains(focused) ? focused.closest("li") : null;
  const focusedPart = focusedItem ? [...focusedItem.children].indexOf(focused) : -1;
  const items = state.conversations.map((conversation) => {
    const item = document.createElement("li");
    item.className = "conversation";
    item.dataset.id = conversation.id;
    const link = document.createElement("a");
    link.href = `/c/${encodeURIComponent(conversation.id)}`;
    link.textContent = conversation.title;
    if (state.current?.id === conversation.id) {
      item.classList.add("current");
      link.setAttribute("aria-current", "page");
    }
    item.append(
      link,
      iconButton(`Rename “${conversation.title}”`, PENCIL, () => startRename(item, conversation)),
      iconButton(`Delete “${conversation.title}”`, TRASH, () => remove(conversation)),
    );
    return item;
  });
  ui.conversationList.replaceChildren(...items);
  if (focusedItem) {
    const item = ui.conversationList.querySelector(`li[data-id="${CSS.escape(focusedItem.dataset.id)}"]`);
    item?.children[focusedPart]?.focus();
  }
}

function startRename(item, conversation) {
  state.renaming = conversation.id;
  const input = document.createElement("input");
  input.value = conversation.title;
  input.setAttribute("aria-label", "Title");
  input.maxLength = 200;
  let done = false;
  const end = async (save) => {
    if (done) {
      return;
    }
    done = true;
    const title = input.value.trim();
    if (save && title && title !== conversation.title) {
      try {
        await api("PATCH", conversationPath(conversation.id), { title });
        state.renaming = null;
        renamed(conversation.id, title);
      } catch (error) {
        showNotice(describeError(error.code, error.message));
      }
    }
    state.renaming = null;
    renderSidebar(); // Focus goes from the title being edited to the conversation's link.
  };
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter") {
      event.preventDefault();
      end(true);
    } else if (event.key === "Escape") {
      event.preventDefault();
      end(false);
    }
  });
  input.addEventListener("blur", () => end(true));
  item.replaceChildren(input);
  input.focus();
  input.select();
}

async function remove(conversation) {
  if (!window.confirm(`Delete “${conversation.title}”? This cannot be undone.`)) {
    return;
  }
  try {
    await api("DELETE", conversationPath(conversation.id));
  } catch (error) {
    if (error.status !== 404) {
      showNotice(describeError(error.code, error.message));
      return;
    }
  }
  deleted(conversation.id, true);
  ui.message.focus();
}

// ---- Navigation ----------------------------------------------------------------------------

/** The conversation id in the address, or null on `/`. */
function routeId() {
  return /^\/c\/([^/]+)$/.exec(location.pathname)?.[1] ?? null;
}

/** Whether `id` can name a conversation at all (the API's rule for ids). */
const possibleId = (id) => /^[A-Za-z0-9_-]{1,128}$/.test(id);

function navigate(path, replace = false) {
  if (replace) {
    history.replaceState(null, "", path);
  } else {
    history.pushState(null, "", path);
  }
  openRoute();
}

/** Opens what the address names: joins the conversation, then reads it. */
function openRoute() {
  const id = routeId();
  const previous = state.current;
  if (previous?.id === id && id !== null) {
    return;
  }
  if (previous && !previous.fresh) {
    live.send("leave_conversation", { conversationId: previous.id });
  }
  state.reply = null;
  state.asked = null;
  hideNotice();
  closeSidebar();
  if (id === null) {
    state.current = null;
  } else {
    const listed = state.conversations.find((c) => c.id === id);
    const missing = !possibleId(id);
    state.current = { id, title: listed?.title ?? "", messages: [], fresh: false, missing };
    state.lastNews = Date.now();
    // Joined first, then read: nothing that happens in between is missed. While connecting,
    // the connection does both once open; while it is down, the history is read meanwhile.
    if (live.isOpen && !missing) {
      join(id, false);
      sync();
    } else if (!live.isConnecting && !missing) {
      sync();
    }
  }
  renderSidebar();
  render();
}

/** A new conversation's id, made here so the address can name it before it exists. */
function newConversationId() {
  if (crypto.randomUUID) {
    return crypto.randomUUID();
  }
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  bytes[6] = (bytes[6] & 0x0f) | 0x40;
  bytes[8] = (bytes[8] & 0x3f) | 0x80;
  const hex = [...bytes].map((b) => b.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

// ---- Asking --------------------------------------------------------------------------------

function sendMessage() {
  const text = ui.message.value;
  if (!text.trim() || state.reply || state.asked || state.current?.missing) {
    return;
  }
  if (!live.isOpen) {
    showNotice("Not connected to the server yet. Try again in a moment.");
    return;
  }
  hideNotice();
  if (!state.current) {
    const id = newConversationId();
    state.current = { id, title: "New chat", messages: [], fresh: true, missing: false };
    history.pushState(null, "", `/c/${id}`);
  }
  const current = state.current;
  current.messages.push({ id: `local-${Date.now()}`, role: "user", content: text, pending: true });
  state.asked = "chat";
  state.lastNews = Date.now();
  live.send("stream_chat", { conversationId: current.id, message: text });
  ui.message.value = "";
  fitMessageBox();
  touch(current.id);
  render();
}

function stopReply() {
  if (!state.reply || !state.current) {
    return;
  }
  state.reply.stopping = live.send("stop_generation", { conversationId: state.current.id });
  render();
}

function regenerate() {
  if (state.reply || state.asked || !state.current) {
    return;
  }
  hideNotice();
  if (live.send("regenerate", { conversationId: state.current.id })) {
    state.asked = "regenerate";
  } else {
    showNotice("Not connected to the server yet. Try again in a moment.");
  }
  render();
}

// ---- Rendering -----------------------------------------------------------------------------

/** Each message's list item and what it was last drawn with. */
const drawn = new Map();
let frame = null;

/** Draws the conversation at the next frame; many chunks in one frame draw once. */
function render() {
  if (frame === null) {
    frame = document.hidden ? setTimeout(draw, 50) : requestAnimationFrame(draw);
  }
}

function renderTitle() {
  const current = state.current;
  const title = current ? current.title || "Conversation" : "New chat";
  ui.title.textContent = title;
  document.title = current ? `${title} · Chat` : "Chat";
}

function draw() {
  frame = null;
  const current = state.current;
  const messages = current?.messages ?? [];
  const view = ui.messages;
  const atBottom = view.scrollHeight - view.scrollTop - view.clientHeight < 40;
  renderTitle();
  ui.welcome.hidden = Boolean(current);
  ui.missing.hidden = !current?.missing;
  ui.composer.hidden = Boolean(current?.missing);
  const replying = Boolean(state.reply || state.asked);
  ui.send.disabled = replying;
  ui.stop.hidden = !state.reply;
  ui.stop.disabled = Boolean(state.reply?.stopping);
  const last = messages[messages.length - 1];
  const items = messages.map((message) => {
    const regenerable = !replying && message === last && message.role === "assistant";
    const key = `${message.status}|${regenerable}|${message.content}`;
    let entry = drawn.get(message.id);
    if (!entry || entry.key !== key) {
      const item = entry?.item ?? document.createElement("li");
      drawMessage(item, message, regenerable);
      entry = { item, key };
      drawn.set(message.id, entry);
    }
    return entry.item;
  });
  const shown = new Set(messages.map((message) => message.id));
  for (const id of drawn.keys()) {
    if (!shown.has(id)) {
      drawn.delete(id);
    }
  }
  const list = ui.messageList;
  if (items.length !== list.children.length || items.some((item, i) => list.children[i] !== item)) {
    list.replaceChildren(...items);
  }
  if (atBottom) {
    view.scrollTop = view.scrollHeight;
  }
}

const STATUS_NOTES = {
  cancelled: "Stopped.",
  error: "The model could not finish this reply.",
};

function drawMessage(item, message, regenerable) {
  const assistant = message.role === "assistant";
  item.className = `message ${assistant ? "assistant" : "user"} ${message.status ?? ""}`.trim();
  item.dataset.id = message.id;
  item.setAttribute("aria-busy", String(message.status === "streaming"));
  const who = document.createElement("span");
  who.className = "visually-hidden";
  who.textContent = assistant ? "Assistant:" : "You:";
  const body = document.createElement("div");
  body.className = "body";
  if (assistant) {
    body.append(renderMarkdown(message.content));
  } else {
    body.textContent = message.content;
  }
  const parts = [who, body];
  const note = STATUS_NOTES[message.status];
  if (note) {
    const p = document.createElement("p");
    p.className = "status-note";
    p.textContent = note;
    parts.push(p);
  }
  if (regenerable) {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = "Regenerate";
    button.addEventListener("click", regenerate);
    const actions = document.createElement("div");
    actions.className = "message-actions";
    actions.append(button);
    parts.push(actions);
  }
  item.replaceChildren(...parts);
}

// ---- Copying code --------------------------------------------------------------------------

async function copyCode(button) {
  const code = button.closest(".code-block")?.querySelector("code")?.textContent ?? "";
  let copied = false;
  try {
    await navigator.clipboard.writeText(code);
    copied = true;
  } catch {
    // Without the clipboard API (a page served over plain http to another machine), select
    // the code and copy the selection.
    const range = document.createRange();
    range.selectNodeContents(button.closest(".code-block").querySelector("code"));
    const selection = getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    copied = document.execCommand("copy");
    selection.removeAllRanges();
  }
  button.textContent = copied ? "Copied" : "Copy failed";
  setTimeout(() => {
    button.textContent = "Copy";
  }, 1500);
}

// ---- The message box and the rest of the page ----------------------------------------------

function fitMessageBox() {
  ui.message.style.height = "auto";
  ui.message.style.height = `${ui.message.scrollHeight}px`;
}

function closeSidebar() {
  ui.sidebar.classList.remove("open");
  ui.openSidebar.setAttribute("aria-expanded", "false");
}

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  sendMessage();
});
ui.message.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    sendMessage();
  }
});
ui.message.addEventListener("input", fitMessageBox);
ui.stop.addEventListener("click", stopReply);
ui.dismiss.addEventListener("click", hideNotice);
ui.messageList.addEventListener("click", (event) => {
  const button = event.target.closest(".copy-code");
  if (button) {
    copyCode(button);
  }
});
ui.newChat.addEventListener("click", () => {
  if (state.current) {
    navigate("/");
  }
  closeSidebar();
  ui.message.focus();
});
ui.conversationList.addEventListener("click", (event) => {
  const link = event.target.closest("a");
  if (!link || event.ctrlKey || event.metaKey || event.shiftKey || event.altKey || event.button) {
    return;
  }
  event.preventDefault();
  if (link.pathname !== location.pathname) {
    navigate(link.pathname);
  }
  closeSidebar();
});
ui.openSidebar.addEventListener("click", () => {
  ui.sidebar.classList.add("open");
  ui.openSidebar.setAttribute("aria-expanded", "true");
  ui.newChat.focus();
});
ui.closeSidebar.addEventListener("click", () => {
  closeSidebar();
  ui.openSidebar.focus();
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && ui.sidebar.classList.contains("open")) {
    closeSidebar();
    ui.openSidebar.focus();
  }
});
window.addEventListener("popstate", () => {
  if (session.user) {
    openRoute();
  }
});
window.addEventListener("online", () => live.wake());
window.addEventListener("offline", () => {
  if (session.user) {
    onDisconnected();
  }
});

// ---- Signing in and out --------------------------------------------------------------------

/** Shows the chat as `user` (`GET /api/me`'s or the sign-in's answer), named if signed in. */
function enter(user) {
  session.user = user;
  ui.signIn.hidden = true;
  ui.layout.hidden = false;
  ui.skipLink.hidden = false;
  ui.account.hidden = !session.token;
  ui.accountName.textContent = user.username ?? "";
  live.connect();
  openRoute();
  loadConversations();
  ui.message.focus();
}

/** Forgets the token and everything it showed, and shows the sign-in form saying `message`. */
function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  session.token = null;
  session.user = null;
  live.stop();
  connectedBefore = false;
  Object.assign(state, { conversations: [], current: null, reply: null, asked: null, renaming: null });
  hideNotice();
  ui.listStatus.textContent = "";
  ui.connection.textContent = "";
  renderSidebar();
  draw(); // At once: nothing of the session is left in the page.
  ui.layout.hidden = true;
  ui.skipLink.hidden = true;
  ui.account.hidden = true;
  ui.signIn.hidden = false;
  showSignInError(message);
  ui.password.value = "";
  ui.username.focus();
}

function showSignInError(text) {
  ui.signInError.textContent = text;
  ui.signInError.hidden = !text;
}

/** Signs in or registers, as the button pressed says; a refusal shows in the form. */
async function signIn(event) {
  event.preventDefault();
  const path = event.submitter === ui.register ? "/api/auth/register" : "/api/auth/login";
  const account = { username: ui.username.value, password: ui.password.value };
  ui.signInButton.disabled = true;
  ui.register.disabled = true;
  try {
    const { token, user } = await api("POST", path, account);
    session.token = token;
    sessionStorage.setItem(TOKEN_KEY, token);
    ui.password.value = "";
    showSignInError("");
    enter(user);
  } catch (error) {
    showSignInError(error.status === 0 ? describeError(error.code, error.message) : error.message);
  } finally {
    ui.signInButton.disabled = false;
    ui.register.disabled = false;
  }
}

ui.signInForm.addEventListener("submit", signIn);
ui.signOut.addEventListener("click", () => {
  history.replaceState(null, "", "/");
  signOut("");
});

// The server says whether a token is needed: a 401 here has shown the sign-in form.
try {
  enter(await api("GET", "/api/me"));
} catch (error) {
  if (error.status !== 401) {
    enter({}); // The server is out of reach: the page shows that as it connects.
  }
}
