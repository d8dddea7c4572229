// The queue consumer: one unit (batch message v1) per queue message. Each
// recipient is claimed in the idempotency store, sent once through SES and
// recorded; then the message is acked or retried, explicitly, and a report
// with the final outcomes goes to the unit's callback.

import { MAX_DELAY_SECONDS } from "./limits.js";
import { buildReport, postReport } from "./report.js";
import { sendEmail, sesClient, sesEndpoint } from "./ses.js";
import { D1IdempotencyStore } from "./store.js";
import { validateUnit } from "./validate.js";

const DEFAULTS = {
  maxAttempts: 10,
  retryBaseSeconds: 5,
  retryMaxSeconds: 3600,
  claimLeaseSeconds: 120,
};

/** Consumer settings from env vars, falling back to DEFAULTS. */
export function consumerSettings(env) {
  const number = (value, fallback, min) => {
    const parsed = Number(value);
    return value !== undefined &&
      value !== "" &&
      Number.isFinite(parsed) &&
      parsed >= min
      ? parsed
      : fallback;
  };
  return {
    maxAttempts: number(env.MAX_ATTEMPTS, DEFAULTS.maxAttempts, 1),
    retryBaseSeconds: number(
      env.RETRY_BASE_SECONDS,
      DEFAULTS.retryBaseSeconds,
      0,
    ),
    retryMaxSeconds: Math.min(
      number(env.RETRY_MAX_SECONDS, DEFAULTS.retryMaxSeconds, 0),
      MAX_DELAY_SECONDS,
    ),
    claimLeaseSeconds: number(
      env.CLAIM_LEASE_SECONDS,
      DEFAULTS.claimLeaseSeconds,
      1,
    ),
  };
}

/** Exponential backoff: base * 2^(attempts - 1), capped; attempts >= 1. */
export function backoffSeconds(attempts, settings) {
  const exponent = Math.max(0, Math.min(attempts - 1, 30));
  const delay = settings.retryBaseSeconds * 2 ** exponent;
  return Math.ceil(Math.min(delay, settings.retryMaxSeconds));
}

/**
 * The ack-or-retry decision for a processed unit: ack when every recipient
 * has a final outcome, else retry after the backoff (or later, when a claim
 * held by another invocation has not yet expired).
 */
export function decide(outcome, attempts, settings) {
  if (!outcome.pending) return { action: "ack" };

  const wait = Math.max(
    backoffSeconds(attempts, settings),
    outcome.pending.retryAfter ?? 0,
  );
  return {
    action: "retry",
    delaySeconds: Math.min(Math.ceil(wait), MAX_DELAY_SECONDS),
  };
}

function result(message, status, fields = {}) {
  return {
    rid: message.rid,
    key: message.key,
    status,
    message_id: fields.messageId ?? null,
    error_code: fields.errorCode ?? null,
    error: fields.error ?? null,
  };
}

/**
 * Send every recipient of `unit` that has no outcome yet, stopping at the
 * first one that must wait (throttling, transient error). Returns
 * {results, pending}: results are final outcomes to report; pending is null
 * when the unit is done, else {code, error, retryAfter?}.
 */
export async function processUnit(unit, deps) {
  const results = [];

  for (const message of unit.messages) {
    const step = await processRecipient(unit, message, deps);
    if (step.pending) return { results, pending: step.pending };
    results.push(step.result);
  }
  return { results, pending: null };
}

async function processRecipient(unit, message, deps) {
  const { store, send, attempts, settings } = deps;

  // 1. Claim the key; an existing row means this key was handled before.
  let claim;
  try {
    claim = await store.claim(message.key);
  } catch (err) {
    console.error(
      `queue: unit ${unit.unit} key ${message.key}: claim failed:`,
      err,
    );
    return {
      pending: { code: "StoreUnavailable", error: String(err?.message ?? err) },
    };
  }
  if (!claim.claimed) return fromExistingRow(unit, message, claim.row, deps);

  // 2. Send; sendEmail never throws.
  const outcome = await send(unit, message);

  // 3. Record the outcome. A failed write after a send leaves the key
  //    "sending", which a redelivery reports as AmbiguousSend: never resent.
  if (outcome.kind === "sent") {
    await record(unit, message, () =>
      store.markSent(message.key, claim.token, outcome.messageId),
    );
    return {
      result: result(message, "sent", { messageId: outcome.messageId }),
    };
  }

  if (outcome.kind === "failed" || attempts >= settings.maxAttempts) {
    const error =
      outcome.kind === "failed"
        ? outcome.error
        : `Gave up after ${attempts} attempts: ${outcome.error}`;
    await record(unit, message, () =>
      store.markFailed(message.key, claim.token, outcome.code, error),
    );
    return {
      result: result(message, "failed", { errorCode: outcome.code, error }),
    };
  }

  // Nothing was sent: give the key back so the retry sends exactly this one.
  await record(unit, message, () => store.release(message.key, claim.token));
  console.error(
    `queue: unit ${unit.unit} key ${message.key}: will retry after`,
    outcome.code,
  );
  return { pending: { code: outcome.code, error: outcome.error } };
}

async function fromExistingRow(unit, message, row, deps) {
  const { store, attempts, settings, now } = deps;

  // Released between our insert and select: another invocation retried it.
  if (!row)
    return { pending: { code: "ClaimReleased", error: "claim released" } };

  if (row.status === "sent") {
    return { result: result(message, "sent", { messageId: row.message_id }) };
  }
  if (row.status === "failed") {
    return {
      result: result(message, "failed", {
        errorCode: row.error_code,
        error: row.error,
      }),
    };
  }

  // "sending": another invocation holds the claim, or one crashed mid-send.
  const leaseMs = settings.claimLeaseSeconds * 1000;
  const age = now() - row.claimed_at;
  if (age < leaseMs && attempts < settings.maxAttempts) {
    return {
      pending: {
        code: "InProgress",
        error: "another invocation holds the claim",
        retryAfter: Math.ceil((leaseMs - age) / 1000),
      },
    };
  }

  const error =
    "A send was started for this key but its outcome was never " +
    "recorded; it is not sent again. Check the SES event stream for it.";
  const marked = await record(unit, message, () =>
    store.markFailed(message.key, row.token, "AmbiguousSend", error),
  );
  if (marked === false) {
    // Finished by its owner in the meantime: report what it recorded.
    const latest = await store.claim(message.key).catch(() => null);
    if (
      latest &&
      !latest.claimed &&
      latest.row &&
      latest.row.status !== "sending"
    ) {
      return fromExistingRow(unit, message, latest.row, deps);
    }
  }
  return {
    result: result(message, "failed", { errorCode: "AmbiguousSend", error }),
  };
}

async function record(unit, message, write) {
  try {
    return await write();
  } catch (err) {
    console.error(
      `queue: unit ${unit.unit} key ${message.key}: store write failed:`,
      err,
    );
    return null;
  }
}

/**
 * Handle one queue message end to end and return what was decided:
 * {action, delaySeconds?, results}. Calls exactly one of ack() or retry().
 */
export async function handleMessage(queueMessage, env, deps) {
  const settings = deps.settings ?? consumerSettings(env);
  const attempts = queueMessage.attempts ?? 1;

  // A unit this Worker cannot read will never become readable: drop it
  // without a report, as the schema asks for unknown versions.
  let unit;
  try {
    const body =
      typeof queueMessage.body === "string"
        ? JSON.parse(queueMessage.body)
        : queueMessage.body;
    unit = validateUnit(body, "queue message");
  } catch (err) {
    console.error(
      `queue: dropping message ${queueMessage.id}:`,
      err?.message ?? err,
    );
    queueMessage.ack();
    return { action: "ack", results: [] };
  }

  let outcome;
  try {
    outcome = await processUnit(unit, { ...deps, attempts, settings });
  } catch (err) {
    // Claims of anything possibly sent stay "sending", so this retry cannot
    // resend them.
    console.error(`queue: unit ${unit.unit} failed:`, err);
    outcome = {
      results: [],
      pending: { code: "InternalError", error: String(err) },
    };
  }

  const decision = decide(outcome, attempts, settings);
  if (decision.action === "ack") {
    queueMessage.ack();
  } else {
    queueMessage.retry({ delaySeconds: decision.delaySeconds });
  }

  if (unit.callback && outcome.results.length > 0) {
    await (deps.report ?? postReport)(
      unit.callback,
      buildReport(unit, outcome.results),
      env,
      { fetchImpl: deps.fetchImpl },
    );
  }
  return { ...decision, results: outcome.results };
}

/** The Worker's queue() handler body: each message decided on its own. */
export async function handleBatch(batch, env, overrides = {}) {
  const fetchImpl = overrides.fetchImpl ?? ((...args) => fetch(...args));
  let deps;
  try {
    const client = sesClient(env);
    const endpoint = sesEndpoint(env);
    deps = {
      store: overrides.store ?? new D1IdempotencyStore(env.IDEMPOTENCY_DB),
      send:
        overrides.send ??
        ((unit, message) =>
          sendEmail({ client, endpoint, unit, message, fetchImpl })),
      now: overrides.now ?? (() => Date.now()),
      fetchImpl,
      report: overrides.report,
      settings: consumerSettings(env),
    };
  } catch (err) {
    // Misconfiguration: nothing was sent; retry each message with backoff so
    // a fixed deployment picks them up.
    console.error("queue: cannot start:", err);
    const settings = consumerSettings(env);
    for (const message of batch.messages) {
      message.retry({
        delaySeconds: backoffSeconds(message.attempts ?? 1, settings),
      });
    }
    return;
  }

  for (const message of batch.messages) {
    await handleMessage(message, env, deps);
  }
}
