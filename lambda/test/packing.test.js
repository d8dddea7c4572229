import assert from "node:assert/strict";
import { test } from "node:test";

import {
  QUEUE_METADATA_BYTES,
  SEND_BATCH_MAX_BYTES,
  SEND_BATCH_MAX_MESSAGES,
} from "../src/limits.js";
import { planSendBatches } from "../src/packing.js";
import { unitByteLength } from "../src/validate.js";

function unit(n, rawLength = 8) {
  return {
    v: 1,
    job: 1,
    batch: 2,
    unit: `1-2-${n}`,
    callback: null,
    configuration_set: null,
    messages: [
      {
        rid: n,
        key: `cm-1-${n}-1`,
        to: ["a@example.com"],
        from: "a@example.com",
        raw: "A".repeat(rawLength),
      },
    ],
  };
}

function callBytes(call) {
  return call.reduce(
    (sum, m) => sum + unitByteLength(m.body) + QUEUE_METADATA_BYTES,
    0,
  );
}

test("small units are split by message count, in order", () => {
  const units = Array.from({ length: 250 }, (_, n) => unit(n));
  const calls = planSendBatches(units);

  assert.deepEqual(
    calls.map((c) => c.length),
    [100, 100, 50],
  );
  assert.deepEqual(
    calls.flat().map((m) => m.body),
    units,
  );
  assert.ok(calls.flat().every((m) => m.contentType === "json"));
});

test("large units are split by total bytes", () => {
  const units = Array.from({ length: 5 }, (_, n) => unit(n, 100_000));
  const calls = planSendBatches(units);

  // Two ~100 KB units fit in 256 KB, three do not.
  assert.deepEqual(
    calls.map((c) => c.length),
    [2, 2, 1],
  );
  for (const call of calls) {
    assert.ok(call.length <= SEND_BATCH_MAX_MESSAGES);
    assert.ok(callBytes(call) <= SEND_BATCH_MAX_BYTES);
  }
});

test("the byte limit counts each message's metadata", () => {
  const size = unitByteLength(unit(0, 1000)) + QUEUE_METADATA_BYTES;
  const limits = { maxBytes: size * 3, maxMessages: 100 };
  const calls = planSendBatches(
    Array.from({ length: 7 }, (_, n) => unit(n, 1000)),
    limits,
  );
  assert.deepEqual(
    calls.map((c) => c.length),
    [3, 3, 1],
  );
});

test("no units, no calls", () => {
  assert.deepEqual(planSendBatches([]), []);
});
