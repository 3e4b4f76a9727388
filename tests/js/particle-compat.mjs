// SPDX-License-Identifier: Apache-2.0
// particle-compat.mjs: the official Particle JavaScript client
// (particle-api-js) driving a tether cloud. Proves the HTTP API keeps the
// Particle Cloud API shapes that existing clients depend on.
//
// Environment:
//   TETHER_API            base URL of tether-cloudd's HTTP API (default http://127.0.0.1:8080)
//   TETHER_TOKEN          API bearer token (required)
//   TETHER_DEVICE         ID of a connected device (required)
//   TETHER_FUNCTION       function to call (default "echo")
//   TETHER_ARG            its argument (default "hello")
//   TETHER_EXPECT_RESULT  expected return_value (default: any integer)
//   TETHER_VARIABLE       a numeric variable to read (default "counter")
//
// Output is TAP: a "1..N" plan, one "ok - ..." or "not ok - ..." line per
// check, diagnostics as "# ..." lines. Exit status 0 only if every check
// passed; 1 on any failure or the 20 s hard timeout; 2 on bad setup.

import Particle from 'particle-api-js';
import { randomBytes } from 'node:crypto';

const HARD_TIMEOUT_MS = 20000;
const EVENT_WAIT_MS = 5000;

const env = process.env;
const baseUrl = (env.TETHER_API || 'http://127.0.0.1:8080').replace(/\/+$/, '');
const token = env.TETHER_TOKEN;
const deviceId = env.TETHER_DEVICE;
const fnName = env.TETHER_FUNCTION || 'echo';
const fnArg = env.TETHER_ARG ?? 'hello';
const expectRaw = env.TETHER_EXPECT_RESULT;
const varName = env.TETHER_VARIABLE || 'counter';

if (!token || !deviceId) {
    console.log('Bail out! TETHER_TOKEN and TETHER_DEVICE must be set');
    process.exit(2);
}
const expectResult = expectRaw === undefined || expectRaw === '' ? undefined : Number(expectRaw);
if (expectResult !== undefined && !Number.isInteger(expectResult)) {
    console.log(`Bail out! TETHER_EXPECT_RESULT '${expectRaw}' is not an integer`);
    process.exit(2);
}

const particle = new Particle({ baseUrl, auth: token });

// Unique per run, so events of other runs or tests cannot match.
const tag = `${Date.now().toString(36)}${randomBytes(4).toString('hex')}`;
const prefix = `tethercompat-${tag}`;
const eventName = `${prefix}/ping`;
const eventData = `hello ${tag}`;

let stream = null;
const received = [];
let onEvent = null;

function fail(message) {
    throw new Error(message);
}

function describeError(err) {
    if (!err) return String(err);
    const parts = [];
    // errorDescription already reads "HTTP error 404 from URL".
    if (err.errorDescription) parts.push(err.errorDescription);
    else {
        if (err.statusCode !== undefined) parts.push(`HTTP ${err.statusCode}`);
        if (err.message) parts.push(err.message);
    }
    const body = err.body && err.body.error ? err.body.error : undefined;
    if (typeof body === 'string') parts.push(`error: ${body}`);
    return parts.length ? parts.join(': ') : JSON.stringify(err);
}

async function expectStatus(promise, status) {
    let res;
    try {
        res = await promise;
    } catch (err) {
        if (err && err.statusCode === status) return;
        fail(`expected HTTP ${status}, got ${describeError(err)}`);
    }
    fail(`expected HTTP ${status}, got HTTP ${res && res.statusCode} ${JSON.stringify(res && res.body)}`);
}

const checks = [
    {
        name: `listDevices lists ${deviceId} as connected`,
        async run() {
            const res = await particle.listDevices({});
            if (!Array.isArray(res.body)) fail(`body is not an array: ${JSON.stringify(res.body)}`);
            const dev = res.body.find((d) => d && d.id === deviceId);
            if (!dev) fail(`device not listed; ids: ${res.body.map((d) => d && d.id).join(', ')}`);
            if (dev.connected !== true) fail(`connected is ${JSON.stringify(dev.connected)}`);
        },
    },
    {
        name: `getDevice returns ${deviceId} with function '${fnName}' and variable '${varName}'`,
        async run() {
            const res = await particle.getDevice({ deviceId });
            const d = res.body;
            if (!d || d.id !== deviceId) fail(`id is ${JSON.stringify(d && d.id)}`);
            if (d.connected !== true) fail(`connected is ${JSON.stringify(d.connected)}`);
            if (!Array.isArray(d.functions) || !d.functions.includes(fnName))
                fail(`functions: ${JSON.stringify(d.functions)}`);
            if (!d.variables || typeof d.variables !== 'object' || !(varName in d.variables))
                fail(`variables: ${JSON.stringify(d.variables)}`);
        },
    },
    {
        name: `callFunction ${fnName}('${fnArg}') returns ${expectResult ?? 'an integer'}`,
        async run() {
            const res = await particle.callFunction({ deviceId, name: fnName, argument: fnArg });
            const rv = res.body && res.body.return_value;
            if (!Number.isInteger(rv)) fail(`return_value is ${JSON.stringify(rv)}`);
            if (expectResult !== undefined && rv !== expectResult)
                fail(`return_value is ${rv}, expected ${expectResult}`);
        },
    },
    {
        name: `getVariable ${varName} returns a number`,
        async run() {
            const res = await particle.getVariable({ deviceId, name: varName });
            const b = res.body;
            if (!b || typeof b.result !== 'number') fail(`result is ${JSON.stringify(b && b.result)}`);
            if (b.name !== varName) fail(`name is ${JSON.stringify(b.name)}`);
        },
    },
    {
        name: 'callFunction on an unknown function fails with HTTP 404',
        async run() {
            await expectStatus(
                particle.callFunction({ deviceId, name: `nosuchfn${tag}`, argument: '' }), 404);
        },
    },
    {
        name: 'a bad token is refused with HTTP 401',
        async run() {
            await expectStatus(particle.listDevices({ auth: `bad${tag}` }), 401);
        },
    },
    {
        name: `getEventStream opens a stream for the prefix '${prefix}'`,
        async run() {
            try {
                stream = await particle.getEventStream({ deviceId: 'mine', name: prefix });
            } catch (err) {
                fail(describeError(err));
            }
            stream.on('event', (ev) => {
                received.push(ev);
                if (onEvent) onEvent(ev);
            });
            // EventStream reconnects by itself; a disconnect here is a finding.
            stream.on('disconnect', () => console.log('# event stream disconnected'));
        },
    },
    {
        name: `publishEvent '${eventName}' is accepted`,
        async run() {
            const res = await particle.publishEvent({ name: eventName, data: eventData, isPrivate: false });
            if (!res.body || res.body.ok !== true) fail(`body: ${JSON.stringify(res.body)}`);
        },
    },
    {
        name: `the event '${eventName}' arrives on the stream`,
        async run() {
            if (!stream) fail('no event stream');
            const matches = (ev) => ev && ev.name === eventName;
            let ev = received.find(matches);
            if (!ev) {
                ev = await new Promise((resolve) => {
                    const timer = setTimeout(() => resolve(null), EVENT_WAIT_MS);
                    onEvent = (e) => {
                        if (matches(e)) {
                            clearTimeout(timer);
                            resolve(e);
                        }
                    };
                });
                onEvent = null;
            }
            if (!ev) {
                const seen = received.map((e) => e && e.name).join(', ') || 'none';
                fail(`not received within ${EVENT_WAIT_MS} ms (events seen: ${seen})`);
            }
            if (ev.data !== eventData) fail(`data is ${JSON.stringify(ev.data)}`);
            if (ev.coreid !== 'api') fail(`coreid is ${JSON.stringify(ev.coreid)}, expected "api"`);
            if (typeof ev.published_at !== 'string') fail(`published_at is ${JSON.stringify(ev.published_at)}`);
        },
    },
];

let failed = 0;
let current = 0;

function report(ok, name, diag) {
    console.log(`${ok ? 'ok' : 'not ok'} - ${name}`);
    if (!ok) {
        failed++;
        for (const line of String(diag).split('\n')) console.log(`# ${line}`);
    }
}

function finish() {
    if (stream) stream.abort();
    process.exit(failed ? 1 : 0);
}

console.log(`1..${checks.length}`);
console.log(`# particle-api-js against ${baseUrl}, device ${deviceId}`);

const hardTimeout = setTimeout(() => {
    for (; current < checks.length; current++)
        report(false, checks[current].name, `hard timeout: not done after ${HARD_TIMEOUT_MS / 1000} s`);
    finish();
}, HARD_TIMEOUT_MS);

for (; current < checks.length; current++) {
    const check = checks[current];
    try {
        await check.run();
        report(true, check.name);
    } catch (err) {
        report(false, check.name, err instanceof Error && !err.statusCode ? err.message : describeError(err));
    }
}
clearTimeout(hardTimeout);
finish();
