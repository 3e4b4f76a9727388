// SPDX-License-Identifier: Apache-2.0
// The browser half of tests/bench/bench-console.py: chromium opens the
// console's fleet page RUNS times (after one warm-up) and reports, per
// run, the time from navigation start to document.body.dataset.ready ==
// "fleet" with ROWS device rows shown, and what the first GET /v1/devices
// cost as the browser saw it. Environment: TETHER_API, TETHER_TOKEN,
// TETHER_CHROMIUM, TETHER_RUNS, TETHER_ROWS. Prints one JSON line.
import puppeteer from 'puppeteer-core';

const env = process.env;
const API = env.TETHER_API;
const RUNS = Number(env.TETHER_RUNS || 5);
const ROWS = Number(env.TETHER_ROWS || 50);

const browser = await puppeteer.launch({
        executablePath: env.TETHER_CHROMIUM || '/usr/bin/chromium',
        headless: true,
        args: [...(process.getuid && process.getuid() === 0 ? ['--no-sandbox'] : []), '--disable-gpu',
               '--disable-dev-shm-usage', '--no-first-run', '--disable-extensions', '--disable-background-networking',
               '--disable-component-update', '--disable-sync'],
        defaultViewport: { width: 1280, height: 800 },
});
const out = { runs: [] };
try {
        const page = await browser.newPage();
        // Noted in the page when it happens, not when polled: a script of
        // the test (DevTools' own, outside the page's CSP) watching the
        // body's data-ready attribute from the document's start.
        await page.evaluateOnNewDocument(rows => {
                const seen = () => {
                        if (window.__readyAt === undefined && document.body && document.body.dataset.ready === 'fleet' &&
                            document.querySelectorAll('[data-test=device-row]').length === rows)
                                window.__readyAt = performance.now();
                };
                new MutationObserver(seen).observe(document, { subtree: true, childList: true, attributes: true,
                                                               attributeFilter: ['data-ready'] });
        }, ROWS);
        await page.goto(`${API}/console/`);
        await page.waitForSelector('[data-test=token-input]');
        await page.type('[data-test=token-input]', env.TETHER_TOKEN);
        await page.click('[data-test=login]');
        await page.waitForFunction(() => document.body.dataset.ready === 'fleet', { polling: 50 });
        for (let i = 0; i <= RUNS; i++) {
                await page.reload({ waitUntil: 'domcontentloaded' });
                const end = Date.now() + 60000;
                let at;
                while ((at = await page.evaluate(() => window.__readyAt).catch(() => undefined)) === undefined) {
                        if (Date.now() > end)
                                throw new Error('the fleet page was not ready within 60 s');
                        await new Promise(r => setTimeout(r, 20));
                }
                const res = await page.evaluate(() => performance.getEntriesByType('resource')
                        .filter(e => /\/v1\/devices\?/.test(e.name))
                        .map(e => ({ url: e.name, wait: e.responseStart - e.requestStart,
                                     body: e.encodedBodySize, duration: e.duration }))[0] || null);
                if (i > 0) // the first run warms the cache of the files and the cloud's
                        out.runs.push({ ready_ms: at, devices_request: res });
        }
} finally {
        await browser.close();
}
console.log(JSON.stringify(out));
