// corral's dashboard: live rows and logs from server-sent events, buttons and forms that call
// the API under /api/ with the token in the Authorization header. No framework, no build.
"use strict";

const token = document.querySelector('meta[name="corral-token"]').content;

async function api(method, path, body) {
  const response = await fetch("/api" + path, {
    method,
    headers: {"Authorization": "Bearer " + token, "Content-Type": "application/json"},
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    throw new Error(data.error ? data.error.message : response.status + " " + response.statusText);
  }
  return data;
}

function say(text, isError) {
  const box = document.getElementById("message");
  box.textContent = text;
  box.className = "message" + (isError ? " error" : "");
  box.hidden = !text;
}

function fragment(html) {
  const template = document.createElement("template");
  template.innerHTML = html.trim();
  return template.content.firstElementChild;
}

function live(url, handlers) {
  const source = new EventSource(url);
  const dot = document.getElementById("live");
  source.onopen = () => dot.classList.add("on");
  source.onerror = () => dot.classList.remove("on");
  for (const [name, handle] of Object.entries(handlers)) {
    source.addEventListener(name, (event) => handle(JSON.parse(event.data)));
  }
  return source;
}

function tasksPage() {
  document.querySelectorAll("[data-autosubmit]").forEach((select) => {
    select.addEventListener("change", () => select.form.submit());
  });
  const table = document.querySelector("table.tasks");
  const rows = document.getElementById("task-rows");
  live(table.dataset.events, {
    ready: () => { table.dataset.live = "on"; },
    task: ({id, html}) => {
      const old = document.getElementById("task-" + id);
      if (!html) { if (old) old.remove(); return; }
      const row = fragment(html);
      if (old) { old.replaceWith(row); return; }
      const newer = [...rows.children].find((r) => Number(r.id.slice(5)) < id);
      rows.insertBefore(row, newer || null);
      const empty = document.getElementById("no-tasks");
      if (empty) empty.remove();
    },
  });
}

function taskPage() {
  const section = document.getElementById("task");
  const taskId = section.dataset.task;
  const log = document.getElementById("log");
  let streaming = null;  // the assistant bubble text deltas go to
  live(section.dataset.events, {
    state: ({html}) => document.getElementById("task-head").replaceWith(fragment(html)),
    execution: ({id}) => {
      streaming = null;
      log.appendChild(fragment('<div class="execution">execution ' + id + "</div>"));
    },
    log: ({kind, html, text}) => {
      if (kind === "delta") {
        if (!streaming) {
          streaming = fragment('<div class="item assistant streaming"><div class="who">assistant</div><p></p></div>');
          log.appendChild(streaming);
        }
        streaming.querySelector("p").textContent += text;
      } else if (kind === "text" && streaming) {
        streaming.replaceWith(fragment(html));  // the whole message, as the agent sent it
        streaming = null;
      } else {
        if (kind !== "text") streaming = null;
        log.appendChild(fragment(html));
      }
      log.scrollTop = log.scrollHeight;
    },
  });
  section.addEventListener("click", async (event) => {
    const button = event.target.closest("button[data-action]");
    if (!button) return;
    const action = button.dataset.action;
    if (action === "discard" && !confirm("Drop this task's worktree and branch?")) return;
    button.disabled = true;
    try {
      const body = action === "merge" ? {squash: false} : undefined;
      await api("POST", "/tasks/" + taskId + "/" + action, body);
      say(action + ": done", false);
    } catch (error) {
      say(action + ": " + error.message, true);
    } finally {
      button.disabled = false;
    }
  });
  document.getElementById("reply").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = event.target;
    try {
      await api("POST", "/tasks/" + taskId + "/reply", {prompt: form.prompt.value});
      form.reset();
      say("reply queued", false);
    } catch (error) {
      say("reply: " + error.message, true);
    }
  });
}

function submitPage() {
  document.getElementById("submit").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = event.target;
    const body = {prompt: form.prompt.value, isolate: form.isolate.checked};
    for (const name of ["agent", "model", "workdir", "base"]) {
      if (form[name].value.trim()) body[name] = form[name].value.trim();
    }
    for (const name of ["priority", "timeout_s", "max_retries", "max_cost_usd"]) {
      if (form[name].value !== "") body[name] = Number(form[name].value);
    }
    if (form.after.value.trim()) {
      body.after = form.after.value.split(/[\s,]+/).filter(Boolean).map(Number);
    }
    try {
      const task = await api("POST", "/tasks", body);
      window.location.assign("/tasks/" + task.id);
    } catch (error) {
      say(error.message, true);
    }
  });
}

const pages = {tasks: tasksPage, task: taskPage, submit: submitPage};
const start = pages[document.body.dataset.page];
if (start) start();
