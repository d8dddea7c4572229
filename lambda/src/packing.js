// Split accepted units into sendBatch calls that stay under the Queue's
// per-call limits (see limits.js).

import {
  QUEUE_METADATA_BYTES,
  SEND_BATCH_MAX_BYTES,
  SEND_BATCH_MAX_MESSAGES,
} from "./limits.js";
import { unitByteLength } from "./validate.js";

/**
 * Group `units` into arrays of sendBatch requests ({body, contentType}),
 * in order, each array at most SEND_BATCH_MAX_MESSAGES long and at most
 * SEND_BATCH_MAX_BYTES counting every message's ~100 bytes of metadata.
 * Units are sent as "json" so the stored size is exactly unitByteLength().
 */
export function planSendBatches(units, limits = {}) {
  const maxMessages = limits.maxMessages ?? SEND_BATCH_MAX_MESSAGES;
  const maxBytes = limits.maxBytes ?? SEND_BATCH_MAX_BYTES;
  const calls = [];
  let current = [];
  let currentBytes = 0;

  for (const unit of units) {
    const bytes = unitByteLength(unit) + QUEUE_METADATA_BYTES;
    const full =
      current.length >= maxMessages || currentBytes + bytes > maxBytes;

    if (full && current.length > 0) {
      calls.push(current);
      current = [];
      currentBytes = 0;
    }
    current.push({ body: unit, contentType: "json" });
    currentBytes += bytes;
  }

  if (current.length > 0) calls.push(current);
  return calls;
}
