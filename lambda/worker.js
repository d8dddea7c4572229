// cloudmail's Cloudflare Worker: POST /enqueue puts batch units on the queue;
// the queue consumer sends each recipient once through SES v2 and reports.
// The logic lives in src/; see WORKER.md.

import { handleBatch } from "./src/consume.js";
import { handleFetch } from "./src/routes.js";

export default {
  async fetch(request, env) {
    return handleFetch(request, env);
  },

  async queue(batch, env) {
    await handleBatch(batch, env);
  },
};
