// POST /enqueue: authenticate (Standard Webhooks), validate, pack the units
// into sendBatch calls under the Queue's limits, and answer 202 with counts.

import { MAX_ENQUEUE_BYTES } from "./limits.js";
import { planSendBatches } from "./packing.js";
import { parseSecrets, verifyHeaders } from "./signature.js";
import { parseEnqueue, ValidationError } from "./validate.js";

export function jsonResponse(status, body) {
  return new Response(JSON.stringify(body), {
    status,
    headers: { "content-type": "application/json" },
  });
}

function refuse(status, error, reason) {
  return jsonResponse(status, { error, reason });
}

export async function handleEnqueue(request, env, { nowSeconds } = {}) {
  // 1. Configuration: without a key nothing can be authenticated.
  let keys;
  try {
    keys = parseSecrets(env.CLOUDMAIL_ENQUEUE_SECRET);
  } catch (err) {
    console.error("enqueue: CLOUDMAIL_ENQUEUE_SECRET:", err);
    keys = [];
  }
  if (keys.length === 0 || !env.EMAIL_QUEUE) {
    console.error(
      "enqueue: CLOUDMAIL_ENQUEUE_SECRET or EMAIL_QUEUE is missing",
    );
    return refuse(
      500,
      "misconfigured",
      "The Worker is missing its enqueue " +
        "secret or queue binding; see WORKER.md.",
    );
  }

  // 2. Size, then the signature over the exact bytes received.
  const declared = Number(request.headers.get("content-length") ?? 0);
  if (declared > MAX_ENQUEUE_BYTES) return tooLarge();
  const body = new Uint8Array(await request.arrayBuffer());
  if (body.length > MAX_ENQUEUE_BYTES) return tooLarge();

  const check = await verifyHeaders(keys, request.headers, body, nowSeconds);
  if (!check.ok) return refuse(check.status, check.error, check.reason);

  // 3. Shape.
  let parsed;
  try {
    const text = new TextDecoder("utf-8", { fatal: true }).decode(body);
    parsed = parseEnqueue(text);
  } catch (err) {
    if (err instanceof ValidationError)
      return refuse(err.status, err.error, err.message);
    return refuse(400, "malformed", "The body is not UTF-8 text.");
  }

  // 4. Enqueue, in as many sendBatch calls as the limits need.
  const calls = planSendBatches(parsed.units);
  let enqueued = 0;
  for (const call of calls) {
    try {
      await env.EMAIL_QUEUE.sendBatch(call);
    } catch (err) {
      console.error(
        `enqueue: job ${parsed.job} batch ${parsed.batch}: sendBatch:`,
        err,
      );
      // Units already enqueued are safe to enqueue again: the consumer sends
      // at most once per idempotency key.
      return jsonResponse(503, {
        error: "queue_unavailable",
        reason: "The queue refused the units; send the same request again.",
        enqueued_units: enqueued,
      });
    }
    enqueued += call.length;
  }

  return jsonResponse(202, {
    v: 1,
    job: parsed.job,
    batch: parsed.batch,
    units: parsed.units.length,
    messages: parsed.units.reduce((sum, unit) => sum + unit.messages.length, 0),
    queue_calls: calls.length,
  });
}

function tooLarge() {
  return refuse(
    413,
    "request_too_large",
    `The body exceeds ${MAX_ENQUEUE_BYTES} ` +
      "bytes; split the batch over several /enqueue requests.",
  );
}
