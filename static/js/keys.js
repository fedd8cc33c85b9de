// The API keys page: make a key (shown once, with a Copy button), revoke keys.
(function () {
  "use strict";
  const admin = document.getElementById("keys-script").dataset.admin === "true";
  const form = document.getElementById("new-key-form");
  const nameInput = document.getElementById("key-name");
  const createButton = document.getElementById("create-key");
  const error = document.getElementById("key-error");
  const shown = document.getElementById("new-key");
  const table = document.getElementById("keys-table");
  const body = document.getElementById("keys-body");
  const none = document.getElementById("no-keys");

  function showError(text) {
    error.textContent = text;
    error.hidden = !text;
  }
  // As the server writes dates on this page: "Dec 3, 2026 07:22".
  function when(iso) {
    const d = new Date(iso);
    const pad = (n) => String(n).padStart(2, "0");
    const month = d.toLocaleString("en", { month: "short" });
    return month + " " + d.getDate() + ", " + d.getFullYear() + " " + pad(d.getHours()) + ":" + pad(d.getMinutes());
  }
  function cell(row, text, className) {
    const td = row.insertCell();
    td.textContent = text;
    if (className) td.className = className;
    return td;
  }
  function addRow(key) {
    const row = body.insertRow(0);
    row.dataset.keyId = key.id;
    cell(row, key.name, "key-name");
    const code = document.createElement("code");
    code.textContent = key.prefix + "…";
    row.insertCell().appendChild(code);
    if (admin) cell(row, key.owner);
    cell(row, when(key.created));
    const never = document.createElement("span");
    never.className = "muted";
    never.textContent = "never";
    row.insertCell().appendChild(never);
    const actions = row.insertCell();
    actions.className = "actions-cell";
    const revoke = document.createElement("button");
    revoke.type = "button";
    revoke.className = "stop revoke";
    revoke.dataset.keyId = key.id;
    revoke.dataset.keyName = key.name;
    revoke.textContent = "Revoke";
    actions.appendChild(revoke);
    table.hidden = false;
    none.hidden = true;
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    showError("");
    createButton.disabled = true;
    try {
      const key = await window.gantry.api("POST", "/api/keys", { name: nameInput.value });
      document.getElementById("new-key-name").textContent = "“" + key.name + "”";
      document.getElementById("new-key-value").textContent = key.key;
      document.getElementById("copied").hidden = true;
      shown.hidden = false;
      nameInput.value = "";
      addRow(key);
    } catch (e) {
      showError(e.message);
    } finally {
      createButton.disabled = false;
    }
  });

  document.getElementById("copy-key").addEventListener("click", async () => {
    const value = document.getElementById("new-key-value").textContent;
    try {
      await navigator.clipboard.writeText(value);
      document.getElementById("copied").hidden = false;
    } catch (e) {
      // Without clipboard access (an insecure origin), select the key so the keyboard can copy it.
      const range = document.createRange();
      range.selectNodeContents(document.getElementById("new-key-value"));
      window.getSelection().removeAllRanges();
      window.getSelection().addRange(range);
    }
  });

  body.addEventListener("click", async (event) => {
    const button = event.target.closest("button.revoke");
    if (!button) return;
    if (!window.confirm("Revoke the key “" + button.dataset.keyName + "”? Programs using it will be refused.")) return;
    button.disabled = true;
    showError("");
    try {
      await window.gantry.api("DELETE", "/api/keys/" + button.dataset.keyId + "/");
    } catch (e) {
      if (!/404|no such key/i.test(e.message)) {
        showError(e.message);
        button.disabled = false;
        return;
      }
    }
    button.closest("tr").remove();
    if (!body.rows.length) { table.hidden = true; none.hidden = false; }
  });
})();
