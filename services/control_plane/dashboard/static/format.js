// Text for times, sizes, paths and a job's progress; pure functions of what the API returned.

import { meta } from "/dashboard/meta.js";

export const REFRESH_MS = 3000; // how often the jobs and services pages poll

export function relativeTime(iso) {
  if (!iso) return "–";
  const seconds = (Date.now() - new Date(iso).getTime()) / 1000;
  if (seconds < 45) return "just now";
  if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.round(seconds / 3600)} h ago`;
  if (seconds < 7 * 86400) return `${Math.round(seconds / 86400)} d ago`;
  return new Date(iso).toLocaleDateString();
}

export function absoluteTime(iso) {
  return iso ? new Date(iso).toLocaleString() : "";
}

const pad2 = (n) => String(n).padStart(2, "0");

export function duration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "–";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${pad2(s % 60)} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${pad2(Math.floor((s % 3600) / 60))} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

export function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

/** A long path cut in the middle of its folders, keeping the end: "…/checkpoints/<job id>". */
export function shortPath(path, max = 44) {
  const text = String(path ?? "–");
  if (text.length <= max) return text;
  const parts = text.split("/");
  let tail = parts.pop();
  while (parts.length && tail.length + parts[parts.length - 1].length + 3 <= max) tail = `${parts.pop()}/${tail}`;
  return `…/${tail}`;
}

export const integer = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString());

/** "Updated 12:00:03 · refreshes every 3 s": the foot of a polled page. */
export const updatedText = () =>
  `Updated ${new Date().toLocaleTimeString()} · refreshes every ${REFRESH_MS / 1000} s`;

export function gpusText(job) {
  if (job.gpus?.length) return `GPU ${job.gpus.join(", ")}`;
  if (!job.gpus_requested) return "CPU";
  return `${job.gpus_requested} GPU${job.gpus_requested > 1 ? "s" : ""}`;
}

/** Fraction done (0..1), or null when the run has not said how long it is. */
export function progressOf(job) {
  if (job.state === "succeeded") return 1;
  if (job.total_steps && job.step !== null) return Math.min(job.step / job.total_steps, 1);
  return null;
}

/** Steps per second over the newest rows of the job's current attempt ([{step, time}] in order). */
export function rateOf(rows) {
  const recent = rows.slice(-20);
  if (recent.length < 2) return null;
  const first = recent[0];
  const last = recent[recent.length - 1];
  const dt = last.time - first.time;
  const ds = last.step - first.step;
  return dt > 0 && ds > 0 ? { stepsPerS: ds / dt, lastTime: last.time } : null;
}

/** Seconds left, from the rate and the time since the newest row; null when unknown. */
export function etaOf(job, rate) {
  if (!meta.active.has(job.state) || !rate || !job.total_steps || job.step === null) return null;
  const left = (job.total_steps - job.step) / rate.stepsPerS;
  return Math.max(left - (Date.now() / 1000 - rate.lastTime), 0);
}

/** "took 3 min 02 s" for a job that ran and ended; null otherwise. */
export function tookText(job) {
  if (!job.finished_at || !job.started_at) return null;
  return `took ${duration((new Date(job.finished_at) - new Date(job.started_at)) / 1000)}`;
}
