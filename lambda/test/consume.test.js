import assert from "node:assert/strict";
import { test } from "node:test";

import {
  backoffSeconds,
  consumerSettings,
  decide,
  handleBatch,
  handleMessage,
} from "../src/consume.js";

const SETTINGS = consumerSettings({
  RETRY_BASE_SECONDS: "5",
  MAX_ATTEMPTS: "4",
});
const NOW = 1_700_000_000_000;

/** In-memory stand-in for D1IdempotencyStore, same semantics. */
class FakeStore {
  rows = new Map();
  async claim(key) {
    const row = this.rows.get(key);
    if (row) return { claimed: false, row: { ...row } };
    const token = `t-${key}-${Math.random()}`;
    this.rows.set(key, { key, status: "sending", token, claimed_at: NOW });
    return { claimed: true, token };
  }
  #finish(key, token, fields) {
    const row = this.rows.get(key);
    if (!row || row.token !== token || row.status !== "sending") return false;
    Object.assign(row, fields);
    return true;
  }
  async markSent(key, token, messageId) {
    return this.#finish(key, token, { status: "sent", message_id: messageId });
  }
  async markFailed(key, token, errorCode, error) {
    return this.#finish(key, token, {
      status: "failed",
      error_code: errorCode,
      error,
    });
  }
  async release(key, token) {
    const row = this.rows.get(key);
    if (row && row.token === token && row.status === "sending")
      this.rows.delete(key);
  }
}

function unit(rids = [1, 2, 3]) {
  return {
    v: 1,
    job: 7,
    batch: 8,
    unit: "7-8-0",
    callback: "http://127.0.0.1:9/report",
    configuration_set: null,
    messages: rids.map((rid) => ({
      rid,
      key: `cm-7-${rid}-1`,
      to: [`r${rid}@example.com`],
      from: "n@example.com",
      raw: "QQ==",
    })),
  };
}

function queueMessage(body, attempts = 1) {
  return {
    id: `msg-${Math.random()}`,
    body,
    attempts,
    calls: [],
    ack() {
      this.calls.push(["ack"]);
    },
    retry(options) {
      this.calls.push(["retry", options]);
    },
  };
}

/** A send() that answers from a script keyed by rid, else "sent". */
function scriptedSend(script = {}) {
  const calls = [];
  const send = async (_unit, message) => {
    calls.push(message.rid);
    const next = script[message.rid]?.shift();
    return (
      next ?? { kind: "sent", messageId: `ses-${message.rid}-${calls.length}` }
    );
  };
  return { calls, send };
}

const THROTTLED = {
  kind: "retry",
  code: "TooManyRequestsException",
  error: "slow down",
  throttled: true,
};

function deps(store, send, reports = []) {
  return {
    store,
    send,
    now: () => NOW,
    settings: SETTINGS,
    report: async (callback, report) => {
      reports.push({ callback, report });
      return true;
    },
  };
}

test("backoff doubles from the base and is capped", () => {
  assert.deepEqual(
    [1, 2, 3, 4, 5].map((a) => backoffSeconds(a, SETTINGS)),
    [5, 10, 20, 40, 80],
  );
  assert.equal(backoffSeconds(30, SETTINGS), 3600);
  const capped = consumerSettings({ RETRY_MAX_SECONDS: "999999" });
  assert.equal(capped.retryMaxSeconds, 86400);
});

test("decide: ack when nothing is pending, else retry with backoff", () => {
  assert.deepEqual(decide({ pending: null }, 3, SETTINGS), { action: "ack" });
  assert.deepEqual(decide({ pending: { code: "X" } }, 2, SETTINGS), {
    action: "retry",
    delaySeconds: 10,
  });
  assert.deepEqual(
    decide({ pending: { code: "InProgress", retryAfter: 90 } }, 1, SETTINGS),
    { action: "retry", delaySeconds: 90 },
  );
});

test("every recipient sent: ack and one report", async () => {
  const store = new FakeStore();
  const { calls, send } = scriptedSend();
  const reports = [];
  const message = queueMessage(unit());

  const decision = await handleMessage(message, {}, deps(store, send, reports));

  assert.deepEqual(message.calls, [["ack"]]);
  assert.equal(decision.action, "ack");
  assert.deepEqual(calls, [1, 2, 3]);
  assert.equal(reports.length, 1);
  assert.equal(reports[0].callback, "http://127.0.0.1:9/report");
  assert.deepEqual(
    reports[0].report.results.map((r) => [r.rid, r.status, r.message_id]),
    [
      [1, "sent", "ses-1-1"],
      [2, "sent", "ses-2-2"],
      [3, "sent", "ses-3-3"],
    ],
  );
  assert.equal(reports[0].report.source, "worker");
  assert.match(reports[0].report.id, /^rep_[0-9a-f]{32}$/);
  assert.equal(store.rows.get("cm-7-2-1").status, "sent");
});

test("throttled: retry sends exactly the recipients not yet accepted", async () => {
  const store = new FakeStore();
  const { calls, send } = scriptedSend({ 2: [THROTTLED] });
  const reports = [];

  // First delivery: 1 sent, 2 throttled, 3 not tried.
  const first = queueMessage(unit(), 1);
  await handleMessage(first, {}, deps(store, send, reports));
  assert.deepEqual(first.calls, [["retry", { delaySeconds: 5 }]]);
  assert.deepEqual(calls, [1, 2]);
  assert.equal(store.rows.has("cm-7-2-1"), false, "claim released");
  assert.equal(store.rows.has("cm-7-3-1"), false);
  assert.deepEqual(
    reports[0].report.results.map((r) => r.rid),
    [1],
  );

  // Redelivery: 1 is re-reported from the store, 2 and 3 are sent.
  const second = queueMessage(unit(), 2);
  await handleMessage(second, {}, deps(store, send, reports));
  assert.deepEqual(second.calls, [["ack"]]);
  assert.deepEqual(calls, [1, 2, 2, 3]);
  assert.deepEqual(
    reports[1].report.results.map((r) => [r.rid, r.status, r.message_id]),
    [
      [1, "sent", "ses-1-1"],
      [2, "sent", "ses-2-3"],
      [3, "sent", "ses-3-4"],
    ],
  );
  assert.notEqual(reports[0].report.id, reports[1].report.id);
});

test("a throttled first recipient: retry, no report yet", async () => {
  const store = new FakeStore();
  const { send } = scriptedSend({ 1: [THROTTLED] });
  const reports = [];
  const message = queueMessage(unit(), 3);
  await handleMessage(message, {}, deps(store, send, reports));
  assert.deepEqual(message.calls, [["retry", { delaySeconds: 20 }]]);
  assert.equal(reports.length, 0);
});

test("a permanent rejection fails that recipient only", async () => {
  const store = new FakeStore();
  const rejected = {
    kind: "failed",
    code: "MessageRejected",
    error: "Email address is not verified.",
  };
  const { calls, send } = scriptedSend({ 2: [rejected] });
  const reports = [];
  const message = queueMessage(unit());

  await handleMessage(message, {}, deps(store, send, reports));

  assert.deepEqual(message.calls, [["ack"]]);
  assert.deepEqual(calls, [1, 2, 3]);
  assert.deepEqual(reports[0].report.results[1], {
    rid: 2,
    key: "cm-7-2-1",
    status: "failed",
    message_id: null,
    error_code: "MessageRejected",
    error: "Email address is not verified.",
  });
  assert.equal(reports[0].report.results[2].status, "sent");
});

test("a 5xx is transient and retried", async () => {
  const store = new FakeStore();
  const { send } = scriptedSend({
    1: [{ kind: "retry", code: "HTTP503", error: "x", throttled: false }],
  });
  const message = queueMessage(unit([1]), 2);
  await handleMessage(message, {}, deps(store, send));
  assert.deepEqual(message.calls, [["retry", { delaySeconds: 10 }]]);
  assert.equal(store.rows.size, 0);
});

test("at MAX_ATTEMPTS a retryable error becomes a final failure", async () => {
  const store = new FakeStore();
  const { send } = scriptedSend({ 1: [THROTTLED] });
  const reports = [];
  const message = queueMessage(unit([1]), 4);

  await handleMessage(message, {}, deps(store, send, reports));

  assert.deepEqual(message.calls, [["ack"]]);
  const [result] = reports[0].report.results;
  assert.equal(result.status, "failed");
  assert.equal(result.error_code, "TooManyRequestsException");
  assert.equal(result.error, "Gave up after 4 attempts: slow down");
  assert.equal(store.rows.get("cm-7-1-1").status, "failed");
});

test("a stale 'sending' claim is AmbiguousSend and is not sent", async () => {
  const store = new FakeStore();
  store.rows.set("cm-7-1-1", {
    key: "cm-7-1-1",
    status: "sending",
    token: "old",
    claimed_at: NOW - 121_000,
  });
  const { calls, send } = scriptedSend();
  const reports = [];
  const message = queueMessage(unit([1, 2]), 2);

  await handleMessage(message, {}, deps(store, send, reports));

  assert.deepEqual(message.calls, [["ack"]]);
  assert.deepEqual(calls, [2]);
  const [ambiguous] = reports[0].report.results;
  assert.equal(ambiguous.status, "failed");
  assert.equal(ambiguous.error_code, "AmbiguousSend");
  assert.equal(store.rows.get("cm-7-1-1").error_code, "AmbiguousSend");
});

test("a fresh 'sending' claim (another invocation) waits for its lease", async () => {
  const store = new FakeStore();
  store.rows.set("cm-7-1-1", {
    key: "cm-7-1-1",
    status: "sending",
    token: "other",
    claimed_at: NOW - 30_000,
  });
  const { calls, send } = scriptedSend();
  const message = queueMessage(unit([1]), 1);

  await handleMessage(message, {}, deps(store, send));

  assert.deepEqual(message.calls, [["retry", { delaySeconds: 90 }]]);
  assert.deepEqual(calls, []);
  assert.equal(store.rows.get("cm-7-1-1").status, "sending");
});

test("a failed sent-record keeps the claim, so it is never resent", async () => {
  const store = new FakeStore();
  store.markSent = async () => {
    throw new Error("D1 down");
  };
  const { send } = scriptedSend();
  const reports = [];
  const message = queueMessage(unit([1]));

  await handleMessage(message, {}, deps(store, send, reports));

  assert.deepEqual(message.calls, [["ack"]]);
  assert.equal(reports[0].report.results[0].status, "sent");
  assert.equal(store.rows.get("cm-7-1-1").status, "sending");
});

test("the store being down sends nothing and retries", async () => {
  const store = new FakeStore();
  store.claim = async () => {
    throw new Error("D1 down");
  };
  const { calls, send } = scriptedSend();
  const message = queueMessage(unit(), 1);
  await handleMessage(message, {}, deps(store, send));
  assert.deepEqual(message.calls, [["retry", { delaySeconds: 5 }]]);
  assert.deepEqual(calls, []);
});

test("an unknown version is acked, not sent, not reported", async () => {
  const store = new FakeStore();
  const { calls, send } = scriptedSend();
  const reports = [];
  const message = queueMessage({ ...unit(), v: 2 });
  await handleMessage(message, {}, deps(store, send, reports));
  assert.deepEqual(message.calls, [["ack"]]);
  assert.deepEqual([calls.length, reports.length], [0, 0]);
});

test("no callback, no report", async () => {
  const reports = [];
  const message = queueMessage({ ...unit(), callback: null });
  await handleMessage(
    message,
    {},
    deps(new FakeStore(), scriptedSend().send, reports),
  );
  assert.deepEqual(message.calls, [["ack"]]);
  assert.equal(reports.length, 0);
});

test("handleBatch decides per message and never retries the whole batch", async () => {
  const store = new FakeStore();
  const { send } = scriptedSend({ 1: [THROTTLED] });
  const throttled = queueMessage(unit([1]), 1);
  const other = { ...unit([2]), unit: "7-8-1" };
  const fine = queueMessage(other, 1);
  const batch = {
    messages: [throttled, fine],
    retryAll() {
      throw new Error("retryAll must not be called");
    },
    ackAll() {
      throw new Error("ackAll must not be called");
    },
  };
  const env = {
    AWS_REGION: "us-east-1",
    AWS_ACCESS_KEY_ID: "a",
    AWS_SECRET_ACCESS_KEY: "b",
    RETRY_BASE_SECONDS: "5",
  };

  await handleBatch(batch, env, { store, send, report: async () => true });

  assert.deepEqual(throttled.calls, [["retry", { delaySeconds: 5 }]]);
  assert.deepEqual(fine.calls, [["ack"]]);
});

test("handleBatch without credentials retries every message, sends nothing", async () => {
  const message = queueMessage(unit(), 2);
  await handleBatch({ messages: [message] }, { RETRY_BASE_SECONDS: "5" });
  assert.deepEqual(message.calls, [["retry", { delaySeconds: 10 }]]);
});
