// End to end in workerd: dev/serve.mjs runs the Worker with a real Queue and
// D1; a local HTTP server plays SES v2 and another receives the reports.

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createHmac, randomBytes } from "node:crypto";
import { once } from "node:events";
import { createServer } from "node:http";
import { dirname, join } from "node:path";
import { after, before, test } from "node:test";
import { fileURLToPath } from "node:url";

const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..");
const ENQUEUE_KEY = randomBytes(32);
const REPORT_KEY = randomBytes(32);
const RAW = Buffer.from(
  "From: news@example.com\r\nSubject: hi\r\n\r\nhello\r\n",
).toString("base64");

const ses = { requests: [], accepted: [], throttleOnce: new Set([1001, 2002]) };
const reports = [];
let sesServer;
let reportServer;
let worker;
let workerUrl;

function listen(handler) {
  const server = createServer(async (req, res) => {
    const chunks = [];
    for await (const chunk of req) chunks.push(chunk);
    handler(req, res, Buffer.concat(chunks).toString("utf8"));
  });
  server.listen(0, "127.0.0.1");
  return server;
}

function url(server) {
  return `http://127.0.0.1:${server.address().port}`;
}

function playSes(req, res, body) {
  const request = {
    method: req.method,
    path: req.url,
    authorization: req.headers.authorization,
    body: JSON.parse(body),
  };
  ses.requests.push(request);
  const rid = Number(
    request.body.EmailTags.find((t) => t.Name === "cloudmail-recipient").Value,
  );

  if (ses.throttleOnce.delete(rid)) {
    res.writeHead(429, {
      "content-type": "application/json",
      "x-amzn-ErrorType": "TooManyRequestsException",
    });
    res.end(JSON.stringify({ message: "Maximum sending rate exceeded." }));
    return;
  }
  const messageId = `ses-${ses.accepted.length + 1}`;
  ses.accepted.push({
    rid,
    messageId,
    to: request.body.Destination.ToAddresses,
  });
  res.writeHead(200, { "content-type": "application/json" });
  res.end(JSON.stringify({ MessageId: messageId }));
}

function receiveReport(req, res, body) {
  reports.push({ headers: req.headers, body });
  res.writeHead(204);
  res.end();
}

function sign(key, id, body, timestamp = Math.floor(Date.now() / 1000)) {
  const mac = createHmac("sha256", key)
    .update(`${id}.${timestamp}.${body}`)
    .digest("base64");
  return {
    "webhook-id": id,
    "webhook-timestamp": String(timestamp),
    "webhook-signature": `v1,${mac}`,
  };
}

function unit(job, n, rids) {
  return {
    v: 1,
    job,
    batch: 1,
    unit: `${job}-1-${n}`,
    callback: `${url(reportServer)}/cloudmail/callback/report`,
    configuration_set: "cloudmail-events",
    messages: rids.map((rid) => ({
      rid,
      key: `cm-${job}-${rid}-1`,
      to: [`r${rid}@example.com`],
      from: "News <news@example.com>",
      raw: RAW,
    })),
  };
}

async function enqueue(payload, { key = ENQUEUE_KEY, headers } = {}) {
  const body = typeof payload === "string" ? payload : JSON.stringify(payload);
  const response = await fetch(`${workerUrl}/enqueue`, {
    method: "POST",
    headers: {
      "content-type": "application/json",
      ...(headers ?? sign(key, `enq_${Date.now()}`, body)),
    },
    body,
  });
  return { status: response.status, body: await response.json() };
}

async function waitFor(condition, what, timeoutMs = 30_000) {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (condition()) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  assert.fail(`Timed out waiting for ${what}`);
}

function reportsFor(unitId) {
  return reports
    .map((r) => JSON.parse(r.body))
    .filter((r) => r.unit === unitId);
}

before(async () => {
  sesServer = listen(playSes);
  reportServer = listen(receiveReport);
  await Promise.all([
    once(sesServer, "listening"),
    once(reportServer, "listening"),
  ]);

  worker = spawn(
    process.execPath,
    [join(ROOT, "dev/serve.mjs"), "--port", "0"],
    {
      env: {
        ...process.env,
        AWS_REGION: "us-east-1",
        SES_ENDPOINT: url(sesServer),
        AWS_ACCESS_KEY_ID: "AKIDTEST",
        AWS_SECRET_ACCESS_KEY: "secret-test",
        CLOUDMAIL_ENQUEUE_SECRET: `whsec_${randomBytes(32).toString("base64")} whsec_${ENQUEUE_KEY.toString("base64")}`,
        CLOUDMAIL_REPORT_SECRET: `whsec_${REPORT_KEY.toString("base64")}`,
        RETRY_BASE_SECONDS: "1",
      },
      stdio: ["ignore", "pipe", "pipe"],
    },
  );
  let stderr = "";
  worker.stderr.on("data", (chunk) => {
    stderr += chunk;
  });
  workerUrl = await new Promise((resolve, reject) => {
    let out = "";
    worker.stdout.on("data", (chunk) => {
      out += chunk;
      const match = out.match(/^READY (http:\/\/127\.0\.0\.1:\d+)$/m);
      if (match) resolve(match[1]);
    });
    worker.on("exit", (code) =>
      reject(new Error(`serve.mjs exited ${code}: ${stderr}`)),
    );
  });
});

after(async () => {
  if (worker && worker.exitCode === null) {
    worker.kill("SIGTERM");
    await once(worker, "exit");
  }
  sesServer?.close();
  reportServer?.close();
});

test("GET /health", async () => {
  const response = await fetch(`${workerUrl}/health`);
  assert.equal(response.status, 200);
  assert.deepEqual(await response.json(), { ok: true });
});

test("/enqueue refuses unsigned, wrongly signed, stale, malformed and oversized", async () => {
  const payload = { v: 1, job: 9, batch: 1, units: [unit(9, 0, [9001])] };

  const unsigned = await enqueue(payload, { headers: {} });
  assert.deepEqual(
    [unsigned.status, unsigned.body.error],
    [401, "missing_signature"],
  );

  const wrong = await enqueue(payload, { key: randomBytes(32) });
  assert.deepEqual([wrong.status, wrong.body.error], [403, "bad_signature"]);

  const body = JSON.stringify(payload);
  const stale = await enqueue(body, {
    headers: sign(
      ENQUEUE_KEY,
      "enq_old",
      body,
      Math.floor(Date.now() / 1000) - 400,
    ),
  });
  assert.deepEqual([stale.status, stale.body.error], [403, "stale_timestamp"]);

  const malformed = await enqueue({
    ...payload,
    units: [{ ...unit(9, 0, [9001]), v: 2 }],
  });
  assert.equal(malformed.status, 400);
  assert.match(malformed.body.reason, /unknown version 2/);

  const big = unit(9, 0, [9001]);
  big.messages[0].raw = "A".repeat(130_000);
  const tooBig = await enqueue({ ...payload, units: [big] });
  assert.deepEqual([tooBig.status, tooBig.body.error], [413, "unit_too_large"]);

  assert.equal(
    ses.requests.filter((r) => r.body.EmailTags[0].Value === "9").length,
    0,
  );
});

test("3 recipients: the throttled one is retried, each sent once, reports signed", async () => {
  const accepted = await enqueue({
    v: 1,
    job: 1,
    batch: 1,
    units: [unit(1, 0, [1001, 1002, 1003])],
  });
  assert.equal(accepted.status, 202);
  assert.deepEqual(accepted.body, {
    v: 1,
    job: 1,
    batch: 1,
    units: 1,
    messages: 3,
    queue_calls: 1,
  });

  await waitFor(
    () => reportsFor("1-1-0").some((r) => r.results.length === 3),
    "the final report",
  );

  const forJob = ses.requests.filter((r) => r.body.EmailTags[0].Value === "1");
  assert.equal(forJob.length, 4, "3 sends + 1 throttled attempt");
  assert.deepEqual(
    ses.accepted
      .filter((a) => a.rid < 2000)
      .map((a) => a.rid)
      .sort(),
    [1001, 1002, 1003],
  );
  for (const request of forJob) {
    assert.equal(request.method, "POST");
    assert.equal(request.path, "/v2/email/outbound-emails");
    assert.match(
      request.authorization,
      /^AWS4-HMAC-SHA256 Credential=AKIDTEST\/\d{8}\/us-east-1\/ses\/aws4_request, /,
    );
    assert.equal(request.body.ConfigurationSetName, "cloudmail-events");
    assert.equal(request.body.Content.Raw.Data, RAW);
  }

  const final = reportsFor("1-1-0").at(-1);
  assert.equal(final.source, "worker");
  assert.deepEqual(
    final.results.map((r) => [r.rid, r.status]),
    [
      [1001, "sent"],
      [1002, "sent"],
      [1003, "sent"],
    ],
  );
  for (const result of final.results) {
    const sent = ses.accepted.find((a) => a.rid === result.rid);
    assert.equal(result.message_id, sent.messageId);
  }

  for (const { headers, body } of reports) {
    const expected = createHmac("sha256", REPORT_KEY)
      .update(
        `${headers["webhook-id"]}.${headers["webhook-timestamp"]}.${body}`,
      )
      .digest("base64");
    assert.equal(headers["webhook-signature"], `v1,${expected}`);
    assert.equal(headers["webhook-id"], JSON.parse(body).id);
  }
});

test("throttled mid-unit: accepted ones are re-reported, never resent", async () => {
  const accepted = await enqueue({
    v: 1,
    job: 2,
    batch: 1,
    units: [unit(2, 0, [2001, 2002, 2003])],
  });
  assert.equal(accepted.status, 202);

  await waitFor(
    () => reportsFor("2-1-0").some((r) => r.results.length === 3),
    "the final report",
  );

  const [first, second] = reportsFor("2-1-0");
  assert.deepEqual(
    first.results.map((r) => r.rid),
    [2001],
  );
  assert.deepEqual(
    second.results.map((r) => r.rid),
    [2001, 2002, 2003],
  );
  assert.equal(second.results[0].message_id, first.results[0].message_id);
  const sendsOf2001 = ses.requests.filter(
    (r) => r.body.Destination.ToAddresses[0] === "r2001@example.com",
  );
  assert.equal(sendsOf2001.length, 1);
});

test("enqueuing the same unit again sends nothing and re-reports", async () => {
  const before = ses.requests.length;
  const reportsBefore = reportsFor("1-1-0").length;
  const again = await enqueue({
    v: 1,
    job: 1,
    batch: 1,
    units: [unit(1, 0, [1001, 1002, 1003])],
  });
  assert.equal(again.status, 202);

  await waitFor(
    () => reportsFor("1-1-0").length > reportsBefore,
    "the repeat report",
  );
  assert.equal(ses.requests.length, before);
  const repeat = reportsFor("1-1-0").at(-1);
  assert.deepEqual(
    repeat.results.map((r) => r.status),
    ["sent", "sent", "sent"],
  );
});
