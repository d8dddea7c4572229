import assert from "node:assert/strict";
import { test } from "node:test";

import { parseSecrets, signHeaders, verifyHeaders } from "../src/signature.js";

const SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const OTHER =
  "whsec_" + Buffer.from("another key of 32 bytes.........").toString("base64");
const NOW = 1_700_000_000;
const BODY = '{"v":1,"job":1}';

async function signed(secrets, { now = NOW, body = BODY } = {}) {
  return new Headers(
    await signHeaders(parseSecrets(secrets), "msg_1", body, now),
  );
}

test("Standard Webhooks reference vector", async () => {
  // From the Standard Webhooks specification's test suite.
  const headers = await signHeaders(
    parseSecrets(SECRET),
    "msg_p5jXN8AQM9LWM0D4loKWxJek",
    '{"test": 2432232314}',
    1614265330,
  );
  assert.equal(
    headers["webhook-signature"],
    "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
  );
});

test("a valid signature is accepted", async () => {
  const headers = await signed(SECRET);
  const result = await verifyHeaders(
    parseSecrets(SECRET),
    headers,
    BODY,
    NOW + 10,
  );
  assert.deepEqual(result, { ok: true, id: "msg_1" });
});

test("bytes and text bodies sign the same", async () => {
  const headers = await signed(SECRET);
  const bytes = new TextEncoder().encode(BODY);
  const result = await verifyHeaders(parseSecrets(SECRET), headers, bytes, NOW);
  assert.equal(result.ok, true);
});

test("a wrong secret is refused with 403", async () => {
  const headers = await signed(OTHER);
  const result = await verifyHeaders(parseSecrets(SECRET), headers, BODY, NOW);
  assert.equal(result.ok, false);
  assert.equal(result.status, 403);
  assert.equal(result.error, "bad_signature");
});

test("a changed body is refused", async () => {
  const headers = await signed(SECRET);
  const result = await verifyHeaders(
    parseSecrets(SECRET),
    headers,
    BODY + " ",
    NOW,
  );
  assert.equal(result.error, "bad_signature");
});

test("a timestamp more than 5 minutes away is refused", async () => {
  const keys = parseSecrets(SECRET);
  const headers = await signed(SECRET);

  assert.equal((await verifyHeaders(keys, headers, BODY, NOW + 300)).ok, true);
  assert.equal((await verifyHeaders(keys, headers, BODY, NOW - 300)).ok, true);
  const late = await verifyHeaders(keys, headers, BODY, NOW + 301);
  assert.deepEqual([late.status, late.error], [403, "stale_timestamp"]);
  const early = await verifyHeaders(keys, headers, BODY, NOW - 301);
  assert.equal(early.error, "stale_timestamp");
});

test("missing headers are refused with 401", async () => {
  const result = await verifyHeaders(
    parseSecrets(SECRET),
    new Headers(),
    BODY,
    NOW,
  );
  assert.deepEqual([result.status, result.error], [401, "missing_signature"]);
});

test("rotation: any signature against any configured secret", async () => {
  // The sender still signs with the old secret; the Worker lists both.
  const oldOnly = await signed(SECRET);
  const both = parseSecrets(`${OTHER} ${SECRET}`);
  assert.equal((await verifyHeaders(both, oldOnly, BODY, NOW)).ok, true);

  // The sender signs with both; the Worker already dropped the old one.
  const twoSignatures = await signed(`${SECRET} ${OTHER}`);
  assert.equal(twoSignatures.get("webhook-signature").split(" ").length, 2);
  const newOnly = parseSecrets(OTHER);
  assert.equal(
    (await verifyHeaders(newOnly, twoSignatures, BODY, NOW)).ok,
    true,
  );
});

test("garbage signatures are skipped, not fatal", async () => {
  const headers = await signed(SECRET);
  headers.set(
    "webhook-signature",
    `v1,%%% v2,abc ${headers.get("webhook-signature")}`,
  );
  const result = await verifyHeaders(parseSecrets(SECRET), headers, BODY, NOW);
  assert.equal(result.ok, true);
});

test("parseSecrets accepts a space-separated list, prefix optional", () => {
  const keys = parseSecrets(`  ${SECRET}   ${OTHER.slice(6)} `);
  assert.equal(keys.length, 2);
  assert.equal(keys[1].length, 32);
  assert.deepEqual(parseSecrets(undefined), []);
  assert.throws(
    () => parseSecrets("whsec_not*base64"),
    /Secret #1 is not "whsec_"/,
  );
});
