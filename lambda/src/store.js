// Idempotency store on D1: one row per idempotency key.
//
// D1 runs every query on its single primary unless the Sessions API is used
// (this module does not use it), so a claim is seen by every later query:
// the strong consistency the at-most-once promise needs. KV would not do.
//
// Row states: "sending" (claimed, SES call in flight or crashed mid-call),
// "sent" (SES accepted; message_id kept), "failed" (final refusal).

const SCHEMA = `CREATE TABLE IF NOT EXISTS cloudmail_sends (
  key TEXT PRIMARY KEY,
  status TEXT NOT NULL,
  token TEXT NOT NULL,
  message_id TEXT,
  error_code TEXT,
  error TEXT,
  claimed_at INTEGER NOT NULL,
  updated_at INTEGER NOT NULL
)`;

const ready = new WeakMap();

export class D1IdempotencyStore {
  constructor(db, { now = () => Date.now() } = {}) {
    if (!db) {
      throw new Error(
        "The Worker has no IDEMPOTENCY_DB binding; add the [[d1_databases]] " +
          "block from wrangler.toml.",
      );
    }
    this.db = db;
    this.now = now;
  }

  /** Create the table once per isolate and database binding. */
  ensureSchema() {
    let promise = ready.get(this.db);
    if (!promise) {
      promise = this.db.prepare(SCHEMA).run();
      promise.catch(() => ready.delete(this.db));
      ready.set(this.db, promise);
    }
    return promise;
  }

  /**
   * Claim `key` for sending. Returns {claimed: true, token} when this caller
   * now owns it, else {claimed: false, row} with the existing row (row is
   * null when the key was released between the two statements).
   */
  async claim(key) {
    await this.ensureSchema();
    const token = crypto.randomUUID();
    const now = this.now();
    const insert = await this.db
      .prepare(
        "INSERT INTO cloudmail_sends " +
          "(key, status, token, claimed_at, updated_at) " +
          "VALUES (?1, 'sending', ?2, ?3, ?3) ON CONFLICT(key) DO NOTHING",
      )
      .bind(key, token, now)
      .run();

    if (insert.meta.changes === 1) return { claimed: true, token };

    const row = await this.db
      .prepare("SELECT * FROM cloudmail_sends WHERE key = ?1")
      .bind(key)
      .first();
    return { claimed: false, row: row ?? null };
  }

  /** Record that SES accepted the mail claimed with `token`. */
  async markSent(key, token, messageId) {
    return this.#finish(key, token, "sent", messageId, null, null);
  }

  /** Record a final refusal for the claim `token`. */
  async markFailed(key, token, errorCode, error) {
    return this.#finish(key, token, "failed", null, errorCode, error);
  }

  /** Give the key back (nothing was sent) so a retry may claim it again. */
  async release(key, token) {
    await this.db
      .prepare(
        "DELETE FROM cloudmail_sends WHERE key = ?1 AND token = ?2 " +
          "AND status = 'sending'",
      )
      .bind(key, token)
      .run();
  }

  async #finish(key, token, status, messageId, errorCode, error) {
    const result = await this.db
      .prepare(
        "UPDATE cloudmail_sends SET status = ?3, message_id = ?4, " +
          "error_code = ?5, error = ?6, updated_at = ?7 " +
          "WHERE key = ?1 AND token = ?2 AND status = 'sending'",
      )
      .bind(key, token, status, messageId, errorCode, error, this.now())
      .run();
    return result.meta.changes === 1;
  }
}
