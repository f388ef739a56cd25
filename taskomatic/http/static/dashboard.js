// The dashboard's live view: one EventSource per page (the body's data-live URL), each
// `snapshot` event re-rendering the live parts. No library, no build step.
"use strict";
(function () {
  const url = document.body.dataset.live;
  if (!url) return;
  const byId = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    for (const c of children) node.append(c === null || c === undefined ? "" : c);
    return node;
  }
  const taskLink = (id) => el("a", { href: "/ui/tasks/" + id }, id.slice(0, 8));
  const state = (s) => el("span", { class: "state state-" + s }, s);
  const time = (iso) => (iso ? new Date(iso).toLocaleTimeString() : "—");

  function fill(id, rows, cells, empty) {
    const table = byId(id);
    if (!table) return;
    const tbody = el("tbody");
    for (const row of rows) {
      tbody.append(el("tr", { "data-task": row.id || "" }, ...cells(row).map((c) => el("td", {}, c))));
    }
    if (!rows.length) tbody.append(el("tr", { class: "empty" }, el("td", {}, empty)));
    table.replaceChildren(tbody);
  }

  const render = {
    overview(s) {
      for (const [name, n] of Object.entries(s.counts)) {
        const span = byId("count-" + name);
        if (span) span.textContent = n;
      }
      byId("dispatchers").textContent = s.dispatchers;
      fill("groups", s.groups, (g) => [
        el("a", { href: "/ui/groups/" + g.id }, g.name || g.id.slice(0, 8)),
        state(g.state),
        Object.entries(g.counts).map(([k, n]) => n + " " + k).join(", "),
      ], "no groups yet");
      fill("running", s.running, (t) => [taskLink(t.id), t.action, t.host || "—",
        "since " + time(t.started_at), "attempt " + t.attempt], "nothing running");
      fill("waiting", s.waiting, (t) => [taskLink(t.id), t.action,
        (t.job || "host") + " job on " + (t.host || "?")], "nothing waiting on a host job");
      fill("blocked", s.blocked, (t) => [taskLink(t.id), t.action, t.why], "no new tasks");
      fill("failures", s.failures, (t) => [taskLink(t.id), t.action,
        el("span", { class: "error" }, t.error || "failed"), time(t.finished_at)], "no failures");
    },
    group(s) {
      const gs = byId("group-state");
      gs.textContent = s.group.state;
      gs.className = "state state-" + s.group.state;
      for (const [id, t] of Object.entries(s.tasks)) {
        for (const node of document.querySelectorAll('[data-task="' + id + '"]')) {
          if (node.tagName.toLowerCase() === "g") {
            node.setAttribute("class", "node state-" + t.state);
            const st = node.querySelector(".st");
            if (st) st.textContent = t.state;
          } else {
            const cell = node.querySelector("td.state");
            if (cell) { cell.textContent = t.state; cell.className = "state state-" + t.state; }
          }
        }
      }
    },
    task(s) {
      const st = byId("state");
      st.textContent = s.task.state;
      st.className = "state state-" + s.task.state;
      const detail = s.task.error_detail;
      byId("error").textContent = detail ? JSON.stringify(detail, null, 2) : "none";
      const list = byId("timeline");
      list.replaceChildren(...s.events.map((e) => el("li", { class: "state-" + e.to },
        el("time", {}, time(e.at)), " ", (e.from || "·") + " → ", el("b", {}, e.to), " ",
        e.message, " ", el("span", { class: "actor" }, e.actor))));
    },
  };

  const kind = url.includes("group=") ? "group" : url.includes("task=") ? "task" : "overview";
  const updated = byId("updated");
  const source = new EventSource(url);
  source.addEventListener("snapshot", (event) => {
    const snapshot = JSON.parse(event.data);
    if (snapshot.error) {
      if (updated) updated.textContent = snapshot.error;
      return;
    }
    render[kind](snapshot);
    document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
    if (updated) updated.textContent = "live · updated " + new Date().toLocaleTimeString();
  });
  source.addEventListener("error", () => {
    if (updated) updated.textContent = "reconnecting…";
  });
})();
