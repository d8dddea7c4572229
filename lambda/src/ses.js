// SES v2 SendEmail (POST /v2/email/outbound-emails) with a raw MIME message,
// signed with SigV4 by aws4fetch. Every call ends in one of three outcomes:
//   {kind: "sent", messageId}            SES accepted the mail
//   {kind: "failed", code, error}        SES refused it for good
//   {kind: "retry", code, error, throttled}   nothing was sent; try later

import { AwsClient } from "aws4fetch";

const TIMEOUT_MS = 30_000;
const MAX_ERROR_LENGTH = 500;

// SES v2 error codes that mean "slow down" (docs.aws.amazon.com/ses/latest/
// APIReference-V2/CommonErrors.html and the SendEmail error list).
const THROTTLING_CODES = new Set([
  "TooManyRequestsException",
  "ThrottlingException",
  "Throttling",
  "LimitExceededException",
]);

/** The SES v2 base URL: env.SES_ENDPOINT, else the regional endpoint. */
export function sesEndpoint(env) {
  const region = env.AWS_REGION;
  if (!region) {
    throw new Error(
      "AWS_REGION is not set; add it to [vars] in wrangler.toml.",
    );
  }
  const endpoint = env.SES_ENDPOINT || `https://email.${region}.amazonaws.com`;
  return endpoint.replace(/\/+$/, "");
}

/** An aws4fetch client for SES, from the Worker's secrets. */
export function sesClient(env) {
  if (!env.AWS_ACCESS_KEY_ID || !env.AWS_SECRET_ACCESS_KEY) {
    throw new Error(
      "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are not set; add " +
        "them with `wrangler secret put`.",
    );
  }
  // service and region are given explicitly: aws4fetch guesses them from the
  // host name, which fails for SES_ENDPOINT pointing at a local test server.
  return new AwsClient({
    accessKeyId: env.AWS_ACCESS_KEY_ID,
    secretAccessKey: env.AWS_SECRET_ACCESS_KEY,
    sessionToken: env.AWS_SESSION_TOKEN || undefined,
    service: "ses",
    region: env.AWS_REGION,
    retries: 0,
  });
}

/** The SendEmail JSON body for one recipient message of `unit`. */
export function sendEmailBody(unit, message) {
  const body = {
    Destination: { ToAddresses: message.to },
    Content: { Raw: { Data: message.raw } },
    EmailTags: [
      { Name: "cloudmail-job", Value: String(unit.job) },
      { Name: "cloudmail-batch", Value: String(unit.batch) },
      { Name: "cloudmail-recipient", Value: String(message.rid) },
    ],
  };
  if (unit.configuration_set)
    body.ConfigurationSetName = unit.configuration_set;
  return body;
}

/**
 * Send one recipient message. Never throws: every failure is an outcome.
 * `fetchImpl` is the global fetch in the Worker and a fake in tests.
 */
export async function sendEmail({
  client,
  endpoint,
  unit,
  message,
  fetchImpl = fetch,
}) {
  let response;
  try {
    const request = await client.sign(`${endpoint}/v2/email/outbound-emails`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(sendEmailBody(unit, message)),
    });
    response = await fetchImpl(request, {
      signal: AbortSignal.timeout(TIMEOUT_MS),
    });
  } catch (err) {
    // No answer in time: the request reached SES and it may have sent the
    // mail, so this key is never sent again (the Lambda treats a read timeout
    // the same way). cloudmail reports it failed; an admin decides.
    if (err?.name === "TimeoutError" || err?.name === "AbortError") {
      return {
        kind: "failed",
        code: "AmbiguousSend",
        error:
          `SES did not answer within ${TIMEOUT_MS / 1000} s; the mail may ` +
          "have been sent, so it is not sent again.",
      };
    }
    // Known limitation: a connection that breaks after SES accepted the
    // request but before its answer arrived looks like one that never got
    // there (workerd names both "Network connection lost"); the retry then
    // sends that recipient a second time.
    return {
      kind: "retry",
      code: "NetworkError",
      error: truncate(String(err?.message ?? err)),
      throttled: false,
    };
  }

  const text = await response.text().catch(() => "");
  if (response.ok) {
    const messageId = parseJson(text)?.MessageId;
    if (typeof messageId === "string" && messageId) {
      return { kind: "sent", messageId };
    }
    // Accepted (2xx) but unreadable: the mail may be on its way, so it must
    // not be sent again. Record it as sent without an id.
    return { kind: "sent", messageId: null };
  }
  return classifyError(response.status, response.headers, text);
}

/** Turn an SES error response into a "failed" or "retry" outcome. */
export function classifyError(status, headers, text) {
  const { code, message } = parseError(status, headers, text);
  const error = truncate(message);
  const throttled =
    status === 429 ||
    THROTTLING_CODES.has(code) ||
    /maximum sending rate exceeded/i.test(message);

  if (throttled) return { kind: "retry", code, error, throttled: true };

  // 5xx: SES did not take the mail. 401/403: credentials or clock skew, which
  // the operator can fix; the recipient is not at fault, so keep retrying
  // until MAX_ATTEMPTS.
  if (status >= 500 || status === 401 || status === 403 || status === 408) {
    return { kind: "retry", code, error, throttled: false };
  }
  return { kind: "failed", code, error };
}

function parseError(status, headers, text) {
  // REST-JSON errors name the code in x-amzn-ErrorType ("Code:http://...")
  // or in the body's __type / code; some emulators answer with query-API XML.
  const json = parseJson(text);
  const header = headers?.get?.("x-amzn-errortype");
  let code = header ? header.split(":")[0] : null;
  code ||= json?.__type?.split("#").pop() || json?.code || json?.Code;
  code ||= text.match(/<Code>([^<]+)<\/Code>/)?.[1];
  const message =
    json?.message ??
    json?.Message ??
    text.match(/<Message>([^<]*)<\/Message>/)?.[1] ??
    `HTTP ${status}`;
  return { code: code || `HTTP${status}`, message: String(message) };
}

function parseJson(text) {
  try {
    return JSON.parse(text);
  } catch {
    return null;
  }
}

function truncate(text) {
  return text.length > MAX_ERROR_LENGTH
    ? `${text.slice(0, MAX_ERROR_LENGTH)}...`
    : text;
}
