// The chat page: sidebar, history, composer, live answers over the page's WebSocket.
(function () {
  "use strict";

  const main = document.getElementById("conversation");
  const list = document.getElementById("messages");
  const input = document.getElementById("message-input");
  const composer = document.getElementById("composer");
  const composerError = document.getElementById("composer-error");
  const sendButton = document.getElementById("send-button");
  const stopButton = document.getElementById("stop-button");
  const banner = document.getElementById("model-banner");
  const modelName = document.getElementById("model-name");
  const sidebar = document.getElementById("conversation-list");
  let conversationId = main.dataset.conversationId ? Number(main.dataset.conversationId) : null;
  let socket = null;
  const messages = new Map(); // id -> message object as the server sent it

  // Markdown, safely: everything is escaped first, so model output never becomes HTML or script.
  function escapeHtml(text) {
    return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
  }
  function inline(text) {
    return text
      .replace(/`([^`]+)`/g, "<code>$1</code>")
      .replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>")
      .replace(/(^|[^*])\*([^*\s][^*]*)\*/g, "$1<em>$2</em>")
      .replace(/\[([^\]]+)\]\((https?:\/\/[^\s)]+)\)/g, '<a href="$2" rel="noopener noreferrer nofollow" target="_blank">$1</a>');
  }
  function renderMarkdown(source) {
    const parts = escapeHtml(source).split(/```[^\n]*\n?/);
    return parts.map((part, i) => {
      if (i % 2 === 1) return "<pre><code>" + part.replace(/\n$/, "") + "</code></pre>";
      // Trimmed: the text around a fence keeps a newline that would otherwise become a leading <br>.
      return part.split(/\n{2,}/).map((p) => p.replace(/^\n+|\n+$/g, "")).filter((p) => p.trim()).map((block) => {
        const lines = block.split("\n");
        if (lines.every((l) => /^\s*[-*] /.test(l))) {
          return "<ul>" + lines.map((l) => "<li>" + inline(l.replace(/^\s*[-*] /, "")) + "</li>").join("") + "</ul>";
        }
        if (lines.every((l) => /^\s*\d+\. /.test(l))) {
          return "<ol>" + lines.map((l) => "<li>" + inline(l.replace(/^\s*\d+\. /, "")) + "</li>").join("") + "</ol>";
        }
        const heading = /^(#{1,4}) (.*)$/.exec(block);
        if (heading && lines.length === 1) return "<h4>" + inline(heading[2]) + "</h4>";
        return "<p>" + inline(block).replace(/\n/g, "<br>") + "</p>";
      }).join("");
    }).join("");
  }

  const api = window.gantry.api; // from base.js

  function statusLine(message) {
    if (message.role === "user") {
      if (message.status === "queued") {
        const mark = message.position ? "Queued (#" + message.position + ")" : "Queued";
        return message.error ? mark + " · " + message.error : mark;
      }
      if (message.status === "cancelled") return "Stopped";
      return "";
    }
    if (message.status === "cancelled") return "Stopped";
    return "";
  }

  function messageElement(message) {
    let el = document.getElementById("message-" + message.id);
    if (!el) {
      el = document.createElement("article");
      el.id = "message-" + message.id;
      el.innerHTML = '<div class="body"></div><div class="status"></div><div class="error" hidden></div><div class="actions"></div>';
      // An answer goes right under its question, even when later questions were sent meanwhile.
      const question = message.reply_to ? document.getElementById("message-" + message.reply_to) : null;
      if (question) question.after(el);
      else list.appendChild(el);
    }
    return el;
  }

  function draw(message) {
    const previous = messages.get(message.id) || {};
    message = Object.assign({}, previous, message);
    messages.set(message.id, message);
    const el = messageElement(message);
    el.className = "message " + message.role + " " + message.status;
    el.dataset.status = message.status;
    const body = el.querySelector(".body");
    if (message.role === "user") body.textContent = message.content;
    else body.innerHTML = renderMarkdown(message.content || "");
    el.querySelector(".status").textContent = statusLine(message);
    const error = el.querySelector(".error");
    error.hidden = !(message.role === "user" && message.status === "failed");
    error.textContent = message.error || "";
    const actions = el.querySelector(".actions");
    actions.textContent = "";
    if (message.role === "user" && (message.status === "failed" || message.status === "cancelled")) {
      const retry = document.createElement("button");
      retry.type = "button";
      retry.textContent = "Retry";
      retry.className = "retry";
      retry.addEventListener("click", () => act("retry", message.id));
      actions.appendChild(retry);
    }
    if (message.role === "user" && message.status === "queued") {
      const cancel = document.createElement("button");
      cancel.type = "button";
      cancel.textContent = "Cancel";
      cancel.className = "cancel";
      cancel.addEventListener("click", () => act("stop", message.id));
      actions.appendChild(cancel);
    }
    updateStop();
    return el;
  }

  function runningQuestion() {
    for (const message of messages.values()) {
      if (message.role === "user" && message.status === "generating") return message;
    }
    return null;
  }
  function updateStop() { stopButton.hidden = runningQuestion() === null; }

  async function act(action, messageId) {
    try {
      draw(await api("POST", "/api/messages/" + messageId + "/" + action + "/"));
    } catch (error) { showComposerError(error.message); }
  }

  function scrollDown() { list.scrollTop = list.scrollHeight; }
  function showComposerError(text) { composerError.textContent = text; composerError.hidden = !text; }

  function onEvent(event) {
    switch (event.type) {
      case "chat.message":
        if (event.message.conversation_id === conversationId) { draw(event.message); scrollDown(); }
        break;
      case "chat.token": {
        const message = messages.get(event.message_id);
        if (message) { message.content = (message.content || "") + event.text; draw(message); scrollDown(); }
        break;
      }
      case "chat.queued": {
        const message = messages.get(event.message_id);
        if (message) { message.position = event.position; draw(message); }
        break;
      }
      case "chat.done":
      case "chat.error":
        break; // the chat.message that follows carries the final state
      case "chat.sent": settle(event.ref, event.message, null); break;
      case "chat.refused": settle(event.ref, null, event.detail); break;
      case "chat.conversation": drawConversation(event.conversation, event.deleted); break;
      case "model.state": drawModel(event); break;
      case "chat.models": drawFleet(event); break;
      case "model.progress": drawProgress(event); break;
    }
  }

  let modelState = JSON.parse(document.getElementById("model-state").textContent);
  // The model picker: the models served now, the default first ("" follows the default, whichever it
  // is). A conversation that picked another model is answered by a backend holding it; while none
  // does, its messages are held and the banner says whether that model is being loaded.
  const picker = document.getElementById("model-picker");
  let picked = picker.dataset.picked || "";
  let fleet = JSON.parse(document.getElementById("served-models").textContent);
  // Sent with the page and the socket's greeting (they depend on the user); broadcasts leave them out.
  let loadableModels = fleet.loadable || [];
  let pickedPercent = null; // the progress of a load of the conversation's picked model
  function drawPicker() {
    picker.textContent = "";
    const add = (value, label) => {
      const option = document.createElement("option");
      option.value = value;
      option.textContent = label;
      picker.appendChild(option);
    };
    add("", fleet.default ? fleet.default + " (default)" : "Default model");
    const others = fleet.served.filter((name) => name !== fleet.default);
    others.forEach((name) => add(name, name));
    // Then the models this user may have loaded by asking for them: picking one and sending loads it.
    const loadable = loadableModels.filter((name) => !fleet.served.includes(name) && name !== fleet.default);
    loadable.forEach((name) => add(name, name + (fleet.loading.includes(name) ? " (loading)" : " (loads when asked)")));
    if (picked && !others.includes(picked) && !loadable.includes(picked)) {
      const served = fleet.served.includes(picked);
      add(picked, picked + (served ? "" : fleet.loading.includes(picked) ? " (loading)" : " (not available)"));
    }
    picker.value = picked;
  }
  function drawPicked() {
    modelName.textContent = picked;
    if (fleet.served.includes(picked)) {
      banner.hidden = true;
      return;
    }
    const loading = fleet.loading.includes(picked);
    const percent = loading && pickedPercent !== null ? ", " + pickedPercent + "%" : "";
    if (!loading) pickedPercent = null;
    banner.textContent = loading ? "Model loading... (Loading " + picked + percent + ")"
      : loadableModels.includes(picked) ? "Model not loaded yet: sending a message loads it" : "Model not available";
    banner.className = loading ? "banner loading" : "banner unavailable";
    banner.hidden = false;
  }
  function drawFleet(models) {
    fleet = models;
    if (models.loadable) loadableModels = models.loadable;
    drawPicker();
    drawModel(modelState);
  }
  function drawPick(model) {
    picked = model || "";
    drawFleet(fleet);
  }
  picker.addEventListener("change", async () => {
    const value = picker.value;
    if (!conversationId) { drawPick(value); return; } // the conversation is created with it
    try {
      drawPick((await api("PATCH", "/api/conversations/" + conversationId + "/", { model: value || null })).model);
    } catch (error) {
      showComposerError(error.message);
      drawPicker();
    }
  });
  // The banner: "Model loading... (Loading X, 63%)" during a switch, "Model server unreachable" when
  // TabbyAPI does not answer, "Model not available" when nothing is loaded; messages sent meanwhile are
  // held and answered when the model is ready.
  let loadingPercent = null;
  function drawModel(state) {
    if (state.state !== "switching") loadingPercent = null;
    modelState = state;
    if (picked) { drawPicked(); return; }
    modelName.textContent = state.active_model || "No model loaded";
    if (state.state === "switching") {
      const detail = state.target_model
        ? " (Loading " + state.target_model + (loadingPercent === null ? "" : ", " + loadingPercent + "%") + ")" : "";
      banner.textContent = "Model loading..." + detail;
      banner.className = "banner loading";
      banner.hidden = false;
    } else if (state.state === "unreachable") {
      banner.textContent = "Model server unreachable";
      banner.className = "banner unavailable";
      banner.hidden = false;
    } else if (state.abandoned_load && state.state !== "ready") {
      // A switch stopped waiting, but the model server goes on loading: held messages wait for that load.
      banner.textContent = "Model loading... (Loading " + state.abandoned_load + ")";
      banner.className = "banner loading";
      banner.hidden = false;
    } else if (state.state !== "ready" || !state.active_model) {
      banner.textContent = "Model not available";
      banner.className = "banner unavailable";
      banner.hidden = false;
    } else {
      banner.hidden = true;
    }
  }
  function drawProgress(progress) {
    if (picked && progress.model === picked && !fleet.served.includes(picked)) {
      // A load of the picked model (on any backend: one asked for by this conversation's messages).
      pickedPercent = progress.step === "failed" ? null : Math.round(progress.percent);
      drawPicked();
    } else if (modelState.state === "switching" && progress.step !== "failed"
               && (!modelState.target_model || progress.model === modelState.target_model)) {
      loadingPercent = Math.round(progress.percent);
      drawModel(modelState);
    }
  }

  function drawConversation(conversation, deleted) {
    if (!deleted && conversation.id === conversationId && "model" in conversation) drawPick(conversation.model);
    let item = sidebar.querySelector('[data-id="' + conversation.id + '"]');
    if (deleted) {
      if (item) item.remove();
      if (conversation.id === conversationId) window.location.href = "/";
      return;
    }
    if (!item) {
      item = document.createElement("li");
      item.className = "conversation-item";
      item.dataset.id = conversation.id;
      item.innerHTML = '<a class="conversation-link"></a><span class="conversation-actions">' +
        '<button type="button" class="icon rename" title="Rename" aria-label="Rename">✎</button>' +
        '<button type="button" class="icon delete" title="Delete" aria-label="Delete">✕</button></span>';
      item.querySelector("a").href = "/c/" + conversation.id + "/";
      sidebar.prepend(item);
    }
    item.querySelector("a").textContent = conversation.title;
    item.classList.toggle("active", conversation.id === conversationId);
  }

  sidebar.addEventListener("click", async (event) => {
    const item = event.target.closest(".conversation-item");
    if (!item) return;
    const id = Number(item.dataset.id);
    try {
      if (event.target.classList.contains("rename")) {
        const title = window.prompt("Rename conversation", item.querySelector("a").textContent);
        if (title) drawConversation(await api("PATCH", "/api/conversations/" + id + "/", { title }), false);
      } else if (event.target.classList.contains("delete")) {
        if (window.confirm("Delete this conversation and all its messages?")) {
          await api("DELETE", "/api/conversations/" + id + "/");
          drawConversation({ id }, true);
        }
      }
    } catch (error) { window.alert(error.message); }
  });

  document.getElementById("new-conversation").addEventListener("click", () => { window.location.href = "/"; });

  // Resolves once the socket is open (the server joins its groups before accepting) or has failed.
  function connect() {
    const scheme = window.location.protocol === "https:" ? "wss://" : "ws://";
    const path = conversationId ? "/ws/chat/" + conversationId + "/" : "/ws/chat/";
    socket = new WebSocket(scheme + window.location.host + path);
    socket.addEventListener("message", (event) => onEvent(JSON.parse(event.data)));
    socket.addEventListener("close", (event) => {
      dropPending();
      if (window.gantry.sessionEnded(event)) return;
      // Reconnect after a dropped connection, then reload the history to catch up.
      if (event.code !== 1000) setTimeout(() => { connect(); loadHistory(); }, 1500);
    });
    const opening = socket;
    return new Promise((resolve) => {
      opening.addEventListener("open", resolve, { once: true });
      opening.addEventListener("close", resolve, { once: true });
    });
  }

  async function loadHistory() {
    if (!conversationId) return;
    const history = await api("GET", "/api/conversations/" + conversationId + "/messages/");
    history.forEach(draw);
    scrollDown();
  }

  // A message goes over the conversation's socket when it is open (its answer starts sooner: no HTTP
  // request to set up), else through the API. The socket answers chat.sent or chat.refused with our ref.
  let nextRef = 1;
  const pending = new Map(); // ref -> {resolve, reject}
  function post(content) {
    if (!socket || socket.readyState !== WebSocket.OPEN) {
      return api("POST", "/api/conversations/" + conversationId + "/messages/", { content });
    }
    const ref = nextRef++;
    const sent = new Promise((resolve, reject) => pending.set(ref, { resolve, reject }));
    socket.send(JSON.stringify({ type: "chat.send", ref, content }));
    return sent;
  }
  function settle(ref, message, detail) {
    const waiter = pending.get(ref);
    if (!waiter) return;
    pending.delete(ref);
    if (message) waiter.resolve(message);
    else waiter.reject(new Error(detail));
  }
  function dropPending() {
    for (const ref of Array.from(pending.keys())) {
      settle(ref, null, "The connection to the server dropped. If your message does not appear above once it is back, send it again.");
    }
  }

  async function send() {
    const content = input.value;
    if (!content.trim()) return;
    sendButton.disabled = true;
    showComposerError("");
    try {
      if (!conversationId) {
        const conversation = await api("POST", "/api/conversations/", { model: picked || null });
        conversationId = conversation.id;
        history.replaceState(null, "", "/c/" + conversationId + "/");
        main.dataset.conversationId = conversationId;
        const empty = document.getElementById("empty-state");
        if (empty) empty.remove();
        drawConversation(conversation, false);
        if (socket) { socket.onclose = null; socket.close(1000); }
        // Post only once the new socket listens, or the answer's first events go to nobody.
        await connect();
      }
      const message = await post(content);
      input.value = "";
      // The socket may already have brought a newer state of this message (its answer started).
      if (!messages.has(message.id)) draw(message);
      scrollDown();
    } catch (error) {
      showComposerError(error.message); // the text stays in the input
    } finally {
      sendButton.disabled = false;
      input.focus();
    }
  }

  composer.addEventListener("submit", (event) => { event.preventDefault(); send(); });
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) { event.preventDefault(); send(); }
  });
  stopButton.addEventListener("click", () => { const q = runningQuestion(); if (q) act("stop", q.id); });

  drawFleet(fleet);
  connect();
  loadHistory().catch((error) => showComposerError(error.message));
  input.focus();
})();
