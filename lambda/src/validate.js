// Shape checks for /enqueue requests and for the batch message v1 ("unit")
// that the consumer reads back. Both sides use the same unit check, so a
// unit that was accepted once is accepted again on redelivery.

import {
  MAX_ADDRESSES_PER_MESSAGE,
  MAX_MESSAGES_PER_UNIT,
  MAX_UNIT_BYTES,
} from "./limits.js";

const encoder = new TextEncoder();

const BASE64 =
  /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;
const ADDRESS = /^[\x21-\x7e]+@[\x21-\x7e]+$/;
const CONFIGURATION_SET = /^[A-Za-z0-9_-]{1,64}$/;
const CONTROL = /[\x00-\x1f\x7f]/;

/** A request or unit that does not have the documented shape. */
export class ValidationError extends Error {
  constructor(reason, { status = 400, error = "malformed" } = {}) {
    super(reason);
    this.name = "ValidationError";
    this.status = status;
    this.error = error;
  }
}

function fail(reason, options) {
  throw new ValidationError(reason, options);
}

function isId(value) {
  return Number.isSafeInteger(value) && value >= 0;
}

/** UTF-8 length of the compact JSON the queue stores for `unit`. */
export function unitByteLength(unit) {
  return encoder.encode(JSON.stringify(unit)).length;
}

/**
 * Parse an /enqueue body ({"v":1,"job","batch","units":[...]}) and return
 * {job, batch, units} with each unit normalised to the documented fields.
 * Throws ValidationError (status 400, or 413 for a unit over MAX_UNIT_BYTES).
 */
export function parseEnqueue(bodyText) {
  let request;
  try {
    request = JSON.parse(bodyText);
  } catch {
    fail("The body is not JSON.");
  }

  if (
    request === null ||
    typeof request !== "object" ||
    Array.isArray(request)
  ) {
    fail("The body must be a JSON object.");
  }
  if (request.v !== 1) {
    fail(
      `Unknown enqueue version ${JSON.stringify(request.v)}; ` +
        "this Worker knows 1.",
    );
  }
  if (!isId(request.job) || !isId(request.batch)) {
    fail('"job" and "batch" must be non-negative integers.');
  }
  if (!Array.isArray(request.units) || request.units.length === 0) {
    fail('"units" must be a non-empty array of batch messages.');
  }

  const seenUnits = new Set();
  const seenKeys = new Set();
  const units = request.units.map((raw, index) => {
    const unit = validateUnit(raw, `units[${index}]`);

    if (unit.job !== request.job || unit.batch !== request.batch) {
      fail(
        `units[${index}] belongs to job ${unit.job} batch ${unit.batch}, ` +
          `not job ${request.job} batch ${request.batch}.`,
      );
    }
    if (seenUnits.has(unit.unit)) {
      fail(`units[${index}] repeats unit id "${unit.unit}".`);
    }
    seenUnits.add(unit.unit);
    for (const message of unit.messages) {
      if (seenKeys.has(message.key)) {
        fail(`units[${index}] repeats idempotency key "${message.key}".`);
      }
      seenKeys.add(message.key);
    }
    return unit;
  });

  return { job: request.job, batch: request.batch, units };
}

/**
 * Check one batch message v1 and return it with only the documented fields.
 * `where` names it in error reasons ("units[3]", "queue message").
 */
export function validateUnit(raw, where = "unit") {
  if (raw === null || typeof raw !== "object" || Array.isArray(raw)) {
    fail(`${where} must be a JSON object.`);
  }
  if (raw.v !== 1) {
    fail(
      `${where} has unknown version ${JSON.stringify(raw.v)}; ` +
        "this Worker knows 1.",
      { error: "unknown_version" },
    );
  }
  if (!isId(raw.job) || !isId(raw.batch)) {
    fail(`${where}: "job" and "batch" must be non-negative integers.`);
  }

  const unitPattern = new RegExp(`^${raw.job}-${raw.batch}-(0|[1-9][0-9]*)$`);
  if (typeof raw.unit !== "string" || !unitPattern.test(raw.unit)) {
    fail(`${where}: "unit" must be "${raw.job}-${raw.batch}-<n>".`);
  }

  const callback = raw.callback ?? null;
  if (callback !== null && !isHttpUrl(callback)) {
    fail(`${where}: "callback" must be an absolute http(s) URL or null.`);
  }

  const configurationSet = raw.configuration_set ?? null;
  if (
    configurationSet !== null &&
    (typeof configurationSet !== "string" ||
      !CONFIGURATION_SET.test(configurationSet))
  ) {
    fail(
      `${where}: "configuration_set" must be an SES configuration set name ` +
        "(letters, digits, _ and -, at most 64) or null.",
    );
  }

  if (
    !Array.isArray(raw.messages) ||
    raw.messages.length === 0 ||
    raw.messages.length > MAX_MESSAGES_PER_UNIT
  ) {
    fail(
      `${where}: "messages" must hold 1 to ${MAX_MESSAGES_PER_UNIT} ` +
        "recipients.",
    );
  }

  const keys = new Set();
  const messages = raw.messages.map((message, index) => {
    const checked = validateMessage(
      message,
      raw.job,
      `${where}.messages[${index}]`,
    );
    if (keys.has(checked.key)) {
      fail(
        `${where}.messages[${index}] repeats idempotency key "${checked.key}".`,
      );
    }
    keys.add(checked.key);
    return checked;
  });

  const unit = {
    v: 1,
    job: raw.job,
    batch: raw.batch,
    unit: raw.unit,
    callback,
    configuration_set: configurationSet,
    messages,
  };

  const size = unitByteLength(unit);
  if (size > MAX_UNIT_BYTES) {
    fail(
      `${where} ("${unit.unit}") is ${size} bytes of JSON; a unit may use at ` +
        `most ${MAX_UNIT_BYTES}. Pack fewer recipients into it.`,
      { status: 413, error: "unit_too_large" },
    );
  }
  return unit;
}

function validateMessage(raw, job, where) {
  if (raw === null || typeof raw !== "object" || Array.isArray(raw)) {
    fail(`${where} must be a JSON object.`);
  }
  if (!isId(raw.rid)) {
    fail(`${where}: "rid" must be a non-negative integer.`);
  }

  const keyPattern = new RegExp(`^cm-${job}-${raw.rid}-[0-9]+$`);
  if (typeof raw.key !== "string" || !keyPattern.test(raw.key)) {
    fail(`${where}: "key" must be "cm-${job}-${raw.rid}-<attempt>".`);
  }

  if (
    !Array.isArray(raw.to) ||
    raw.to.length === 0 ||
    raw.to.length > MAX_ADDRESSES_PER_MESSAGE
  ) {
    fail(
      `${where}: "to" must hold 1 to ${MAX_ADDRESSES_PER_MESSAGE} addresses.`,
    );
  }
  for (const address of raw.to) {
    if (
      typeof address !== "string" ||
      address.length > 320 ||
      !ADDRESS.test(address)
    ) {
      // The address itself stays out of the reason: reasons end up in logs.
      fail(
        `${where}: every "to" entry must be an ASCII address ` +
          "(punycode domains).",
      );
    }
  }

  if (
    typeof raw.from !== "string" ||
    raw.from.length === 0 ||
    CONTROL.test(raw.from)
  ) {
    fail(
      `${where}: "from" must be a non-empty header value without line breaks.`,
    );
  }
  if (
    typeof raw.raw !== "string" ||
    raw.raw.length === 0 ||
    !BASE64.test(raw.raw)
  ) {
    fail(`${where}: "raw" must be standard base64 of the MIME message.`);
  }

  return {
    rid: raw.rid,
    key: raw.key,
    to: [...raw.to],
    from: raw.from,
    raw: raw.raw,
  };
}

function isHttpUrl(value) {
  if (typeof value !== "string") return false;
  try {
    const url = new URL(value);
    return url.protocol === "https:" || url.protocol === "http:";
  } catch {
    return false;
  }
}
