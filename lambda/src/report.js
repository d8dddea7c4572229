// Report v1 client: one signed POST per processed unit to its callback.
// A report that cannot be delivered is logged and dropped; it never makes
// the consumer send anything again.

import { parseSecrets, signHeaders } from "./signature.js";

const ATTEMPTS = 3;
const TIMEOUT_MS = 10_000;
const BACKOFF_MS = [500, 2000];

/** A new report id: "rep_" and 32 hex digits. */
export function newReportId() {
  return `rep_${crypto.randomUUID().replaceAll("-", "")}`;
}

/** The report v1 document for `unit` and its per-recipient `results`. */
export function buildReport(unit, results, id = newReportId()) {
  return {
    v: 1,
    id,
    source: "worker",
    job: unit.job,
    batch: unit.batch,
    unit: unit.unit,
    results,
  };
}

/**
 * POST `report` to `callback`, signed with every key in
 * env.CLOUDMAIL_REPORT_SECRET. Retries network errors, 408, 429 and 5xx up
 * to ATTEMPTS times with the same report id (the route ignores repeats).
 * Returns true when the callback answered 2xx.
 */
export async function postReport(callback, report, env, options = {}) {
  const fetchImpl = options.fetchImpl ?? fetch;
  const sleep =
    options.sleep ?? ((ms) => new Promise((r) => setTimeout(r, ms)));
  let keys;
  try {
    keys = parseSecrets(env.CLOUDMAIL_REPORT_SECRET);
    if (keys.length === 0)
      throw new Error("CLOUDMAIL_REPORT_SECRET is not set.");
  } catch (err) {
    console.error(`report: unit ${report.unit} not reported:`, err);
    return false;
  }

  const body = JSON.stringify(report);
  for (let attempt = 1; attempt <= ATTEMPTS; attempt++) {
    let retryable = true;
    try {
      // Signed again on each attempt so the timestamp stays fresh.
      const headers = await signHeaders(keys, report.id, body);
      const response = await fetchImpl(callback, {
        method: "POST",
        headers: { "content-type": "application/json", ...headers },
        body,
        signal: AbortSignal.timeout(TIMEOUT_MS),
      });
      await response.body?.cancel();
      if (response.ok) return true;

      retryable =
        response.status >= 500 || [408, 429].includes(response.status);
      console.error(
        `report: unit ${report.unit} report ${report.id}: callback answered`,
        response.status,
      );
    } catch (err) {
      console.error(`report: unit ${report.unit} report ${report.id}:`, err);
    }

    if (!retryable || attempt === ATTEMPTS) break;
    await sleep(BACKOFF_MS[attempt - 1] ?? BACKOFF_MS.at(-1));
  }
  return false;
}
