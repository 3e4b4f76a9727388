// SPDX-License-Identifier: Apache-2.0
// The web console (docs/console.md) in Debian's chromium, against a real
// cloud and two real agents that tests/integration/test-console.py
// started. Environment: TETHER_API (the cloud's API URL), TETHER_TOKEN (an
// admin token), TETHER_TOKEN_RO (one without ota:write nor admin),
// TETHER_DEVICE_A and _B (online agents of the example plugin whose label
// variable holds TETHER_XSS; B's notes and its tag 'note' too), TETHER_MANIFEST
// (a signed manifest for both), TETHER_SCREENSHOTS (a directory),
// TETHER_CHROMIUM, TETHER_TIMEOUT_MS. Exits 0 when every check passed.
// One chromium for the whole file.
import fs from 'node:fs';
import path from 'node:path';
import puppeteer from 'puppeteer-core';

const env = process.env;
const API = env.TETHER_API;
const ORIGIN = new URL(API).origin;
const XSS = env.TETHER_XSS || '<img src=x onerror=alert(1)>';
const TIMEOUT = Number(env.TETHER_TIMEOUT_MS || 30000);
const SHOTS = env.TETHER_SCREENSHOTS;
const A = env.TETHER_DEVICE_A, B = env.TETHER_DEVICE_B;
const CSP = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; " +
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'";
const SIZES = { wide: { width: 1280, height: 800 }, phone: { width: 375, height: 812 } };
// (not isMobile: puppeteer reloads the page to change it, losing its state)

const failures = [];
const t0 = Date.now();

function log(msg) {
        console.log(`[${((Date.now() - t0) / 1000).toFixed(1)} s] ${msg}`);
}

function check(cond, msg) {
        if (!cond) {
                failures.push(msg);
                log(`FAIL: ${msg}`);
        }
        return cond;
}

async function api(method, p, body, token = env.TETHER_TOKEN) {
        const r = await fetch(API + p, {
                method,
                headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' },
                body: body === undefined ? undefined : JSON.stringify(body),
        });
        return { status: r.status, body: await r.json().catch(() => null) };
}

// Every page this test opens: no dialog (an alert would be injected
// script running; the one confirm the console asks, revocation, is
// accepted only while expected), no request to another origin, no page
// error, no CSP violation by the console's own code.
let confirmsExpected = 0;
let cspProbe = 0; // CSP reports expected: the test's own inline script
function watch(page, who) {
        page.on('dialog', async d => {
                if (d.type() === 'confirm' && confirmsExpected > 0) {
                        confirmsExpected--;
                        await d.accept();
                        return;
                }
                check(false, `${who}: unexpected ${d.type()} dialog: ${JSON.stringify(d.message())}`);
                await d.dismiss();
        });
        page.on('request', r => {
                const u = r.url();
                if (!u.startsWith('data:') && !u.startsWith('blob:'))
                        check(new URL(u).origin === ORIGIN, `${who}: a request to another origin: ${u}`);
                // the token only ever in the Authorization header
                for (const t of [env.TETHER_TOKEN, env.TETHER_TOKEN_RO])
                        check(!u.includes(t), `${who}: the token in a URL: ${u.replace(t, 'TOKEN')}`);
                if (new URL(u).pathname.startsWith('/v1/'))
                        check(/^Bearer \S+$/.test(r.headers().authorization || ''),
                              `${who}: ${r.method()} ${new URL(u).pathname} without a bearer token`);
                else
                        check(!r.headers().authorization, `${who}: a token sent with ${u}`);
        });
        page.on('pageerror', e => check(false, `${who}: page error: ${e.message}`));
        page.on('console', m => {
                const text = m.text();
                if (/Content Security Policy/i.test(text)) {
                        if (cspProbe > 0)
                                cspProbe--;
                        else
                                check(false, `${who}: CSP violation: ${text}`);
                } else if (m.type() === 'error' && !/Failed to load resource/.test(text))
                        log(`${who} console error: ${text}`);
        });
}

// Polls fn in the page from here (page.evaluate, which the page's CSP
// does not govern, unlike a predicate evaluated from a string in it).
async function until(page, fn, ...args) {
        const end = Date.now() + TIMEOUT;
        for (;;) {
                const v = await page.evaluate(fn, ...args).catch(() => undefined);
                if (v)
                        return v;
                if (Date.now() > end)
                        return null;
                await new Promise(r => setTimeout(r, 100));
        }
}

async function ready(page, name, what) {
        if (await until(page, n => document.body.dataset.ready === n, name))
                return true;
        const state = await page.evaluate(() => ({
                ready: document.body.dataset.ready, hash: location.hash,
                error: document.querySelector('[data-test=error]')?.textContent,
        })).catch(() => ({}));
        return check(false, `${what}: page not ready '${name}' within ${TIMEOUT} ms (${JSON.stringify(state)})`);
}

async function text(page, selector) {
        return page.$eval(selector, el => el.textContent).catch(() => null);
}

// Waits until the text of selector's first match equals (or includes)
// the expected text.
async function waitText(page, selector, want, what) {
        const ok = await until(page, (s, w) => {
                const el = document.querySelector(s);
                const t = el ? el.textContent : null;
                return t !== null && (w.equals !== undefined ? t.trim() === w.equals : t.includes(w.includes));
        }, selector, want);
        return ok || check(false, `${what}: '${selector}' is ${JSON.stringify(await text(page, selector))}`);
}

// Phone width: the page itself never scrolls sideways (tables scroll
// inside their own container or become cards).
async function noHorizontalScroll(page, what) {
        const w = await page.evaluate(() => ({
                doc: document.documentElement.scrollWidth, body: document.body.scrollWidth, inner: window.innerWidth,
        }));
        check(w.doc <= w.inner && w.body <= w.inner, `${what} at 375 px: horizontal scroll ${JSON.stringify(w)}`);
}

async function shoot(page, name) {
        for (const [size, vp] of Object.entries(SIZES)) {
                await page.setViewport(vp);
                await page.evaluate(() => window.scrollTo(0, 0));
                await new Promise(r => setTimeout(r, 150)); // layout after the resize: no event to wait for
                if (size === 'phone')
                        await noHorizontalScroll(page, name);
                if (SHOTS)
                        await page.screenshot({ path: path.join(SHOTS, `${name}-${size}.png`) });
        }
        await page.setViewport(SIZES.wide);
}

async function noImages(page, what) {
        const n = await page.evaluate(() => document.querySelectorAll('img').length);
        check(n === 0, `${what}: ${n} img element(s) in the page`);
        const fired = await page.evaluate(() => window.__xss_fired === true);
        check(!fired, `${what}: injected script ran`);
}

async function login(page, token, who) {
        const resp = await page.goto(`${API}/console/`, { waitUntil: 'domcontentloaded' });
        const h = resp.headers();
        check(resp.status() === 200, `${who}: /console/ answered ${resp.status()}`);
        check(h['content-security-policy'] === CSP, `${who}: CSP header ${JSON.stringify(h['content-security-policy'])}`);
        check(h['x-content-type-options'] === 'nosniff' && h['x-frame-options'] === 'DENY' &&
              h['referrer-policy'] === 'no-referrer', `${who}: security headers ${JSON.stringify(h)}`);
        await ready(page, 'login', `${who}: login page`);
        await page.type('[data-test=token-input]', token);
        await page.click('[data-test=login]');
}

async function main() {
        const browser = await puppeteer.launch({
                executablePath: env.TETHER_CHROMIUM || '/usr/bin/chromium',
                headless: true,
                args: [...(process.getuid && process.getuid() === 0 ? ['--no-sandbox'] : []), '--disable-gpu',
                       '--disable-dev-shm-usage', '--no-first-run', '--disable-extensions',
                       '--disable-background-networking', '--disable-component-update', '--disable-sync'],
                defaultViewport: SIZES.wide,
        });
        try {
                await admin(browser);
                await readOnly(browser);
        } finally {
                await browser.close();
        }
}

async function admin(browser) {
        const page = await browser.newPage();
        page.setDefaultTimeout(TIMEOUT);
        watch(page, 'admin');
        await login(page, env.TETHER_TOKEN, 'admin');
        if (!await ready(page, 'fleet', 'fleet after login'))
                return;
        log('logged in, fleet shown');
        const store = await page.evaluate(() => ({
                session: JSON.stringify(sessionStorage), local: JSON.stringify(localStorage), url: location.href,
                cookie: document.cookie,
        }));
        check(store.session.includes(env.TETHER_TOKEN), 'the token is not in sessionStorage');
        check(!store.local.includes(env.TETHER_TOKEN) && !store.cookie.includes(env.TETHER_TOKEN) &&
              !store.url.includes(env.TETHER_TOKEN), `the token outside sessionStorage: ${JSON.stringify(store)}`);

        // The fleet: both agents online; B's tag, markup, shown as text.
        await waitText(page, `[data-test=device-row][data-id="${A}"] [data-test=device-state]`, { equals: 'online' },
                       'device A online in the fleet');
        const rowB = await page.$eval(`[data-test=device-row][data-id="${B}"]`, el => el.textContent).catch(() => '');
        check(rowB.includes(XSS), `device B's tag is not shown verbatim: ${JSON.stringify(rowB)}`);
        await noImages(page, 'fleet');
        await shoot(page, 'fleet');

        // CSP enforced: an inline script added to the page does not run.
        cspProbe = 1;
        const inline = await page.evaluate(() => {
                const s = document.createElement('script');
                s.textContent = 'window.__csp_probe__ = 1;';
                document.head.appendChild(s);
                return window.__csp_probe__ === 1;
        });
        check(!inline, 'an inline script ran despite the CSP');
        // the report is a console message, which arrives on its own
        for (let i = 0; i < 50 && cspProbe > 0; i++)
                await new Promise(r => setTimeout(r, 100));
        check(cspProbe === 0, 'no CSP report for the blocked inline script');
        cspProbe = 0;

        // The device: a call and its result, a live event, a variable.
        await page.goto(`${API}/console/#/device/${encodeURIComponent(A)}`);
        if (!await ready(page, 'device', 'device A'))
                return;
        log('device page shown');
        const form = `[data-test=fn-form][data-name=echo]`;
        await page.type(`${form} [data-test=fn-arg]`, XSS);
        await page.click(`${form} [data-test=fn-call]`);
        await waitText(page, `${form} [data-test=call-result]`, { equals: '28' }, 'echo\'s result');
        // echo publishes its argument: the event arrives live, as text
        await waitText(page, '[data-test=event-tail] [data-test=event-row]', { includes: XSS },
                       'the live event from echo');
        log('call and live event seen');
        // An event published through the API reaches the agent (the example
        // plugin subscribes to example/cmd): its last_event variable
        // changes, and the page shows the new value live, unasked.
        const sent = `api ${Date.now()} ${XSS}`;
        const pub = await api('POST', '/v1/devices/events', { name: 'example/cmd/console', data: sent });
        check(pub.status === 200, `publish through the API: ${pub.status} ${JSON.stringify(pub.body)}`);
        await waitText(page, '[data-test=var-row][data-name=last_event]', { includes: sent },
                       'the API-published event, live in the last_event variable');
        log('API-published event seen live');
        const label = '[data-test=var-row][data-name=label]';
        if (await page.$(`${label} [data-test=var-refresh]`)) {
                await page.click(`${label} [data-test=var-refresh]`);
                await waitText(page, label, { includes: XSS }, 'the label variable');
        } else
                check(false, 'no refresh button for the variable label');
        await noImages(page, 'device A');

        // A tag added and removed, each checked through the API.
        await page.type('[data-test=tag-input]', 'ring=console');
        await page.click('[data-test=tag-add]');
        if (!await until(page, () => !!document.querySelector('[data-test=tag-chip][data-tag=ring]')))
                check(false, 'no tag chip after adding the tag');
        let d = await api('GET', `/v1/devices/${A}`);
        check(d.body?.tags?.ring === 'console', `tag through the API: ${JSON.stringify(d.body?.tags)}`);
        await shoot(page, 'device');
        await page.click('[data-test=tag-chip][data-tag=ring] [data-test=tag-remove]').catch(() => check(false, 'no tag-remove'));
        if (!await until(page, () => !document.querySelector('[data-test=tag-chip][data-tag=ring]')))
                check(false, 'the tag chip stayed after its removal');
        d = await api('GET', `/v1/devices/${A}`);
        check(!d.body?.tags || !('ring' in d.body.tags), `tag after removal: ${JSON.stringify(d.body?.tags)}`);
        log('tag added and removed');

        // A campaign on both agents, watched to its end.
        await page.click('[data-test=nav-campaigns]');
        if (await ready(page, 'campaigns', 'campaigns')) {
                await page.click('[data-test=campaign-new]');
                await until(page, () => !!document.querySelector('[data-test=campaign-form]'));
                await page.type('[data-test=campaign-name]', 'console test');
                await page.type('[data-test=campaign-devices]', `${A}\n${B}`);
                const file = await page.$('[data-test=campaign-manifests]');
                await file.uploadFile(env.TETHER_MANIFEST);
                await page.$eval('[data-test=campaign-phases]', el => { el.value = ''; });
                await page.type('[data-test=campaign-phases]', '50,100');
                await page.$eval('[data-test=campaign-threshold]', el => { el.value = ''; });
                await page.type('[data-test=campaign-threshold]', '0');
                await shoot(page, 'campaign-new');
                await page.click('[data-test=campaign-create]');
                if (await ready(page, 'campaign', 'the new campaign')) {
                        const hash = await page.evaluate(() => location.hash);
                        const id = decodeURIComponent(hash.replace(/^#\/campaign\//, ''));
                        log(`campaign ${id} started`);
                        await waitText(page, '[data-test=campaign-state]', { equals: 'finished' },
                                       'the campaign finished (in the page)');
                        const c = await api('GET', `/v1/campaigns/${encodeURIComponent(id)}`);
                        check(c.body?.campaign?.counts?.committed === 2, `campaign counts: ${JSON.stringify(c.body)}`);
                        const phases = await page.$$eval('[data-test=phase-progress]', l => l.map(e => e.dataset.state));
                        check(phases.length === 2 && phases.every(s => s === 'done'), `phases in the page: ${phases}`);
                        log('campaign committed on both');
                        await shoot(page, 'campaign');
                }
                await page.click('[data-test=nav-campaigns]');
                if (await ready(page, 'campaigns', 'campaign list'))
                        await shoot(page, 'campaigns');
        }

        // Access.
        await page.click('[data-test=nav-access]');
        if (await ready(page, 'access', 'access'))
                await shoot(page, 'access');

        // Revocation of B: it goes offline, and the page says so.
        await page.goto(`${API}/console/#/device/${encodeURIComponent(B)}`);
        if (await ready(page, 'device', 'device B')) {
                const title = await page.evaluate(() => document.querySelector('main')?.textContent || '');
                check(title.includes(XSS), 'device B\'s notes and tag are not shown verbatim on its page');
                await noImages(page, 'device B');
                confirmsExpected = 1;
                await page.click('[data-test=revoke]');
                await waitText(page, 'main [data-test=device-state]', { equals: 'offline' }, 'device B offline after revocation');
                check(confirmsExpected === 0, 'revocation asked no confirmation');
                d = await api('GET', `/v1/devices/${B}`);
                check(d.body?.connected === false, `device B after revocation: ${JSON.stringify(d.body?.connected)}`);
                log('device B revoked, shown offline');
        }

        // Log out: the token leaves sessionStorage.
        await page.click('[data-test=logout]');
        await ready(page, 'login', 'after logout');
        const after = await page.evaluate(() => JSON.stringify(sessionStorage));
        check(!after.includes(env.TETHER_TOKEN), 'the token stayed in sessionStorage after logout');
        await shoot(page, 'login');
        await noImages(page, 'end');
        await page.close();
}

// A token without ota:write nor admin sees no campaign buttons, no
// revocation, no access page.
async function readOnly(browser) {
        const ctx = await browser.createBrowserContext();
        const page = await ctx.newPage();
        page.setDefaultTimeout(TIMEOUT);
        watch(page, 'read-only');
        await login(page, env.TETHER_TOKEN_RO, 'read-only');
        if (!await ready(page, 'fleet', 'read-only fleet'))
                return;
        for (const sel of ['[data-test=nav-campaigns]', '[data-test=nav-access]'])
                check(!await page.$(sel), `read-only token sees ${sel}`);
        await page.goto(`${API}/console/#/campaigns`);
        await new Promise(r => setTimeout(r, 500)); // a page that may render nothing: give it the chance to
        for (const sel of ['campaign-new', 'campaign-pause', 'campaign-resume', 'campaign-abort', 'campaign-create'])
                check(!await page.$(`[data-test=${sel}]`), `read-only token sees ${sel}`);
        await page.goto(`${API}/console/#/device/${encodeURIComponent(A)}`);
        if (await ready(page, 'device', 'read-only device')) {
                for (const sel of ['revoke', 'tag-add', 'notes-save', 'campaign-new'])
                        check(!await page.$(`[data-test=${sel}]`), `read-only token sees ${sel}`);
                check(!!await page.$('[data-test=fn-form][data-name=echo]'), 'read-only token (functions:call) sees no echo form');
        }
        await ctx.close();
}

try {
        if (SHOTS)
                fs.mkdirSync(SHOTS, { recursive: true });
        await main();
} catch (e) {
        failures.push(`exception: ${e.stack || e}`);
        log(`FAIL: ${e.stack || e}`);
}
log(failures.length ? `${failures.length} failure(s)` : 'all checks passed');
process.exit(failures.length ? 1 : 0);
