// SPDX-License-Identifier: Apache-2.0
// The API client: the token lives in sessionStorage only and goes out only
// in the Authorization header (never in a URL, never logged).

const KEY = 'tether.token';
let who = null;   // GET /v1/access_tokens/current

export class ApiError extends Error {
        constructor(status, message, body) {
                super(message);
                this.status = status;
                this.body = body;
        }
}

export function token() {
        return sessionStorage.getItem(KEY);
}

export function setToken(t) {
        sessionStorage.setItem(KEY, t);
}

export function logout() {
        sessionStorage.removeItem(KEY);
        who = null;
}

export function authHeaders() {
        return { Authorization: 'Bearer ' + token() };
}

function message(status, body) {
        if (body && typeof body === 'object') {
                const m = body.error_description || body.error || body.message;
                if (m)
                        return String(m) + (body.info ? ' (' + String(body.info) + ')' : '');
        }
        return 'HTTP ' + status;
}

// api('GET', '/v1/devices', null, {page: 1}) → parsed JSON; throws ApiError
// with the API's message. Query values that are arrays repeat the key.
export async function api(method, path, body, query) {
        let url = path;
        if (query) {
                const q = new URLSearchParams();
                for (const [k, v] of Object.entries(query)) {
                        if (v === null || v === undefined || v === '')
                                continue;
                        for (const x of Array.isArray(v) ? v : [v])
                                q.append(k, String(x));
                }
                const s = q.toString();
                if (s)
                        url += '?' + s;
        }
        const init = { method, headers: authHeaders(), cache: 'no-store', credentials: 'omit' };
        if (body !== null && body !== undefined) {
                init.headers['Content-Type'] = 'application/json';
                init.body = JSON.stringify(body);
        }
        let res;
        try {
                res = await fetch(url, init);
        } catch (e) {
                throw new ApiError(0, 'Cannot reach the cloud: ' + e.message, null);
        }
        let data = null;
        const text = await res.text();
        if (text) {
                try {
                        data = JSON.parse(text);
                } catch {
                        data = null;
                }
        }
        if (!res.ok || (data && data.ok === false))
                throw new ApiError(res.status, message(res.status, data), data);
        return data;
}

export const enc = encodeURIComponent;

// Whether /v1/devices/ID/NAME reaches a device's function (a POST) or
// variable (read: a GET) from here. A device names its own functions and
// variables ([A-Za-z0-9_.-]), and some of those names are no such path:
// "." and ".." are dot segments fetch() removes (a call would go to
// /v1/devices/ID/ or /v1/devices/), "tunnel", "logs" and "tunnels" are the
// tunnel routes for every method, and a GET of "events" is the device's
// event stream, which never ends (docs/cloud.md). The console offers no
// request for those (tether call and tether get reach none of them either).
export function deviceNameReachable(name, read) {
        const n = String(name);
        if (n === '.' || n === '..' || n === 'tunnel' || n === 'logs' || n === 'tunnels')
                return false;
        return !(read && n === 'events');
}

export async function login() {
        who = await api('GET', '/v1/access_tokens/current');
        return who;
}

export function current() {
        return who;
}

// Does the token have scope s? admin has every scope.
export function can(s) {
        const sc = (who && who.scopes) || [];
        return sc.includes('admin') || sc.includes(s);
}

// A token restricted to devices or tags: no tag changes, no campaigns,
// no OTA job list, no provisioning.
export function restricted() {
        return !!(who && ((who.devices && who.devices.length) || (who.tags && Object.keys(who.tags).length)));
}
