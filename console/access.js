// SPDX-License-Identifier: Apache-2.0
// #/access: provisioning tokens (provision:write), API tokens and the audit
// log (admin). A new token's secret is shown once, as text in a read-only
// field, and kept nowhere.

import { h, replace, relTime, field, fmtTime, asText } from './dom.js';
import { api, enc, can } from './api.js';

const SCOPES = ['devices:read', 'devices:write', 'functions:call', 'events:read', 'events:publish', 'ota:write',
                'metrics:read', 'provision:write', 'admin'];

function list(s) {
        return String(s || '').split(/[\s,]+/).filter(Boolean);
}

function tagsObject(s) {
        const o = {};
        for (const t of String(s || '').split(',').map(x => x.trim()).filter(Boolean)) {
                const i = t.indexOf('=');
                o[i < 0 ? t : t.slice(0, i)] = i < 0 ? '' : t.slice(i + 1);
        }
        return o;
}

function tagsText(t) {
        if (!t)
                return '';
        if (Array.isArray(t))
                return t.join(', ');
        return Object.entries(t).map(([k, v]) => v === '' ? k : k + '=' + v).join(', ');
}

// The secret of a token just made: shown once.
function secretBox(box, what, secret) {
        const input = h('input', { type: 'text', readonly: true, class: 'mono secret', 'data-test': 'secret', value: secret,
                                   'aria-label': 'The new ' + what, onfocus: e => e.target.select() });
        replace(box, h('div', { class: 'notice', role: 'status' },
                h('strong', {}, 'The new ' + what + ' (shown only now, copy it):'), input,
                h('button', { type: 'button', onclick: () => replace(box) }, 'Done')));
        input.focus();
}

function table(heads, tbody) {
        return h('div', { class: 'table-wrap' }, h('table', { class: 'cards' },
                h('thead', {}, h('tr', {}, heads.map(t => h('th', { scope: 'col' }, t)))), tbody));
}

function revokeButton(what, id, path, after, ctx) {
        return h('button', { type: 'button', class: 'bad small', 'data-test': 'token-revoke', 'aria-label': 'Revoke ' + what + ' ' + id,
                             onclick: async () => {
                if (!window.confirm('Revoke ' + what + ' ' + id + '?'))
                        return;
                try {
                        await api('DELETE', path + '/' + enc(id));
                        await after();
                } catch (err) {
                        ctx.error(err);
                }
        } }, 'Revoke');
}

function provisioning(ctx) {
        const tbody = h('tbody', {});
        const box = h('div', {});
        const name = h('input', { type: 'text', maxlength: 128, 'data-test': 'prov-name', autocomplete: 'off' });
        const uses = h('input', { type: 'number', min: 1, max: 1000000, value: '1', 'data-test': 'prov-uses' });
        const hours = h('input', { type: 'number', min: 1, max: 87600, value: '168', 'data-test': 'prov-hours' });
        const tags = h('input', { type: 'text', placeholder: 'site=berlin, lab', 'data-test': 'prov-tags', autocomplete: 'off' });
        async function load() {
                const l = await api('GET', '/v1/provision');
                replace(tbody, l.length ? l.slice().reverse().map(t => h('tr', { 'data-test': 'prov-row', 'data-id': t.id },
                        h('td', { 'data-label': 'ID', class: 'mono' }, t.id),
                        h('td', { 'data-label': 'Name' }, t.name || ''),
                        h('td', { 'data-label': 'Uses' }, t.uses + ' of ' + t.uses_max),
                        h('td', { 'data-label': 'Tags' }, tagsText(t.tags)),
                        h('td', { 'data-label': 'State' }, t.state),
                        h('td', { 'data-label': 'Expires' }, fmtTime(t.expires_at)),
                        h('td', {}, t.state === 'active' ? revokeButton('provisioning token', t.id, '/v1/provision', load, ctx) : null)))
                        : h('tr', {}, h('td', { colspan: 7, class: 'empty' }, 'No provisioning tokens.')));
        }
        const form = h('form', { class: 'card grid', onsubmit: async e => {
                e.preventDefault();
                try {
                        const body = { uses: Number(uses.value), expires_in: Math.round(Number(hours.value) * 3600) };
                        if (name.value.trim())
                                body.name = name.value.trim();
                        if (tags.value.trim())
                                body.tags = tagsObject(tags.value);
                        const r = await api('POST', '/v1/provision', body);
                        secretBox(box, 'provisioning token ' + r.id, r.token);
                        name.value = '';
                        tags.value = '';
                        await load();
                } catch (err) {
                        ctx.error(err);
                }
        } }, field('Name', name), field('Uses', uses), field('Expires in (hours)', hours),
                field('Tags for its devices', tags, 'K=V, comma separated'),
                h('button', { type: 'submit', class: 'primary', 'data-test': 'prov-create' }, 'Create provisioning token'));
        return [h('section', { 'aria-labelledby': 'h-prov' }, h('h2', { id: 'h-prov' }, 'Provisioning tokens'),
                  h('p', { class: 'hint' }, 'Devices enroll with these (docs/enrollment.md) and get their tags.'),
                  form, box, table(['ID', 'Name', 'Uses', 'Tags', 'State', 'Expires', ''], tbody)), load];
}

function apiTokens(ctx) {
        const tbody = h('tbody', {});
        const box = h('div', {});
        const name = h('input', { type: 'text', maxlength: 128, 'data-test': 'tok-name', autocomplete: 'off' });
        const days = h('input', { type: 'number', min: 1, max: 3650, placeholder: 'never', 'data-test': 'tok-days' });
        const devices = h('input', { type: 'text', placeholder: 'optional: device IDs', 'data-test': 'tok-devices', autocomplete: 'off' });
        const tags = h('input', { type: 'text', placeholder: 'optional: site=berlin, lab', 'data-test': 'tok-tags', autocomplete: 'off' });
        const boxes = SCOPES.map(s => h('label', { class: 'inline' },
                h('input', { type: 'checkbox', value: s, 'data-test': 'tok-scope', checked: s === 'devices:read' }), ' ' + s));
        async function load() {
                const l = await api('GET', '/v1/tokens');
                replace(tbody, !l.length ? h('tr', {}, h('td', { colspan: 8, class: 'empty' }, 'No API tokens made through the API (TokenFile= tokens are not listed).'))
                        : l.slice().reverse().map(t => h('tr', { 'data-test': 'tok-row', 'data-id': t.id },
                        h('td', { 'data-label': 'ID', class: 'mono' }, t.id),
                        h('td', { 'data-label': 'Name' }, t.name || ''),
                        h('td', { 'data-label': 'Scopes' }, (t.scopes || []).join(' ')),
                        h('td', { 'data-label': 'Reaches' }, [(t.devices || []).join(' '), tagsText(t.tags)].filter(Boolean).join('; ') || 'all devices'),
                        h('td', { 'data-label': 'State' }, t.state),
                        h('td', { 'data-label': 'Last used' }, relTime(t.last_used_at)),
                        h('td', { 'data-label': 'Expires' }, fmtTime(t.expires_at)),
                        h('td', {}, t.state === 'active' && !String(t.id).startsWith('file') ? revokeButton('API token', t.id, '/v1/tokens', load, ctx) : null))));
        }
        const form = h('form', { class: 'card grid', onsubmit: async e => {
                e.preventDefault();
                try {
                        const body = { scopes: boxes.map(b => b.firstChild).filter(b => b.checked).map(b => b.value) };
                        if (name.value.trim())
                                body.name = name.value.trim();
                        if (days.value)
                                body.expires_in = Math.round(Number(days.value) * 86400);
                        if (list(devices.value).length)
                                body.devices = list(devices.value);
                        if (tags.value.split(',').map(x => x.trim()).filter(Boolean).length)
                                body.tags = tags.value.split(',').map(x => x.trim()).filter(Boolean);
                        const r = await api('POST', '/v1/tokens', body);
                        secretBox(box, 'API token ' + r.id, r.token);
                        name.value = '';
                        await load();
                } catch (err) {
                        ctx.error(err);
                }
        } }, field('Name', name), field('Expires in (days)', days),
                h('fieldset', { class: 'scopes' }, h('legend', {}, 'Scopes'), boxes),
                field('Only these devices', devices), field('Only devices with tags', tags),
                h('button', { type: 'submit', class: 'primary', 'data-test': 'tok-create' }, 'Create API token'));
        return [h('section', { 'aria-labelledby': 'h-tok' }, h('h2', { id: 'h-tok' }, 'API tokens'), form, box,
                  table(['ID', 'Name', 'Scopes', 'Reaches', 'State', 'Last used', 'Expires', ''], tbody)), load];
}

// The audit log lists oldest first from `after`; to show the newest, find
// the last id (a galloping then binary search with limit=1, ~2·log2(N)
// requests) and read backwards in growing windows.
async function hasAfter(x) {
        return (await api('GET', '/v1/audit', null, { after: x, limit: 1 })).length > 0;
}

async function lastId() {
        if (!await hasAfter(0))
                return 0;
        let lo = 0;
        let hi = 1;
        while (await hasAfter(hi)) {
                lo = hi;
                hi *= 2;
        }
        while (hi - lo > 1) {
                const mid = Math.floor((lo + hi) / 2);
                if (await hasAfter(mid))
                        lo = mid;
                else
                        hi = mid;
        }
        return lo + 1;
}

async function newestBefore(bound, action, n) {
        for (let k = n; ; k *= 2) {
                const after = Math.max(0, bound - 1 - k);
                const recs = [];
                let a = after;
                for (;;) {
                        const page = await api('GET', '/v1/audit', null, { after: a, limit: 1000, action: action || null });
                        for (const r of page)
                                if (r.id < bound)
                                        recs.push(r);
                        if (page.length < 1000 || page[page.length - 1].id >= bound - 1)
                                break;
                        a = page[page.length - 1].id;
                }
                if (recs.length >= n || after === 0)
                        return recs.slice(-n);
        }
}

function audit(ctx) {
        const tbody = h('tbody', {});
        const action = h('input', { type: 'text', placeholder: 'e.g. device. or token.create', 'data-test': 'audit-action', autocomplete: 'off' });
        const more = h('button', { type: 'button', 'data-test': 'audit-more', onclick: () => older().catch(ctx.error) }, 'Older');
        let oldest = 0;
        function rows(recs) {
                return recs.slice().reverse().map(r => h('tr', { 'data-test': 'audit-row', 'data-id': r.id },
                        h('td', { 'data-label': 'Time' }, relTime(r.time)),
                        h('td', { 'data-label': 'Actor', class: 'mono' }, r.actor),
                        h('td', { 'data-label': 'Action' }, r.action),
                        h('td', { 'data-label': 'Target', class: 'mono' }, asText(r.target)),
                        h('td', { 'data-label': 'Detail', class: 'mono small' }, asText(r.detail)),
                        h('td', { 'data-label': 'Address', class: 'mono' }, asText(r.address))));
        }
        async function load() {
                const recs = await newestBefore(await lastId() + 1, action.value.trim(), 100);
                replace(tbody, recs.length ? rows(recs) : h('tr', {}, h('td', { colspan: 6, class: 'empty' }, 'No records.')));
                oldest = recs.length ? recs[0].id : 0;
                more.disabled = oldest <= 1;
        }
        async function older() {
                const recs = await newestBefore(oldest, action.value.trim(), 100);
                for (const tr of rows(recs))
                        tbody.appendChild(tr);
                oldest = recs.length ? recs[0].id : 0;
                more.disabled = !recs.length || oldest <= 1;
        }
        const form = h('form', { class: 'row', role: 'search', onsubmit: e => {
                e.preventDefault();
                load().catch(ctx.error);
        } }, field('Action (prefix)', action), h('button', { type: 'submit' }, 'Filter'));
        return [h('section', { 'aria-labelledby': 'h-audit' }, h('h2', { id: 'h-audit' }, 'Audit log'),
                  h('p', { class: 'hint' }, 'Newest first.'), form,
                  table(['Time', 'Actor', 'Action', 'Target', 'Detail', 'Address'], tbody), h('div', { class: 'pager' }, more)), load];
}

export async function render(main, ctx) {
        const parts = [];
        if (can('provision:write'))
                parts.push(provisioning(ctx));
        if (can('admin'))
                parts.push(apiTokens(ctx), audit(ctx));
        replace(main, h('h1', {}, 'Access'),
                parts.length ? parts.map(p => p[0]) : h('p', { class: 'hint' }, 'This token cannot manage tokens or read the audit log.'));
        await Promise.all(parts.map(p => p[1]()));
        if (ctx.page.active)
                ctx.ready('access');
}
