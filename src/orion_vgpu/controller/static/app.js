// Orion vGPU dashboard: refresh the live part of the page in place, show times in the
// browser's time zone, and ask before destructive form posts. No libraries.
(function () {
  "use strict";

  function localTimes(root) {
    root.querySelectorAll("time.local[datetime]").forEach(function (el) {
      var d = new Date(el.getAttribute("datetime"));
      if (!isNaN(d)) {
        el.title = d.toString();
        // Today's times need no date; older ones do.
        el.textContent = d.toDateString() === new Date().toDateString()
          ? d.toLocaleTimeString() : d.toLocaleString();
      }
    });
  }

  // A person typing or reading an open panel must not lose it to a refresh.
  function busy(live) {
    var a = document.activeElement;
    return a && live.contains(a) && /^(INPUT|SELECT|TEXTAREA|BUTTON)$/.test(a.tagName);
  }

  function startRefresh() {
    var live = document.getElementById("live");
    var every = Number(document.body.dataset.refresh || 0);
    var stamp = document.getElementById("updated");
    if (!live || !every) return;
    var running = false;
    async function refresh() {
      if (running || document.hidden || busy(live)) return;
      running = true;
      var open = Array.from(live.querySelectorAll("details[open][id]")).map(function (d) { return d.id; });
      try {
        var r = await fetch(location.pathname + location.search, {
          headers: { "X-Orion-Partial": "1" }, credentials: "same-origin", cache: "no-store",
        });
        if (r.status === 401) { location.reload(); return; }
        if (!r.ok) { if (stamp) stamp.textContent = "failed (HTTP " + r.status + ")"; return; }
        var html = await r.text();
        if (busy(live)) return;
        live.innerHTML = html;
        open.forEach(function (id) { var d = document.getElementById(id); if (d) d.open = true; });
        localTimes(live);
        if (stamp) stamp.textContent = new Date().toLocaleTimeString();
        document.body.dataset.refreshed = String(Number(document.body.dataset.refreshed || 0) + 1);
      } catch (e) {
        if (stamp) stamp.textContent = "controller unreachable";
      } finally {
        running = false;
      }
    }
    setInterval(refresh, every * 1000);
  }

  document.addEventListener("submit", function (ev) {
    var msg = ev.target.dataset ? ev.target.dataset.confirm : null;
    if (msg && !window.confirm(msg)) ev.preventDefault();
  });

  document.addEventListener("DOMContentLoaded", function () {
    localTimes(document);
    startRefresh();
  });
})();
