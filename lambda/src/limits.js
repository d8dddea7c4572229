// Cloudflare Queues limits (developers.cloudflare.com/queues/platform/limits/):
// a message is at most 128 KB (1 KB = 1000 bytes) including up to ~100 bytes
// of internal metadata; one sendBatch call takes at most 100 messages and
// 256 KB in total; delaySeconds is at most 24 hours.

export const QUEUE_MESSAGE_BYTES = 128_000;
export const QUEUE_METADATA_BYTES = 100;
export const SEND_BATCH_MAX_MESSAGES = 100;
export const SEND_BATCH_MAX_BYTES = 256_000;
export const MAX_DELAY_SECONDS = 24 * 60 * 60;

// A unit's compact JSON may use this much, leaving room for the metadata and
// a safety margin of 900 bytes against the limit being measured differently.
export const MAX_UNIT_BYTES = 127_000;

// One /enqueue request body; a batch bigger than this is sent in several
// requests (each unit is its own queue message, so splitting is safe).
export const MAX_ENQUEUE_BYTES = 10_000_000;

// docs/message-schema.md: "up to 50 recipients" per unit; SES v2 also takes
// at most 50 destinations per SendEmail call.
export const MAX_MESSAGES_PER_UNIT = 50;
export const MAX_ADDRESSES_PER_MESSAGE = 50;
