// Standard Webhooks signing, as docs/message-schema.md describes it: signed
// content "{id}.{timestamp}.{body}", signature "v1," + base64(HMAC-SHA256).

export const TOLERANCE_SECONDS = 5 * 60;

const encoder = new TextEncoder();

/** Decode standard base64 into bytes; throws on anything that is not base64. */
export function base64ToBytes(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

export function bytesToBase64(bytes) {
  let binary = "";
  const chunk = 0x8000;
  for (let i = 0; i < bytes.length; i += chunk) {
    binary += String.fromCharCode(...bytes.subarray(i, i + chunk));
  }
  return btoa(binary);
}

/**
 * Split a space-separated secret list ("whsec_AAA whsec_BBB") into key bytes.
 * The "whsec_" prefix is optional, as in the Standard Webhooks libraries.
 * Throws an Error naming the position of a secret that is not base64.
 */
export function parseSecrets(value) {
  const words = String(value ?? "")
    .split(/\s+/)
    .filter(Boolean);

  return words.map((word, index) => {
    const encoded = word.startsWith("whsec_") ? word.slice(6) : word;
    try {
      const key = base64ToBytes(encoded);
      if (key.length === 0) throw new Error("empty key");
      return key;
    } catch {
      throw new Error(
        `Secret #${index + 1} is not "whsec_" followed by base64; ` +
          "generate one with: openssl rand -base64 32",
      );
    }
  });
}

function importKey(keyBytes, usage) {
  return crypto.subtle.importKey(
    "raw",
    keyBytes,
    { name: "HMAC", hash: "SHA-256" },
    false,
    [usage],
  );
}

function signedContent(id, timestamp, body) {
  const bodyBytes = typeof body === "string" ? encoder.encode(body) : body;
  const prefix = encoder.encode(`${id}.${timestamp}.`);
  const content = new Uint8Array(prefix.length + bodyBytes.length);
  content.set(prefix, 0);
  content.set(bodyBytes, prefix.length);
  return content;
}

/**
 * Build the three Standard Webhooks headers for `body` (string or bytes),
 * with one "v1," signature per key so a receiver mid-rotation accepts it.
 */
export async function signHeaders(keys, id, body, nowSeconds) {
  const timestamp = String(Math.floor(nowSeconds ?? Date.now() / 1000));
  const content = signedContent(id, timestamp, body);
  const signatures = [];

  for (const keyBytes of keys) {
    const key = await importKey(keyBytes, "sign");
    const mac = await crypto.subtle.sign("HMAC", key, content);
    signatures.push(`v1,${bytesToBase64(new Uint8Array(mac))}`);
  }

  return {
    "webhook-id": id,
    "webhook-timestamp": timestamp,
    "webhook-signature": signatures.join(" "),
  };
}

/**
 * Check a request's Standard Webhooks headers against `keys`.
 *
 * Returns {ok: true} or {ok: false, status, error, reason}: 401 when the
 * headers are missing, 403 when the timestamp is stale or no signature
 * matches. HMACs are compared by crypto.subtle.verify, in constant time.
 */
export async function verifyHeaders(keys, headers, body, nowSeconds) {
  const id = headers.get("webhook-id");
  const timestamp = headers.get("webhook-timestamp");
  const signatureHeader = headers.get("webhook-signature");

  if (!id || !timestamp || !signatureHeader) {
    return refusal(
      401,
      "missing_signature",
      "The request has no " +
        "webhook-id, webhook-timestamp and webhook-signature headers.",
    );
  }

  const now = Math.floor(nowSeconds ?? Date.now() / 1000);
  const sent = /^\d{1,12}$/.test(timestamp) ? Number(timestamp) : NaN;
  if (!Number.isFinite(sent) || Math.abs(now - sent) > TOLERANCE_SECONDS) {
    return refusal(
      403,
      "stale_timestamp",
      "The webhook-timestamp is not within 5 minutes of the Worker's " +
        "clock; sign the request just before sending it.",
    );
  }

  const content = signedContent(id, timestamp, body);
  const candidates = signatureHeader
    .split(" ")
    .filter((part) => part.startsWith("v1,"))
    .map((part) => part.slice(3));

  for (const keyBytes of keys) {
    const key = await importKey(keyBytes, "verify");
    for (const candidate of candidates) {
      let mac;
      try {
        mac = base64ToBytes(candidate);
      } catch {
        continue;
      }
      if (await crypto.subtle.verify("HMAC", key, mac, content)) {
        return { ok: true, id };
      }
    }
  }

  return refusal(
    403,
    "bad_signature",
    "No webhook-signature matches any of " +
      "the Worker's CLOUDMAIL_ENQUEUE_SECRET keys.",
  );
}

function refusal(status, error, reason) {
  return { ok: false, status, error, reason };
}
