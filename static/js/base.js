// The site's JSON API as the pages call it: the session's cookie and the CSRF token go with each request.
// A refusal throws an Error whose message is the server's `detail` (or its `content` errors) and whose
// `data` is the response's body.
window.gantry = (function () {
  "use strict";
  function csrfToken() {
    const match = document.cookie.match(/(?:^|; )csrftoken=([^;]+)/);
    return match ? decodeURIComponent(match[1]) : "";
  }
  async function api(method, url, body, headers) {
    const response = await fetch(url, {
      method,
      credentials: "same-origin",
      headers: Object.assign({ "Content-Type": "application/json", "X-CSRFToken": csrfToken() }, headers),
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    let data = null;
    try { data = await response.json(); } catch (e) { data = null; }
    if (!response.ok) {
      const detail = data && data.detail ? data.detail : data && data.content ? data.content.join(" ") : "";
      const error = new Error(detail || "The server could not do that (" + response.status + "). Try again.");
      error.data = data || {};
      throw error;
    }
    return data;
  }
  // A socket closed with 4401: its session ended (logged out, password changed, account deactivated).
  // Reloading lands on the login page, unless this page is already leaving (its own Log out, say).
  let leaving = false;
  window.addEventListener("beforeunload", () => { leaving = true; });
  function sessionEnded(event) {
    if (event.code !== 4401) return false;
    if (!leaving) window.location.reload();
    return true;
  }
  return { csrfToken, api, sessionEnded };
})();

// The profile menu at the top right, on every page.
(function () {
  "use strict";
  const button = document.getElementById("profile-button");
  const menu = document.getElementById("profile-menu");
  if (!button || !menu) return;
  function setOpen(open) {
    menu.hidden = !open;
    button.setAttribute("aria-expanded", String(open));
  }
  button.addEventListener("click", (event) => { event.stopPropagation(); setOpen(menu.hidden); });
  document.addEventListener("click", (event) => { if (!menu.contains(event.target)) setOpen(false); });
  document.addEventListener("keydown", (event) => { if (event.key === "Escape") setOpen(false); });
})();
