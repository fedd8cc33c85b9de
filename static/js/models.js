// The Admin Dashboard's Models tab: the model table, Switch/Unload with confirmation, live progress.
// The page follows the admins' socket (ws/models/), so an operation started anywhere (this page,
// another admin, the API, a command) shows the same way.
(function () {
  "use strict";

  const page = document.getElementById("dashboard");
  const rowsBody = document.getElementById("model-rows");
  const rowTemplate = document.getElementById("model-row-template");
  const noModels = document.getElementById("no-models");
  const noModel = document.getElementById("no-model");
  const trouble = document.getElementById("trouble");
  const abandoned = document.getElementById("abandoned");
  const unloadButton = document.getElementById("unload-button");
  const refreshButton = document.getElementById("refresh-button");
  const refreshed = document.getElementById("refreshed");
  const live = document.getElementById("live");
  const errorBox = document.getElementById("error");
  const progress = document.getElementById("progress");
  const progressText = document.getElementById("progress-text");
  const progressPercent = document.getElementById("progress-percent");
  const progressBar = document.getElementById("progress-bar");
  const progressFill = document.getElementById("progress-fill");
  const progressDetail = document.getElementById("progress-detail");
  const dialog = document.getElementById("confirm-dialog");

  let state = JSON.parse(document.getElementById("model-state").textContent);
  let operation = null; // the running operation: {id, kind, target}
  let failure = null; // the running operation's failure reason, once a `failed` step arrived
  const ended = new Set(); // operations seen to end (their late `done` event is still drawn)

  function api(method, url, body) { // base.js's, marked as coming from the dashboard
    return window.gantry.api(method, url, body, { "X-Gantry-Source": "dashboard" });
  }

  const busy = () => state.state === "switching" || state.state === "unloading";
  // TabbyAPI still loads a model a switch stopped waiting for: no switch or unload until that load ends.
  const held = () => busy() || Boolean(state.abandoned_load);
  let listed = rowsBody.rows.length > 0;

  // Rows

  function drawRow(row) {
    const name = row.dataset.model;
    const active = state.state === "ready" && state.active_model === name;
    row.classList.toggle("active", active);
    row.querySelector(".check").textContent = active ? "✓" : "";
    let status = active ? "Active" : "";
    if (state.state === "switching" && state.target_model === name) status = "Loading...";
    if (state.state === "unloading" && state.active_model === name) status = "Unloading...";
    if (state.abandoned_load === name) status = "Still loading in TabbyAPI...";
    row.querySelector(".status-text").textContent = status;
    row.querySelector(".switch").hidden = active;
    const policy = policies.get(name) || {};
    row.querySelector(".pin").hidden = !policy.pinned;
    drawIdle(row, policy);
  }

  // Model policies: the pin, and the time until an idle model is unloaded (counted down here, taken
  // again from the server every few seconds: an answer on the model starts its idle time again).

  const policies = new Map(); // model id -> {pinned, idle_unload_after, unloadAt (ms) or null}
  const IDLE_REFETCH_MS = 5000;
  let idleFetched = 0;

  function learnPolicies(models) {
    const now = Date.now();
    policies.clear();
    models.forEach((model) => {
      const left = model.idle_unload_in;
      policies.set(model.id, {
        pinned: Boolean(model.pinned),
        idle_unload_after: model.idle_unload_after,
        unloadAt: left === null || left === undefined ? null : now + left * 1000,
      });
    });
    idleFetched = now;
  }

  function clock(seconds) {
    const whole = Math.max(0, Math.ceil(seconds));
    const hours = Math.floor(whole / 3600);
    const minutes = Math.floor((whole % 3600) / 60);
    const rest = String(whole % 60).padStart(2, "0");
    return hours ? hours + ":" + String(minutes).padStart(2, "0") + ":" + rest : minutes + ":" + rest;
  }

  function drawIdle(row, policy) {
    const box = row.querySelector(".idle-unload");
    const busyHere = busy() && (state.active_model === row.dataset.model || state.target_model === row.dataset.model);
    if (policy.unloadAt === null || policy.unloadAt === undefined || busyHere) {
      box.hidden = true;
      box.textContent = "";
      return;
    }
    const left = (policy.unloadAt - Date.now()) / 1000;
    box.textContent = left > 0 ? "Unloads if idle in " + clock(left) : "Unloading: idle for " + clock(policy.idle_unload_after);
    box.title = "Unloaded after " + policy.idle_unload_after + " s without a request (its idle_unload_after setting)";
    box.hidden = false;
  }

  function tickIdle() {
    const counting = Array.from(policies.values()).some((policy) => policy.unloadAt !== null);
    Array.from(rowsBody.rows).forEach((row) => drawIdle(row, policies.get(row.dataset.model) || {}));
    if (counting && Date.now() - idleFetched >= IDLE_REFETCH_MS) {
      idleFetched = Date.now();
      api("GET", "/api/admin/models").then((data) => drawRows(data.models)).catch(() => {});
    }
  }
  setInterval(tickIdle, 1000);

  function drawRows(models) {
    learnPolicies(models);
    rowsBody.replaceChildren(...models.map((model) => {
      const row = rowTemplate.content.firstElementChild.cloneNode(true);
      row.dataset.model = model.id;
      row.querySelector(".model-id").textContent = model.name;
      row.querySelector(".settings").href = "/admin/models/" + encodeURIComponent(model.id) + "/settings/";
      return row;
    }));
    listed = models.length > 0;
    drawControls();
  }

  // Why TabbyAPI could not be asked the last time (the sentence names what to fix).
  function troubleText() {
    if (state.trouble === "unreachable") {
      return "Model server unreachable: " + state.trouble_text + " Chat holds new messages until it answers again.";
    }
    if (state.trouble === "answer") return "TabbyAPI's last answer could not be used: " + state.trouble_text;
    return state.trouble_text || "";
  }

  function drawControls() {
    Array.from(rowsBody.rows).forEach(drawRow);
    trouble.textContent = state.trouble ? troubleText() : "";
    trouble.hidden = !state.trouble;
    abandoned.textContent = state.abandoned_load
      ? "TabbyAPI is still loading " + state.abandoned_load + ": a switch stopped waiting for it, but TabbyAPI goes on " +
        "with that load and can load nothing else until it ends. You can switch again once it ends; this page shows when."
      : "";
    abandoned.hidden = !state.abandoned_load;
    noModels.hidden = listed || Boolean(state.trouble);
    noModel.hidden = busy() || Boolean(state.active_model || state.trouble || state.abandoned_load);
    rowsBody.querySelectorAll(".switch").forEach((button) => { button.disabled = held(); });
    unloadButton.disabled = held() || !state.active_model;
    refreshButton.disabled = busy();
  }

  // Progress and errors

  function showError(text) { errorBox.textContent = text; errorBox.hidden = !text; }

  // `restored`: the model loaded again after the failure, null for none, undefined while not known yet.
  function failureText(kind, target, reason, restored) {
    let text = kind === "unload" ? "Failed to unload the model." : "Failed to switch model to " + target + ".";
    if (reason) text += " Reason: " + reason.replace(/\.?\s*$/, ".");
    if (restored) text += " The previous model, " + restored + ", was loaded again, so chat keeps working.";
    else if (restored === null && state.abandoned_load) text += " TabbyAPI goes on loading " + state.abandoned_load + " (below).";
    else if (restored === null) text += " No model is loaded now: chat shows 'Model not available' until you switch to one.";
    return text;
  }

  function timeLeft(seconds) {
    if (seconds < 1) return "almost done";
    return "about " + (seconds < 90 ? Math.round(seconds) + " s" : Math.round(seconds / 60) + " min") + " left";
  }

  function drawProgress(p) {
    if (ended.has(p.operation_id) && p.step !== "done") return; // a late event of an operation already over
    if (p.step === "failed") {
      failure = p.text.replace(/^✗\s*/, "");
      showError(failureText(operation ? operation.kind : "switch", p.model, failure, undefined));
    }
    const percent = Math.max(0, Math.min(100, Math.round(p.percent)));
    progress.hidden = false;
    progress.dataset.step = p.step;
    progressText.textContent = p.text;
    progressPercent.textContent = percent + "%";
    progressFill.style.width = percent + "%";
    progressBar.setAttribute("aria-valuenow", String(percent));
    const details = [];
    if (p.modules && p.step !== "done") details.push("module " + p.module + " of " + p.modules);
    if (p.eta_seconds !== null && p.eta_seconds !== undefined && p.step !== "done") details.push(timeLeft(p.eta_seconds));
    progressDetail.textContent = details.join(" · ");
  }

  function startOperation() {
    operation = { id: state.operation_id, kind: state.state === "switching" ? "switch" : "unload", target: state.target_model };
    failure = null;
    showError("");
    drawProgress({ operation_id: operation.id, step: "queued", percent: 0, text: "Waiting to start...", module: 0, modules: 0 });
  }

  // The `model.state` that ends an operation comes before its `done` progress event: draw the
  // final line from the state already, so the late event changes nothing.
  function endOperation() {
    const op = operation;
    operation = null;
    ended.add(op.id);
    if (failure !== null) {
      progress.hidden = true;
      showError(failureText(op.kind, op.target, failure, state.state === "ready" ? state.active_model : null));
    } else if (op.kind === "switch" && state.state === "ready" && state.active_model === op.target) {
      drawProgress({ operation_id: op.id, step: "done", percent: 100, text: "✓ Model switched successfully!" });
    } else if (op.kind === "unload" && !state.active_model) {
      drawProgress({ operation_id: op.id, step: "done", percent: 100, text: "✓ Model unloaded" });
    } else {
      progress.hidden = true;
      if (state.state === "failed") showError("The last operation did not finish and no model is loaded. Switch to a model to bring chat back.");
    }
    failure = null;
  }

  function drawState(next) {
    state = next;
    if (busy() && (!operation || operation.id !== state.operation_id)) startOperation();
    else if (!busy() && operation) endOperation();
    drawControls();
  }

  // Actions

  async function act(kind, target) {
    const previous = state.active_model;
    showError("");
    try {
      if (kind === "switch") await api("POST", "/api/admin/models/switch", { model_id: target });
      else await api("POST", "/api/admin/models/unload");
    } catch (error) {
      const data = error.data || {};
      showError(data.reason !== undefined
        ? failureText(kind, target, data.reason, data.rolled_back ? previous : null)
        : error.message);
    }
  }

  let confirmed = null; // what the open dialog does on Confirm
  function confirmThen(title, text, action) {
    dialog.querySelector("#confirm-title").textContent = title;
    dialog.querySelector("#confirm-text").textContent = text;
    confirmed = action;
    dialog.returnValue = "";
    dialog.showModal();
  }
  dialog.addEventListener("close", () => {
    const action = confirmed;
    confirmed = null;
    if (dialog.returnValue === "confirm" && action) action();
  });

  rowsBody.addEventListener("click", (event) => {
    const button = event.target.closest("button.switch");
    if (!button) return;
    const model = button.closest("tr").dataset.model;
    confirmThen("Switch model", "Switch to " + model + "? Chats hold new messages until it is loaded.", () => act("switch", model));
  });

  unloadButton.addEventListener("click", () => {
    const model = state.active_model;
    confirmThen("Unload model", "Unload " + model + "? Chats show 'Model not available' until you switch to a model.",
      () => act("unload", model));
  });

  refreshButton.addEventListener("click", async () => {
    refreshButton.disabled = true;
    showError("");
    try {
      drawRows((await api("POST", "/api/admin/models/refresh")).models);
      refreshed.textContent = "List refreshed at " + new Date().toLocaleTimeString();
    } catch (error) {
      const data = error.data || {};
      if (data.models) drawRows(data.models);
      showError(data.reason ? error.message + " " + data.reason : error.message);
    } finally {
      drawControls();
    }
  });

  // Live updates

  function onEvent(event) {
    switch (event.type) {
      case "model.state":
        drawState(event);
        // What the backends hold changed (a load, an unload): the idle times with it.
        api("GET", "/api/admin/models").then((data) => drawRows(data.models)).catch(() => {});
        break;
      case "model.progress": drawProgress(event); break;
      case "model.list": drawRows(event.models); break;
    }
  }

  function setLive(on) {
    page.dataset.live = String(on);
    live.textContent = on ? "Live" : "Reconnecting...";
    live.classList.toggle("on", on);
  }

  function connect() {
    const scheme = window.location.protocol === "https:" ? "wss://" : "ws://";
    const socket = new WebSocket(scheme + window.location.host + "/ws/models/");
    socket.addEventListener("open", () => {
      setLive(true);
      // Events may have been missed before the socket opened (or while it was down): take the list again
      // (the state comes by itself).
      api("GET", "/api/admin/models").then((data) => drawRows(data.models)).catch(() => {});
    });
    socket.addEventListener("message", (event) => onEvent(JSON.parse(event.data)));
    socket.addEventListener("close", (event) => {
      setLive(false);
      if (!window.gantry.sessionEnded(event)) setTimeout(connect, 1500);
    });
  }

  const running = JSON.parse(document.getElementById("running-operation").textContent);
  if (running) {
    operation = { id: running.id, kind: running.kind, target: running.to_model };
    drawProgress({ operation_id: running.id, step: running.step, percent: running.percent, text: running.text, module: 0, modules: 0 });
  }
  learnPolicies(JSON.parse(document.getElementById("model-rows-data").textContent));
  drawState(state);
  connect();
})();
