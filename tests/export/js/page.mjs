// Drive web/index.html in headless Chromium (playwright-core, Debian's /usr/bin/chromium).
// argv: <page url> <texts.json> <task> <screenshot.png>; prints the page's JSON results.
import { readFileSync } from 'node:fs';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const [url, textsFile, task, screenshot] = process.argv.slice(2);
const profile = mkdtempSync(join(tmpdir(), 'metatt-chromium-'));
const browser = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
         '--disable-component-update', '--disable-sync'],
});
try {
  const page = browser.pages()[0] ?? (await browser.newPage());
  const logs = [];
  page.on('console', (m) => logs.push(m.text()));
  page.on('pageerror', (e) => logs.push(String(e)));
  page.on('response', (r) => { if (r.status() >= 400) logs.push(`${r.status()} ${r.url()}`); });
  await page.goto(url);
  await page.waitForFunction(() => ['ready', 'error'].includes(document.body.dataset.status), null, { timeout: 120000 });
  if ((await page.getAttribute('body', 'data-status')) !== 'ready') throw new Error(`page failed: ${await page.textContent('#status')} ${logs.join(' | ')}`);
  await page.selectOption('#task', task);
  await page.fill('#text', JSON.parse(readFileSync(textsFile, 'utf8')).join('\n'));
  await page.click('#go');
  await page.waitForFunction(() => ['done', 'error'].includes(document.body.dataset.status), null, { timeout: 120000 });
  await page.screenshot({ path: screenshot, fullPage: true });
  if ((await page.getAttribute('body', 'data-status')) !== 'done') throw new Error(`classify failed: ${await page.textContent('#status')} ${logs.join(' | ')}`);
  console.log(await page.textContent('#json'));
} finally {
  await browser.close();
  rmSync(profile, { recursive: true, force: true });
}
