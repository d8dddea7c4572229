import assert from "node:assert/strict";
import { test } from "node:test";

import {
  classifyError,
  sendEmail,
  sesClient,
  sesEndpoint,
} from "../src/ses.js";

const ENV = {
  AWS_REGION: "eu-west-1",
  AWS_ACCESS_KEY_ID: "AKIDEXAMPLE",
  AWS_SECRET_ACCESS_KEY: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
};
const UNIT = {
  v: 1,
  job: 123,
  batch: 45,
  unit: "123-45-0",
  callback: null,
  configuration_set: "cloudmail-events",
};
const MESSAGE = {
  rid: 1001,
  key: "cm-123-1001-1",
  to: ["alice@example.com"],
  from: "News <news@example.com>",
  raw: "RnJvbTogYQ0KDQpiDQo=",
};

function fakeFetch(status, body, headers = {}) {
  const calls = [];
  const impl = async (request) => {
    calls.push({ request, body: await request.clone().text() });
    return new Response(
      typeof body === "string" ? body : JSON.stringify(body),
      { status, headers },
    );
  };
  return { calls, impl };
}

async function send(fetchImpl, env = ENV, unit = UNIT) {
  return sendEmail({
    client: sesClient(env),
    endpoint: sesEndpoint(env),
    unit,
    message: MESSAGE,
    fetchImpl,
  });
}

test("the SendEmail request is SES v2's, SigV4-signed", async () => {
  const { calls, impl } = fakeFetch(200, { MessageId: "0100018c-abc" });
  const outcome = await send(impl);

  assert.deepEqual(outcome, { kind: "sent", messageId: "0100018c-abc" });
  assert.equal(calls.length, 1);
  const { request, body } = calls[0];
  assert.equal(request.method, "POST");
  assert.equal(
    request.url,
    "https://email.eu-west-1.amazonaws.com/v2/email/outbound-emails",
  );
  assert.equal(request.headers.get("content-type"), "application/json");
  assert.match(
    request.headers.get("authorization"),
    /^AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE\/\d{8}\/eu-west-1\/ses\/aws4_request, SignedHeaders=[a-z0-9;-]*host[a-z0-9;-]*, Signature=[0-9a-f]{64}$/,
  );
  assert.match(request.headers.get("x-amz-date"), /^\d{8}T\d{6}Z$/);
  assert.deepEqual(JSON.parse(body), {
    Destination: { ToAddresses: ["alice@example.com"] },
    Content: { Raw: { Data: "RnJvbTogYQ0KDQpiDQo=" } },
    EmailTags: [
      { Name: "cloudmail-job", Value: "123" },
      { Name: "cloudmail-batch", Value: "45" },
      { Name: "cloudmail-recipient", Value: "1001" },
    ],
    ConfigurationSetName: "cloudmail-events",
  });
});

test("SES_ENDPOINT may be plain-http loopback; no configuration set, no field", async () => {
  const { calls, impl } = fakeFetch(200, { MessageId: "m-1" });
  const env = {
    ...ENV,
    SES_ENDPOINT: "http://127.0.0.1:5000/",
    AWS_SESSION_TOKEN: "tok",
  };
  await send(impl, env, { ...UNIT, configuration_set: null });

  const { request, body } = calls[0];
  assert.equal(request.url, "http://127.0.0.1:5000/v2/email/outbound-emails");
  assert.match(
    request.headers.get("authorization"),
    /\/eu-west-1\/ses\/aws4_request/,
  );
  assert.equal(request.headers.get("x-amz-security-token"), "tok");
  assert.equal("ConfigurationSetName" in JSON.parse(body), false);
});

test("throttling is retried", async () => {
  const json = {
    "x-amzn-ErrorType": "TooManyRequestsException:http://internal.amazon.com/",
  };
  const { impl } = fakeFetch(429, { message: "Too many requests" }, json);
  assert.deepEqual(await send(impl), {
    kind: "retry",
    code: "TooManyRequestsException",
    error: "Too many requests",
    throttled: true,
  });

  const rate = classifyError(
    400,
    new Headers(),
    JSON.stringify({ message: "Maximum sending rate exceeded." }),
  );
  assert.equal(rate.kind, "retry");
  assert.equal(rate.throttled, true);
});

test("a permanent rejection fails that recipient", async () => {
  const { impl } = fakeFetch(
    400,
    { message: "Email address is not verified." },
    { "x-amzn-ErrorType": "MessageRejected" },
  );
  assert.deepEqual(await send(impl), {
    kind: "failed",
    code: "MessageRejected",
    error: "Email address is not verified.",
  });
  const bad = classifyError(
    400,
    new Headers(),
    JSON.stringify({ __type: "BadRequestException", message: "x" }),
  );
  assert.deepEqual(bad, {
    kind: "failed",
    code: "BadRequestException",
    error: "x",
  });
});

test("query-API XML errors are read too", () => {
  const xml =
    "<ErrorResponse><Error><Code>MessageRejected</Code><Message>Did not have authority</Message></Error></ErrorResponse>";
  assert.deepEqual(classifyError(400, new Headers(), xml), {
    kind: "failed",
    code: "MessageRejected",
    error: "Did not have authority",
  });
});

test("5xx and network errors are transient", async () => {
  const { impl } = fakeFetch(503, "Service Unavailable");
  assert.deepEqual(await send(impl), {
    kind: "retry",
    code: "HTTP503",
    error: "HTTP 503",
    throttled: false,
  });

  const outcome = await send(async () => {
    throw new TypeError("fetch failed");
  });
  assert.deepEqual(outcome, {
    kind: "retry",
    code: "NetworkError",
    error: "fetch failed",
    throttled: false,
  });
});

test("no answer in time is ambiguous: failed, never resent", async () => {
  const outcome = await send(async () => {
    throw new DOMException("The operation was aborted due to timeout", "TimeoutError");
  });
  assert.equal(outcome.kind, "failed");
  assert.equal(outcome.code, "AmbiguousSend");
  assert.match(outcome.error, /may have been sent, so it is not sent again/);
});

test("a 2xx without a MessageId still counts as sent", async () => {
  const { impl } = fakeFetch(200, "not json");
  assert.deepEqual(await send(impl), { kind: "sent", messageId: null });
});

test("configuration errors name the setting", () => {
  assert.throws(() => sesEndpoint({}), /AWS_REGION is not set/);
  assert.throws(
    () => sesClient({ AWS_REGION: "x" }),
    /AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY/,
  );
});
