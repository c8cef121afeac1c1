// Background tasks of the server (training, active-learning scoring): start them and follow their progress through
// GET /train/ and GET /scoring/ (MONAI Label keeps each task's status and the last 20 lines of its log).

import {api} from "./api.js";

const RUNNING = new Set(["SUBMITTED", "RUNNING"]);

/** Training progress 0..1 from the task's last log lines, or null: MONAI's iteration lines ("Epoch: e/E, Iter: i/I")
 * where the bundle logs them, else the trainer's "Epoch[e] Complete" lines out of `epochs` (the requested
 * max_epochs; the trainer's "... until E epochs" line when not known). */
export function trainProgress(lines, epochs) {
  const rev = [...(lines || [])].reverse();
  let total = Number(epochs) || 0;
  if (!total) {
    for (const line of rev) {
      const m = /Trainer.*until (\d+) epochs/.exec(line);
      if (m) { total = Number(m[1]); break; }
    }
  }
  for (const line of rev) {
    const it = /Epoch:\s*(\d+)\s*\/\s*(\d+)(?:,\s*Iter:\s*(\d+)\s*\/\s*(\d+))?/.exec(line);
    if (it) {
      const frac = it[3] ? Number(it[3]) / Math.max(1, Number(it[4])) : 0;
      return Math.min(1, (Number(it[1]) - 1 + frac) / Math.max(1, Number(it[2])));
    }
    const done = /Trainer.*Epoch\[(\d+)\] Complete/.exec(line);
    if (done && total) return Math.min(1, Number(done[1]) / total);
  }
  return null;
}

/** Poll GET /<kind>/ until the task ends; `update(status)` after each poll. Resolves with the final status. */
export async function follow(kind, update, interval = 1500) {
  for (;;) {
    const st = await api.taskStatus(kind);
    update(st);
    if (!st || !RUNNING.has(st.status)) return st;
    await new Promise((r) => setTimeout(r, interval));
  }
}

/** The training panel: start / stop, progress bar and the last log line. */
export function trainingPanel({model, epochs, say, onDone}) {
  const bar = document.getElementById("train-progress");
  const text = document.getElementById("train-status");
  const button = document.getElementById("train");
  const show = (st) => {
    if (!st) { text.textContent = "no training run yet"; return; }
    const lines = st.details || [];
    const p = trainProgress(lines, st.request?.max_epochs);
    if (p !== null) bar.value = st.status === "DONE" ? 1 : p;
    else if (st.status === "DONE") bar.value = 1;
    const last = lines.length ? String(lines[lines.length - 1]).slice(0, 160) : "";
    text.textContent = `${st.status}${p !== null && RUNNING.has(st.status) ? ` ${(100 * p).toFixed(0)} %` : ""}` +
                       `${st.start_ts ? ` (started ${st.start_ts})` : ""}${last ? ` — ${last}` : ""}`;
    button.disabled = RUNNING.has(st.status);
  };
  const run = async (start) => {
    try {
      if (start) {
        const m = model();
        bar.value = 0;
        await api.startTraining(m, {max_epochs: epochs()});
        say(`Training ${m} started on the submitted labels.`, "info");
      }
      const st = await follow("train", show);
      if (st && st.status === "DONE" && start) { say("Training finished; the next segmentation uses the new weights.", "ok"); onDone(); }
      else if (st && st.status === "ERROR") say(`Training failed: ${(st.details || []).slice(-3).join(" | ")}`, "error");
    } catch (e) {
      say(e.message, "error");
      button.disabled = false;
    }
  };
  button.addEventListener("click", () => run(true));
  document.getElementById("train-stop").addEventListener("click", async () => {
    try { await api.stopTraining(); say("Training stopped.", "info"); } catch (e) { say(e.message, "error"); }
  });
  return () => run(false);  // follow a training that is already running (page opened during one)
}

/** The scoring button: POST /scoring/<method>, then follow it; `onDone()` reloads the work list. */
export function scoringButton({method, say, onDone}) {
  const button = document.getElementById("score");
  const text = document.getElementById("score-status");
  button.addEventListener("click", async () => {
    button.disabled = true;
    try {
      await api.startScoring(method());
      const st = await follow("scoring", (s) => { text.textContent = s ? `scoring: ${s.status}` : ""; });
      if (st && st.status === "DONE") { say("Scoring finished: the work list follows the new scores.", "ok"); await onDone(); }
      else if (st) say(`Scoring ended with ${st.status}: ${(st.details || []).slice(-2).join(" | ")}`, "error");
    } catch (e) {
      say(e.message, "error");
    } finally {
      button.disabled = false;
    }
  });
}
