// SPDX-License-Identifier: Apache-2.0
// The event stream: fetch('/v1/events') with the token in the header
// (EventSource cannot send one), its text/event-stream body read with a
// TextDecoder and a small SSE parser. Reconnects with backoff (1 s doubling
// to 30 s) and resumes with Last-Event-ID, which the cloud's journal honours.

import { authHeaders } from './api.js';

const listeners = new Set();
let ctrl = null;
let lastId = null;
let running = false;
let statusFn = () => {};

// Call fn({name, data, coreid, published_at, ...}) for every event.
export function onEvent(fn) {
        listeners.add(fn);
        return () => listeners.delete(fn);
}

// An event's data parsed as a JSON object ({} when it is not one).
export function eventJSON(ev) {
        try {
                const v = JSON.parse(ev.data);
                return v && typeof v === 'object' ? v : {};
        } catch {
                return {};
        }
}

export function onStatus(fn) {
        statusFn = fn;
}

function dispatch(name, dataText) {
        let ev;
        try {
                ev = JSON.parse(dataText);
        } catch {
                ev = { data: dataText };
        }
        if (!ev || typeof ev !== 'object')
                ev = { data: ev };
        ev.name = name;
        for (const fn of listeners) {
                try {
                        fn(ev);
                } catch (e) {
                        console.error('event listener failed', e);
                }
        }
}

// Feed lines to the parser; returns the unfinished tail.
function parse(buf, state) {
        let i;
        while ((i = buf.search(/\r\n|\r|\n/)) >= 0) {
                const line = buf.slice(0, i);
                buf = buf.slice(i + (buf[i] === '\r' && buf[i + 1] === '\n' ? 2 : 1));
                if (line === '') {
                        if (state.id !== null)
                                lastId = state.id;
                        if (state.data !== null)
                                dispatch(state.event || 'message', state.data);
                        state.event = null;
                        state.data = null;
                        state.id = null;
                        continue;
                }
                if (line[0] === ':')
                        continue;
                const c = line.indexOf(':');
                const field = c < 0 ? line : line.slice(0, c);
                let value = c < 0 ? '' : line.slice(c + 1);
                if (value[0] === ' ')
                        value = value.slice(1);
                if (field === 'event')
                        state.event = value;
                else if (field === 'data')
                        state.data = state.data === null ? value : state.data + '\n' + value;
                else if (field === 'id' && !value.includes('\0'))
                        state.id = value;
        }
        return buf;
}

async function runOnce(signal) {
        const headers = authHeaders();
        if (lastId)
                headers['Last-Event-ID'] = lastId;
        const res = await fetch('/v1/events', { headers, signal, cache: 'no-store', credentials: 'omit' });
        if (!res.ok || !res.body)
                throw Object.assign(new Error('event stream: HTTP ' + res.status), { status: res.status });
        statusFn('live');
        const reader = res.body.getReader();
        const dec = new TextDecoder();
        const state = { event: null, data: null, id: null };
        let buf = '';
        for (;;) {
                const { value, done } = await reader.read();
                if (done)
                        break;
                buf = parse(buf + dec.decode(value, { stream: true }), state);
                if (buf.length > 1 << 20)
                        throw new Error('event stream: line too long');
        }
}

export function start() {
        if (running)
                return;
        running = true;
        ctrl = new AbortController();
        const signal = ctrl.signal;
        (async () => {
                let delay = 1000;
                while (!signal.aborted) {
                        const t0 = Date.now();
                        try {
                                await runOnce(signal);
                        } catch (e) {
                                if (signal.aborted)
                                        break;
                                if (e.status === 401 || e.status === 403) {
                                        statusFn('off');
                                        break;
                                }
                        }
                        if (signal.aborted)
                                break;
                        statusFn('reconnecting');
                        if (Date.now() - t0 > 30000)
                                delay = 1000;
                        await new Promise(r => setTimeout(r, delay));
                        delay = Math.min(delay * 2, 30000);
                }
                if (ctrl && ctrl.signal === signal) {
                        ctrl = null;
                        running = false;
                }
        })();
}

export function stop() {
        if (ctrl)
                ctrl.abort();
        ctrl = null;
        running = false;
        lastId = null;
        statusFn('off');
}
