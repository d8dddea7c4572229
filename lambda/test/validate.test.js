import assert from "node:assert/strict";
import { test } from "node:test";

import { MAX_UNIT_BYTES } from "../src/limits.js";
import {
  parseEnqueue,
  unitByteLength,
  validateUnit,
  ValidationError,
} from "../src/validate.js";

const RAW = Buffer.from(
  "From: a@example.com\r\nSubject: hi\r\n\r\nbody\r\n",
).toString("base64");

function unit(overrides = {}) {
  return {
    v: 1,
    job: 123,
    batch: 45,
    unit: "123-45-0",
    callback: "https://host.example/cloudmail/callback/report",
    configuration_set: "cloudmail-events",
    messages: [
      {
        rid: 1001,
        key: "cm-123-1001-1",
        to: ["alice@example.com"],
        from: "News <news@example.com>",
        raw: RAW,
      },
    ],
    ...overrides,
  };
}

function enqueue(units, overrides = {}) {
  return JSON.stringify({ v: 1, job: 123, batch: 45, units, ...overrides });
}

function rejects(fn, pattern, status = 400) {
  assert.throws(fn, (err) => {
    assert.ok(err instanceof ValidationError, String(err));
    assert.equal(err.status, status);
    assert.match(err.message, pattern);
    return true;
  });
}

test("a documented unit passes and keeps only documented fields", () => {
  const checked = validateUnit({ ...unit(), extra: "dropped" });
  assert.deepEqual(checked, unit());
});

test("callback and configuration_set may be null or absent", () => {
  const { callback, configuration_set, ...rest } = unit();
  assert.equal(validateUnit(rest).callback, null);
  assert.equal(
    validateUnit(unit({ configuration_set: null })).configuration_set,
    null,
  );
});

test("an unknown version is refused", () => {
  rejects(() => validateUnit(unit({ v: 2 })), /unknown version 2/);
  assert.throws(() => validateUnit(unit({ v: 2 })), {
    error: "unknown_version",
  });
});

test("ids must follow the documented patterns", () => {
  rejects(
    () => validateUnit(unit({ unit: "123-46-0" })),
    /"unit" must be "123-45-<n>"/,
  );
  rejects(() => validateUnit(unit({ job: "123" })), /non-negative integers/);
  const badKey = unit();
  badKey.messages[0].key = "cm-123-1002-1";
  rejects(() => validateUnit(badKey), /"key" must be "cm-123-1001-<attempt>"/);
});

test("raw must be standard base64", () => {
  for (const raw of ["", "abc", "ab$=", "YWJj\nZA=="]) {
    const bad = unit();
    bad.messages[0].raw = raw;
    rejects(() => validateUnit(bad), /"raw" must be standard base64/);
  }
});

test("addresses must be ASCII and at most 50", () => {
  const unicode = unit();
  unicode.messages[0].to = ["élodie@example.com"];
  rejects(() => validateUnit(unicode), /ASCII address/);

  const many = unit();
  many.messages[0].to = Array.from(
    { length: 51 },
    (_, i) => `r${i}@example.com`,
  );
  rejects(() => validateUnit(many), /1 to 50 addresses/);
});

test("from must not carry line breaks", () => {
  const bad = unit();
  bad.messages[0].from = "a@example.com\r\nBcc: x@example.com";
  rejects(() => validateUnit(bad), /"from"/);
});

test("callback must be http(s)", () => {
  rejects(() => validateUnit(unit({ callback: "ftp://host/x" })), /"callback"/);
  rejects(() => validateUnit(unit({ callback: "/relative" })), /"callback"/);
});

test("a unit over the size limit is refused with 413", () => {
  const big = unit();
  big.messages[0].raw = "A".repeat(MAX_UNIT_BYTES);
  rejects(
    () => validateUnit(big),
    /bytes of JSON; a unit may use at most 127000/,
    413,
  );

  // Just under the limit passes.
  const fits = unit();
  fits.messages[0].raw = "";
  const room = MAX_UNIT_BYTES - unitByteLength(fits);
  fits.messages[0].raw = "A".repeat(room - (room % 4));
  assert.ok(unitByteLength(validateUnit(fits)) <= MAX_UNIT_BYTES);
});

test("parseEnqueue checks the envelope", () => {
  const parsed = parseEnqueue(
    enqueue([
      unit(),
      unit({
        unit: "123-45-1",
        messages: [
          {
            rid: 1002,
            key: "cm-123-1002-1",
            to: ["bob@example.com"],
            from: "n@example.com",
            raw: RAW,
          },
        ],
      }),
    ]),
  );
  assert.equal(parsed.units.length, 2);
  assert.deepEqual([parsed.job, parsed.batch], [123, 45]);

  rejects(() => parseEnqueue("{"), /not JSON/);
  rejects(() => parseEnqueue("[]"), /JSON object/);
  rejects(
    () => parseEnqueue(enqueue([unit()], { v: 2 })),
    /Unknown enqueue version 2/,
  );
  rejects(() => parseEnqueue(enqueue([])), /non-empty array/);
  rejects(
    () => parseEnqueue(enqueue([unit()], { batch: 46 })),
    /not job 123 batch 46/,
  );
  rejects(
    () => parseEnqueue(enqueue([unit(), unit()])),
    /repeats unit id "123-45-0"/,
  );
  rejects(
    () => parseEnqueue(enqueue([unit(), unit({ unit: "123-45-1" })])),
    /repeats idempotency key "cm-123-1001-1"/,
  );
});
