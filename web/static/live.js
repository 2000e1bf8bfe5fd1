// The live queue: server-sent events from /queue/events ("queue", "progress", "preview").
(() => {
  const live = document.getElementById("live");
  if (!live) return;
  const csrf = document.getElementById("csrf").value;
  const $ = (id) => document.getElementById(id);
  const secs = (s) => (s === null || s === undefined) ? "—" : (s < 120 ? `${s.toFixed(0)} s` : `${(s / 60).toFixed(1)} min`);
  const mib = (b) => `${(b / 1048576).toFixed(0)} MiB`;
  let runningId = null;

  function cell(text) { const td = document.createElement("td"); td.textContent = text; return td; }
  function actionForm(action, target, label) {
    const form = document.createElement("form");
    form.method = "post"; form.action = `/actions/${action}`; form.className = "inline";
    for (const [name, value] of [["csrf", csrf], ["target", target]]) {
      const input = document.createElement("input");
      input.type = "hidden"; input.name = name; input.value = value; form.appendChild(input);
    }
    const button = document.createElement("button"); button.textContent = label; form.appendChild(button);
    return form;
  }
  function actionCell(action, target, label) {
    const td = document.createElement("td"); td.appendChild(actionForm(action, target, label)); return td;
  }
  function jobLink(id) {
    const td = document.createElement("td"); const a = document.createElement("a");
    a.href = `/job/${id}`; a.textContent = id; td.appendChild(a); return td;
  }

  function showQueue(snap) {
    const running = snap.entries.find((e) => e.position === 0);
    const box = $("running");
    box.replaceChildren();
    if (running) {
      if (running.job_id !== runningId) { $("progress").value = 0; $("preview").hidden = true; }
      runningId = running.job_id;
      box.dataset.job = running.job_id;
      const on = running.worker && running.worker !== "gpu" ? ` · on ${running.worker}` : "";
      box.append(`${running.job_id} · ${running.model} · ${running.user}${on} · ETA ${secs(running.eta_s)} `);
      box.append(actionForm("cancel", running.job_id, "Cancel"));
      // several GPU workers ([cluster]): the other running jobs, one line each (progress shows the first)
      for (const other of snap.entries.filter((e) => e.position === 0 && e !== running)) {
        const line = document.createElement("div");
        line.textContent = `${other.job_id} · ${other.model} · ${other.user} · on ${other.worker} · ETA ${secs(other.eta_s)}`;
        box.append(line);
      }
      $("progress").hidden = false;
    } else {
      runningId = null; box.dataset.job = ""; box.textContent = "nothing";
      $("progress").hidden = true; $("preview").hidden = true;
    }
    const rows = snap.entries.filter((e) => e.position > 0).map((e) => {
      const tr = document.createElement("tr"); tr.dataset.job = e.job_id;
      tr.append(cell(e.position), jobLink(e.job_id), cell(e.model), cell(e.user), cell(secs(e.waited_s)),
                cell(secs(e.eta_s)), actionCell("cancel", e.job_id, "Cancel"));
      return tr;
    });
    if (!rows.length) { const tr = document.createElement("tr"); const td = cell("empty"); td.colSpan = 7; tr.append(td); rows.push(tr); }
    $("waiting").replaceChildren(...rows);
    $("resident").replaceChildren(...snap.resident.map((m) => {
      const tr = document.createElement("tr");
      const on = snap.workers > 1 ? ` on ${m.worker}` : "";
      tr.append(cell(m.model + on + (m.pinned ? " (pinned)" : "")), cell(m.where), cell(mib(m.bytes)), cell(secs(m.load_s)),
                actionCell("unload", m.model, "Unload"));
      return tr;
    }));
    $("budget").textContent = snap.gpu_budget_bytes === null ? `GPU: ${mib(snap.gpu_used_bytes)} used, no budget`
      : `GPU: ${mib(snap.gpu_used_bytes)} of ${mib(snap.gpu_budget_bytes)} used`;
  }

  const events = new EventSource(live.dataset.events);
  events.addEventListener("queue", (e) => showQueue(JSON.parse(e.data)));
  events.addEventListener("progress", (e) => {
    const p = JSON.parse(e.data);
    if (p.job_id !== runningId) return;
    $("progress").max = p.total; $("progress").value = p.step; $("progress").dataset.step = `${p.step}/${p.total}`;
  });
  events.addEventListener("preview", (e) => {
    const p = JSON.parse(e.data);
    if (p.job_id !== runningId || !p.src) return;
    $("preview").src = p.src; $("preview").hidden = false;
  });
})();
