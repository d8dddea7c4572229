// Start the Worker in miniflare (workerd) with a real Queue producer and
// consumer and a D1 idempotency store, for local runs and the test suites.
//
//   node dev/serve.mjs [--port N]     (or PORT=N; 0 picks a free port)
//
// Vars and secrets come from the environment (see .dev.vars.example). When
// the server listens, one line goes to stdout: "READY http://127.0.0.1:PORT".
// The Worker's own logs go to stderr. SIGTERM or SIGINT stops it (exit 143
// or 130: miniflare's exit hook stops workerd, then exits 128 + signal).

import { readdirSync, readFileSync } from "node:fs";
import { dirname, join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { Log, LogLevel, Miniflare } from "miniflare";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const QUEUE_NAME = "cloudmail-email";

const ENV_NAMES = [
  "AWS_REGION",
  "SES_ENDPOINT",
  "AWS_ACCESS_KEY_ID",
  "AWS_SECRET_ACCESS_KEY",
  "AWS_SESSION_TOKEN",
  "CLOUDMAIL_ENQUEUE_SECRET",
  "CLOUDMAIL_REPORT_SECRET",
  "MAX_ATTEMPTS",
  "RETRY_BASE_SECONDS",
  "RETRY_MAX_SECONDS",
  "CLAIM_LEASE_SECONDS",
];

function parsePort(argv, env) {
  const flag = argv.indexOf("--port");
  const value =
    flag >= 0
      ? argv[flag + 1]
      : (argv.find((a) => /^\d+$/.test(a)) ?? env.PORT);
  const port = Number(value ?? 8787);
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    throw new Error(
      `Port ${JSON.stringify(value)} is not a number from 0 to 65535.`,
    );
  }
  return port;
}

// miniflare does not resolve npm packages (wrangler bundles them on deploy),
// and workerd resolves a bare specifier next to the importing module. So
// every module that imports "aws4fetch" gets that package's ES build as a
// sibling module named "aws4fetch".
function workerModules() {
  // Resolved with the "import" condition: the package's ES module build.
  const aws4fetch = fileURLToPath(import.meta.resolve("aws4fetch"));
  const files = [
    "worker.js",
    ...readdirSync(join(ROOT, "src"))
      .filter((name) => name.endsWith(".js"))
      .map((name) => `src/${name}`),
  ];

  const modules = files.map((file) => ({
    type: "ESModule",
    path: join(ROOT, file),
    contents: readFileSync(join(ROOT, file), "utf8"),
  }));
  const importers = new Set(
    modules
      .filter((m) => /from\s+["']aws4fetch["']/.test(m.contents))
      .map((m) => dirname(relative(ROOT, m.path))),
  );
  for (const dir of importers) {
    modules.push({
      type: "ESModule",
      path: join(ROOT, dir, "aws4fetch"),
      contents: readFileSync(aws4fetch, "utf8"),
    });
  }
  return modules;
}

function bindingsFromEnv(env) {
  const bindings = {};
  for (const name of ENV_NAMES) {
    if (env[name] !== undefined && env[name] !== "") bindings[name] = env[name];
  }
  return bindings;
}

async function main() {
  const port = parsePort(process.argv.slice(2), process.env);
  const persist = process.env.CLOUDMAIL_WORKER_PERSIST || false;

  const mf = new Miniflare({
    host: "127.0.0.1",
    port,
    modules: workerModules(),
    modulesRoot: ROOT,
    compatibilityDate: "2025-04-01",
    cf: false,
    bindings: bindingsFromEnv(process.env),
    queueProducers: { EMAIL_QUEUE: { queueName: QUEUE_NAME } },
    queueConsumers: {
      [QUEUE_NAME]: { maxBatchSize: 10, maxBatchTimeout: 1, maxRetries: 10 },
    },
    d1Databases: { IDEMPOTENCY_DB: "cloudmail-idempotency" },
    d1Persist: persist && join(persist, "d1"),
    queuesPersist: persist && join(persist, "queues"),
    log: new Log(LogLevel.WARN),
    handleRuntimeStdio(stdout, stderr) {
      stdout.pipe(process.stderr);
      stderr.pipe(process.stderr);
    },
  });

  const url = await mf.ready;
  process.stdout.write(`READY ${url.origin}\n`);

  // SIGTERM and SIGINT: miniflare's own exit hook stops workerd and exits
  // with 128 + the signal number (143 for SIGTERM).
}

main().catch((err) => {
  console.error("serve:", err);
  process.exit(1);
});
