// SPDX-License-Identifier: Apache-2.0
// #/fleet: the device table, paged and filtered by the server
// (GET /v1/devices?page&per_page=50&name&tag&package&connected), kept live
// from the event stream (a device's event shows it online, its revocation
// offline; the cloud publishes no event when a session ends) and by reading
// the page shown again every 15 s.

import { h, replace, relTime, setRelTime, tagChips, deviceLink, field } from './dom.js';
import { api, enc } from './api.js';
import { eventJSON } from './events.js';

const PER_PAGE = 50;
const state = { page: 1, name: '', tag: '', pkg: '', connected: '' };

export function agentVersion(d) {
        const p = d.system && d.system.packages;
        return (p && p['tether-agent']) || '';
}

export function osText(d) {
        const s = d.system;
        if (!s)
                return '';
        return [s.os, s.arch].filter(Boolean).join(' / ');
}

function otherPackages(d) {
        const p = (d.system && d.system.packages) || {};
        return Object.entries(p).filter(([k]) => k !== 'tether-agent').map(([k, v]) => k + ' ' + v).join(', ');
}

export function stateCell(connected) {
        return h('span', { class: 'state ' + (connected ? 'on' : 'off'), 'data-test': 'device-state' },
                 connected ? 'online' : 'offline');
}

function row(d) {
        const tr = h('tr', { 'data-test': 'device-row', 'data-id': d.id },
                h('td', { 'data-label': 'Name' }, deviceLink(d.id, d.name || d.id)),
                h('td', { 'data-label': 'ID', class: 'mono' }, d.id),
                h('td', { 'data-label': 'State' }, stateCell(d.connected),
                  d.revoked ? h('span', { class: 'badge warn' }, 'revoked') : null),
                h('td', { 'data-label': 'Last heard', class: 'heard' }, relTime(d.last_heard)),
                h('td', { 'data-label': 'Tags' }, h('div', { class: 'chips' }, tagChips(d.tags))),
                h('td', { 'data-label': 'Agent' }, agentVersion(d)),
                h('td', { 'data-label': 'OS' }, osText(d)),
                h('td', { 'data-label': 'Packages', class: 'small' }, otherPackages(d)));
        return tr;
}

function setOnline(tr, on, when) {
        const cell = tr.querySelector('[data-test=device-state]');
        cell.textContent = on ? 'online' : 'offline';
        cell.className = 'state ' + (on ? 'on' : 'off');
        if (when)
                setRelTime(tr.querySelector('td.heard time'), when);
}

export async function render(main, ctx) {
        const tbody = h('tbody', {});
        const info = h('span', { 'data-test': 'page-info', class: 'page-info', 'aria-live': 'polite' }, '');
        const prev = h('button', { type: 'button', 'data-test': 'page-prev', onclick: () => go(state.page - 1) }, '← Previous');
        const next = h('button', { type: 'button', 'data-test': 'page-next', onclick: () => go(state.page + 1) }, 'Next →');
        const search = h('input', { type: 'search', 'data-test': 'fleet-search', value: state.name,
                                    placeholder: 'name or device ID', autocomplete: 'off' });
        const tag = h('input', { type: 'text', 'data-test': 'fleet-filter-tag', value: state.tag,
                                 placeholder: 'K or K=V', autocomplete: 'off' });
        const pkg = h('input', { type: 'text', 'data-test': 'fleet-filter-package', value: state.pkg,
                                 placeholder: 'NAME or NAME=VERSION', autocomplete: 'off' });
        const conn = h('select', { 'data-test': 'fleet-filter-state' },
                h('option', { value: '' }, 'any'), h('option', { value: 'true' }, 'online'),
                h('option', { value: 'false' }, 'offline'));
        conn.value = state.connected;
        let total = 0;
        let pages = 1;
        let loading = 0;
        let shown = [];

        const form = h('form', { class: 'filters', role: 'search', onsubmit: e => {
                e.preventDefault();
                state.name = search.value.trim();
                state.tag = tag.value.trim();
                state.pkg = pkg.value.trim();
                state.connected = conn.value;
                go(1);
        } },
                field('Search', search), field('Tag', tag), field('Package', pkg), field('State', conn),
                h('button', { type: 'submit', class: 'primary' }, 'Apply'));
        conn.addEventListener('change', () => form.requestSubmit());

        replace(main,
                h('h1', {}, 'Fleet'),
                form,
                h('div', { class: 'table-wrap' },
                  h('table', { class: 'devices cards' },
                    h('thead', {}, h('tr', {}, ['Name', 'ID', 'State', 'Last heard', 'Tags', 'Agent', 'OS',
                                                 'Packages'].map(t => h('th', { scope: 'col' }, t)))),
                    tbody)),
                h('div', { class: 'pager' }, prev, info, next));

        function query() {
                return { page: state.page, per_page: PER_PAGE, name: state.name || null, tag: state.tag || null,
                         package: state.pkg || null, connected: state.connected || null };
        }

        async function load(quiet) {
                const my = ++loading;
                let res = await api('GET', '/v1/devices', null, query());
                let devices = res.devices || [];
                // Not a name: try it as a device ID.
                if (!devices.length && state.name && state.page === 1) {
                        try {
                                const d = await api('GET', '/v1/devices/' + enc(state.name));
                                devices = [d];
                                res = { meta: { total: 1, total_pages: 1 } };
                        } catch (e) {
                                if (e.status !== 404 && e.status !== 403)
                                        throw e;
                        }
                }
                if (my !== loading || !ctx.page.active)
                        return;
                total = res.meta.total ?? devices.length;
                pages = Math.max(1, res.meta.total_pages || 1);
                // A reload that changes only states and times updates the rows in
                // place (no flicker, no lost focus); anything else redraws them.
                const key = x => JSON.stringify({ ...x, connected: 0, online: 0, last_heard: 0, last_ip_address: 0 });
                const keys = devices.map(key);
                if (quiet && keys.length === shown.length && keys.every((k, i) => k === shown[i])) {
                        devices.forEach((x, i) => setOnline(tbody.children[i], x.connected, x.last_heard));
                } else {
                        replace(tbody, devices.length ? devices.map(row)
                                : h('tr', {}, h('td', { colspan: 8, class: 'empty' }, 'No devices match.')));
                }
                shown = keys;
                info.textContent = 'Page ' + state.page + ' of ' + pages + ' · ' + total.toLocaleString('en') +
                                   ' device' + (total === 1 ? '' : 's');
                prev.disabled = state.page <= 1;
                next.disabled = state.page >= pages;
                if (!quiet)
                        ctx.ready('fleet');
        }

        function go(p) {
                state.page = Math.max(1, p);
                delete document.body.dataset.ready;
                load().catch(ctx.error);
        }

        ctx.onEvent(ev => {
                const id = ev.coreid;
                if (ev.name === 'tether/device/revoked') {
                        const tr = rowOf(eventJSON(ev).device);
                        if (tr)
                                setOnline(tr, false);
                        return;
                }
                const tr = rowOf(id);
                if (!tr)
                        return;
                if (ev.name === 'spark/status' || ev.name === 'tether/device/online' || ev.name === 'tether/device/offline') {
                        const on = ev.name === 'tether/device/online' || ev.data === 'online';
                        setOnline(tr, on, ev.published_at);
                } else if (!ev.name.startsWith('tether/device/') && id !== 'api' && id !== 'cloud') {
                        setOnline(tr, true, ev.received_at || ev.published_at);
                }
        });

        function rowOf(id) {
                if (!id)
                        return null;
                for (const tr of tbody.children)
                        if (tr.dataset.id === id)
                                return tr;
                return null;
        }

        const timer = setInterval(() => load(true).catch(() => {}), 15000);
        ctx.onLeave(() => clearInterval(timer));
        await load();
}
