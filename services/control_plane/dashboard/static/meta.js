// What the dashboard takes from the control plane instead of repeating it: the job states (and
// which are active or terminal), the config fields a clone leaves out, the form's example config.
// GET /v1/meta, read once per tab (again after a refusal, once the token is given).
//
//   await loadMeta();  meta.states  meta.active.has(job.state)  meta.exampleConfig

import { api } from "/dashboard/api.js";

export const meta = {
  states: [], // every job state, in lifecycle order
  active: new Set(), // a process may exist (its GPUs are busy)
  terminal: new Set(), // the job has ended
  notCopied: [], // config fields the control plane fills in per job: never copied into a clone
  exampleConfig: {}, // what the new-job form starts with
};

let loading = null;

export function loadMeta() {
  loading ??= api("/v1/meta").then(
    (answer) => {
      Object.assign(meta, {
        states: answer.job_states,
        active: new Set(answer.active_states),
        terminal: new Set(answer.terminal_states),
        notCopied: answer.not_copied,
        exampleConfig: answer.example_config,
      });
      return meta;
    },
    (error) => {
      loading = null; // asked again on the next call (a token may have come)
      throw error;
    },
  );
  return loading;
}
