// The status page's self-update. Served by the daemon itself (the page's CSP allows
// scripts from 'self' only): every few seconds it fetches the page again and swaps its
// <main> for the fresh one. The server renders and escapes everything; DOMParser builds
// the new tree without running any script in it, and no HTML string is ever assigned.
"use strict";
(function () {
  var PERIOD_MS = 5000;
  var live = document.getElementById("live");
  var updates = 0;

  function mark(state, text) {
    if (!live) return;
    live.dataset.state = state;
    live.dataset.updates = String(updates);
    live.textContent = text;
  }

  function clock() {
    return new Date().toISOString().slice(11, 19) + " UTC";
  }

  async function refresh() {
    try {
      var answer = await fetch(window.location.pathname, {
        credentials: "same-origin",
        cache: "no-store",
        redirect: "manual",
        headers: { Accept: "text/html" },
      });
      if (answer.type === "opaqueredirect" || answer.status === 401) {
        window.location.reload(); // the session ended: the server shows the login form
        return;
      }
      if (!answer.ok) throw new Error("HTTP " + answer.status);
      var doc = new DOMParser().parseFromString(await answer.text(), "text/html");
      var fresh = doc.querySelector("main");
      var current = document.querySelector("main");
      if (!fresh || !current) throw new Error("no <main> in the answer");
      current.replaceWith(document.adoptNode(fresh));
      updates += 1;
      mark("live", "live · updated " + clock());
    } catch (err) {
      mark("stale", "not updating (" + err.message + ") · retrying");
    } finally {
      window.setTimeout(refresh, PERIOD_MS);
    }
  }

  mark("live", "live · every " + PERIOD_MS / 1000 + " s");
  window.setTimeout(refresh, PERIOD_MS);
})();
