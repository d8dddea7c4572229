// HTTP routing for the Worker's fetch handler.

import { handleEnqueue, jsonResponse } from "./enqueue.js";

export async function handleFetch(request, env) {
  const { pathname } = new URL(request.url);

  if (pathname === "/health") {
    if (request.method !== "GET" && request.method !== "HEAD")
      return notAllowed("GET");
    return jsonResponse(200, { ok: true });
  }

  if (pathname === "/enqueue") {
    if (request.method !== "POST") return notAllowed("POST");
    try {
      return await handleEnqueue(request, env);
    } catch (err) {
      console.error("enqueue: unexpected error:", err);
      return jsonResponse(500, {
        error: "internal",
        reason: "The Worker failed; retry.",
      });
    }
  }

  return jsonResponse(404, {
    error: "not_found",
    reason: `No route for ${pathname}.`,
  });
}

function notAllowed(allow) {
  const response = jsonResponse(405, {
    error: "method_not_allowed",
    reason: `Use ${allow}.`,
  });
  response.headers.set("allow", allow);
  return response;
}
