import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import { test } from "node:test";

import { buildReport, postReport } from "../src/report.js";

const KEY = Buffer.from("report key bytes, thirty-two ...");
const ENV = { CLOUDMAIL_REPORT_SECRET: `whsec_${KEY.toString("base64")}` };
const UNIT = { job: 1, batch: 2, unit: "1-2-0" };
const RESULTS = [
  {
    rid: 5,
    key: "cm-1-5-1",
    status: "sent",
    message_id: "m",
    error_code: null,
    error: null,
  },
];

function fakeCallback(statuses) {
  const calls = [];
  const fetchImpl = async (url, init) => {
    calls.push({ url, ...init });
    return new Response("", { status: statuses[calls.length - 1] ?? 200 });
  };
  return { calls, fetchImpl };
}

const noSleep = async () => {};

test("the report is v1 and signed per Standard Webhooks", async () => {
  const report = buildReport(UNIT, RESULTS);
  const { calls, fetchImpl } = fakeCallback([204]);

  assert.equal(
    await postReport("https://cb.example/r", report, ENV, { fetchImpl }),
    true,
  );

  const { url, method, headers, body } = calls[0];
  assert.deepEqual([url, method], ["https://cb.example/r", "POST"]);
  assert.deepEqual(JSON.parse(body), {
    v: 1,
    id: report.id,
    source: "worker",
    job: 1,
    batch: 2,
    unit: "1-2-0",
    results: RESULTS,
  });
  assert.equal(headers["webhook-id"], report.id);
  const expected = createHmac("sha256", KEY)
    .update(`${report.id}.${headers["webhook-timestamp"]}.${body}`)
    .digest("base64");
  assert.equal(headers["webhook-signature"], `v1,${expected}`);
  assert.ok(
    Math.abs(Number(headers["webhook-timestamp"]) - Date.now() / 1000) < 5,
  );
});

test("5xx and network errors are retried with the same report id", async () => {
  const report = buildReport(UNIT, RESULTS);
  let n = 0;
  const ids = [];
  const fetchImpl = async (_url, init) => {
    ids.push(init.headers["webhook-id"]);
    n += 1;
    if (n === 1) throw new TypeError("connection refused");
    return new Response("", { status: n === 2 ? 503 : 200 });
  };
  assert.equal(
    await postReport("https://cb.example/r", report, ENV, {
      fetchImpl,
      sleep: noSleep,
    }),
    true,
  );
  assert.deepEqual(ids, [report.id, report.id, report.id]);
});

test("a 4xx is not retried; a failed report returns false", async () => {
  const { calls, fetchImpl } = fakeCallback([403, 200]);
  const ok = await postReport(
    "https://cb.example/r",
    buildReport(UNIT, RESULTS),
    ENV,
    { fetchImpl, sleep: noSleep },
  );
  assert.equal(ok, false);
  assert.equal(calls.length, 1);
});

test("at most three attempts", async () => {
  const { calls, fetchImpl } = fakeCallback([500, 500, 500, 200]);
  const ok = await postReport(
    "https://cb.example/r",
    buildReport(UNIT, RESULTS),
    ENV,
    { fetchImpl, sleep: noSleep },
  );
  assert.equal(ok, false);
  assert.equal(calls.length, 3);
});

test("without a report secret nothing is posted", async () => {
  const { calls, fetchImpl } = fakeCallback([200]);
  assert.equal(
    await postReport(
      "https://cb.example/r",
      buildReport(UNIT, RESULTS),
      {},
      { fetchImpl },
    ),
    false,
  );
  assert.equal(calls.length, 0);
});
