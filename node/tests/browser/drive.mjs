// Drives Debian's headless Chromium for `node/tests/browser_clients.rs`.
//
// Usage: node drive.mjs '<config JSON>'. The config names the browser, the two pages
// (one on an allowed origin, one not) and what the pages need (node URL, token, admin
// key, topics). Opens each page in a fresh profile, runs its checks (page.js) and
// prints one JSON object on stdout: {"allowed": {...}, "denied": {...}}. Exits 1 with
// the reason on stderr if the browser could not be driven at all.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const cfg = JSON.parse(process.argv[2]);
const profile = mkdtempSync(join(tmpdir(), "weft-chromium-"));
const watchdog = setTimeout(() => {
  console.error("drive.mjs: gave up after 90 s");
  process.exit(1);
}, 90_000);

let context;
try {
  context = await chromium.launchPersistentContext(profile, {
    executablePath: cfg.chromium,
    headless: true,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  const results = {};
  for (const [name, url, check] of [
    ["allowed", cfg.allowed_page, "asAllowed"],
    ["denied", cfg.denied_page, "asDenied"],
  ]) {
    const page = await context.newPage();
    const console_ = [];
    page.on("console", (m) => console_.push(`${m.type()}: ${m.text()}`));
    page.on("pageerror", (e) => console_.push(`pageerror: ${e}`));
    await page.goto(url);
    await page.waitForFunction(() => window.weft !== undefined);
    results[name] = await page.evaluate(([c, f]) => window.weft[f](c), [cfg, check]);
    results[name].origin = await page.evaluate(() => location.origin);
    results[name].agent = await page.evaluate(() => navigator.userAgent);
    results[name].console = console_;
    await page.close();
  }
  process.stdout.write(JSON.stringify(results) + "\n");
} catch (e) {
  console.error(`drive.mjs: ${e.stack || e}`);
  process.exitCode = 1;
} finally {
  clearTimeout(watchdog);
  await context?.close().catch(() => {});
  rmSync(profile, { recursive: true, force: true });
}
