// SPDX-License-Identifier: Apache-2.0
// #/campaigns and #/campaign/ID: OTA campaigns (docs/fleet.md, "Campaigns").
// Everything here needs ota:write; the console never holds the signing key:
// manifests are signed offline with `tether ota sign` and uploaded as text.

import { h, replace, relTime, field, fmtTime, deviceLink } from './dom.js';
import { api, enc, can, restricted } from './api.js';
import { eventJSON } from './events.js';

const FINAL_BAD = ['rolled_back', 'rejected', 'failed', 'deferred'];

function allowed() {
        return can('ota:write') && !restricted();
}

function denied(main, ctx) {
        replace(main, h('h1', {}, 'Campaigns'),
                h('p', { class: 'hint' }, 'This token cannot manage OTA campaigns (it needs the ota:write scope and no device restriction).'));
        ctx.ready('campaigns');
}

function progressText(counts, devices) {
        const c = counts || {};
        const failed = FINAL_BAD.reduce((n, k) => n + (c[k] || 0), 0);
        return (c.committed || 0) + '/' + devices + ' committed' + (failed ? ', ' + failed + ' failed' : '');
}

function bar(value, max, label) {
        return h('progress', { value: value, max: Math.max(1, max), 'aria-label': label });
}

export async function renderList(main, ctx) {
        if (!allowed())
                return denied(main, ctx);
        const tbody = h('tbody', {});
        const formBox = h('div', {});
        replace(main,
                h('div', { class: 'title-row' }, h('h1', {}, 'Campaigns'),
                  h('button', { type: 'button', class: 'primary', 'data-test': 'campaign-new',
                                'aria-expanded': 'false', onclick: e => toggleForm(e.currentTarget) }, 'New campaign')),
                formBox,
                h('div', { class: 'table-wrap' }, h('table', { class: 'cards' },
                  h('thead', {}, h('tr', {}, ['Name', 'Update', 'State', 'Phase', 'Progress', 'Created'].map(t => h('th', { scope: 'col' }, t)))),
                  tbody)));

        function toggleForm(btn) {
                if (formBox.firstChild) {
                        replace(formBox);
                        btn.setAttribute('aria-expanded', 'false');
                        return;
                }
                replace(formBox, createForm(ctx));
                btn.setAttribute('aria-expanded', 'true');
                formBox.querySelector('input').focus();
        }

        async function load() {
                const r = await api('GET', '/v1/campaigns');
                if (!ctx.page.active)
                        return;
                const list = r.campaigns || [];
                replace(tbody, list.length ? list.map(c => h('tr', { 'data-test': 'campaign-row', 'data-id': c.id },
                        h('td', { 'data-label': 'Name' }, h('a', { href: '#/campaign/' + enc(c.id) }, c.name || c.id)),
                        h('td', { 'data-label': 'Update' }, (c.package || '') + ' ' + (c.version || '')),
                        h('td', { 'data-label': 'State' }, h('span', { class: 'cstate ' + c.state, 'data-test': 'campaign-state' }, c.state)),
                        h('td', { 'data-label': 'Phase' }, c.phase + ' of ' + (c.phases || []).length),
                        h('td', { 'data-label': 'Progress' }, bar((c.counts || {}).committed || 0, c.devices, 'committed'), ' ',
                          progressText(c.counts, c.devices),
                          h('div', { class: 'small hint' }, (c.phases || []).map((p, i) =>
                                  (i ? ' · ' : '') + p.percent + '%: ' + p.state + ' ' + ((p.counts || {}).committed || 0) + '/' + p.devices))),
                        h('td', { 'data-label': 'Created' }, relTime(c.created_at))))
                        : h('tr', {}, h('td', { colspan: 6, class: 'empty' }, 'No campaigns yet.')));
                ctx.ready('campaigns');
        }
        let t = null;
        ctx.onEvent(ev => {
                if (ev.name.startsWith('tether/campaign/') && !t)
                        t = setTimeout(() => { t = null; load().catch(() => {}); }, 300);
        });
        const timer = setInterval(() => load().catch(() => {}), 10000);
        ctx.onLeave(() => { clearInterval(timer); clearTimeout(t); });
        await load();
}

function createForm(ctx) {
        const name = h('input', { type: 'text', 'data-test': 'campaign-name', maxlength: 128, autocomplete: 'off' });
        const devices = h('textarea', { 'data-test': 'campaign-devices', rows: 3, spellcheck: 'false',
                                        placeholder: 'optional: device IDs, one per line or separated by blanks or commas' });
        const files = h('input', { type: 'file', multiple: true, 'data-test': 'campaign-manifests', required: true });
        const phases = h('input', { type: 'text', 'data-test': 'campaign-phases', value: '10,50,100', autocomplete: 'off' });
        const threshold = h('input', { type: 'number', 'data-test': 'campaign-threshold', min: 0, max: 100, step: 'any', value: '5' });
        const wait = h('input', { type: 'number', 'data-test': 'campaign-wait', min: 0, max: 2592000, value: '0' });
        const submit = h('button', { type: 'submit', class: 'primary', 'data-test': 'campaign-create' }, 'Start campaign');
        return h('form', { class: 'card grid', 'data-test': 'campaign-form', onsubmit: async e => {
                e.preventDefault();
                const manifests = await Promise.all([...files.files].map(f => f.text()));
                const ids = devices.value.split(/[\s,]+/).filter(Boolean);
                const body = {
                        manifests,
                        phases: phases.value.split(/[\s,]+/).filter(Boolean).map(Number),
                        max_failure_rate: Number(threshold.value || 0),
                        phase_wait: Number(wait.value || 0),
                };
                if (name.value.trim())
                        body.name = name.value.trim();
                if (ids.length)
                        body.devices = ids;
                submit.disabled = true;
                try {
                        const r = await api('POST', '/v1/campaigns', body);
                        location.hash = '#/campaign/' + enc(r.campaign.id);
                } catch (err) {
                        ctx.error(err);
                } finally {
                        submit.disabled = false;
                }
        } },
                h('h2', {}, 'New campaign'),
                h('p', { class: 'hint' }, 'Manifests are signed offline with ', h('code', {}, 'tether ota sign'),
                  ' (each names its devices); the console never holds the update signing key. ' +
                  'The package must be uploaded already unless the manifests carry a url.'),
                field('Name', name),
                field('Signed manifests', files, 'one or more files, all for the same update'),
                h('div', { class: 'wide' }, field('Devices', devices, 'optional: the order and subset of the manifests\' devices')),
                field('Phases (%)', phases, 'cumulative percentages ending at 100'),
                field('Max failure rate (%)', threshold, 'a phase failing more pauses the campaign'),
                field('Phase wait (s)', wait),
                submit);
}

export async function renderOne(main, ctx, id) {
        if (!allowed())
                return denied(main, ctx);
        const path = '/v1/campaigns/' + enc(id);
        const head = h('div', {});
        const phases = h('div', { class: 'phases' });
        const actions = h('div', { class: 'row actions' });
        const devBody = h('tbody', {});
        const devInfo = h('span', { class: 'page-info' });
        let devPage = 1;
        let devPages = 1;
        const prev = h('button', { type: 'button', onclick: () => { devPage--; loadDevices().catch(ctx.error); } }, '← Previous');
        const next = h('button', { type: 'button', onclick: () => { devPage++; loadDevices().catch(ctx.error); } }, 'Next →');
        let c = null;

        replace(main, h('p', { class: 'crumbs' }, h('a', { href: '#/campaigns' }, '← Campaigns')),
                head, actions, h('h2', {}, 'Phases'), phases,
                h('h2', {}, 'Devices'),
                h('div', { class: 'table-wrap' }, h('table', { class: 'cards' },
                  h('thead', {}, h('tr', {}, ['Device', 'Phase', 'State', 'Job'].map(t => h('th', { scope: 'col' }, t)))), devBody)),
                h('div', { class: 'pager' }, prev, devInfo, next));

        function act(what, label, cls) {
                return h('button', { type: 'button', class: cls || '', 'data-test': 'campaign-' + what, onclick: async () => {
                        if (what === 'abort' && !window.confirm('Abort campaign ' + (c.name || c.id) + '? This is final.'))
                                return;
                        try {
                                const r = await api('POST', path + '/' + what, {});
                                c = r.campaign;
                                renderCampaign();
                        } catch (err) {
                                ctx.error(err);
                        }
                } }, label);
        }

        function renderCampaign() {
                document.title = 'tether — campaign ' + (c.name || c.id);
                replace(head,
                        h('h1', {}, 'Campaign ', c.name || c.id),
                        h('dl', { class: 'facts' },
                          h('dt', {}, 'State'), h('dd', {}, h('span', { class: 'cstate ' + c.state, 'data-test': 'campaign-state' }, c.state),
                                                    c.paused_reason ? ' — ' + c.paused_reason : ''),
                          h('dt', {}, 'ID'), h('dd', { class: 'mono' }, c.id),
                          h('dt', {}, 'Update'), h('dd', {}, (c.package || '') + ' ' + (c.version || '')),
                          h('dt', {}, 'Devices'), h('dd', {}, String(c.devices), ' — ', progressText(c.counts, c.devices)),
                          h('dt', {}, 'Max failure rate'), h('dd', {}, c.max_failure_rate + '%'),
                          h('dt', {}, 'Phase wait'), h('dd', {}, c.phase_wait + ' s',
                                                       c.next_phase_at ? ' (next phase at ' + fmtTime(c.next_phase_at) + ')' : ''),
                          h('dt', {}, 'Created'), h('dd', {}, fmtTime(c.created_at), c.created_by ? ' by ' + c.created_by : '')));
                replace(actions,
                        c.state === 'running' ? act('pause', 'Pause') : null,
                        c.state === 'paused' ? act('resume', 'Resume', 'primary') : null,
                        c.state === 'running' || c.state === 'paused' ? act('abort', 'Abort…', 'bad') : null);
                replace(phases, (c.phases || []).map((p, i) => {
                        const n = p.counts || {};
                        const final = (n.committed || 0) + FINAL_BAD.reduce((s, k) => s + (n[k] || 0), 0);
                        return h('div', { class: 'phase ' + p.state, 'data-test': 'phase-progress', 'data-phase': i + 1, 'data-state': p.state },
                                h('div', { class: 'phase-head' }, 'Phase ' + (i + 1) + ' · ' + p.percent + '% · ' + p.devices + ' devices · ',
                                  h('strong', {}, p.state)),
                                bar(final, p.devices, 'phase ' + (i + 1) + ' finished devices'),
                                h('div', { class: 'small' }, progressText(n, p.devices),
                                  ['offline', 'sent', 'downloading', 'installing', 'pending'].filter(k => n[k]).map(k => ', ' + n[k] + ' ' + k),
                                  p.failure_rate ? ', failure rate ' + Math.round(p.failure_rate * 10) / 10 + '%' : ''));
                }));
        }

        async function load() {
                const r = await api('GET', path);
                if (!ctx.page.active)
                        return;
                c = r.campaign;
                renderCampaign();
        }

        async function loadDevices() {
                const r = await api('GET', path + '/devices', null, { page: devPage, per_page: 50 });
                if (!ctx.page.active)
                        return;
                devPages = Math.max(1, (r.meta && r.meta.total_pages) || 1);
                replace(devBody, (r.devices || []).map(x => h('tr', {},
                        h('td', { 'data-label': 'Device' }, deviceLink(x.device)),
                        h('td', { 'data-label': 'Phase' }, String(x.phase)),
                        h('td', { 'data-label': 'State' }, x.state),
                        h('td', { 'data-label': 'Job', class: 'mono' }, x.job || '—'))));
                devInfo.textContent = 'Page ' + devPage + ' of ' + devPages;
                prev.disabled = devPage <= 1;
                next.disabled = devPage >= devPages;
        }

        await load();
        await loadDevices();
        ctx.ready('campaign');

        // Live: the campaign's own events, its devices' OTA events (throttled),
        // and polling while it runs, in case the stream is down.
        let t = null;
        const refresh = () => {
                if (!t)
                        t = setTimeout(() => { t = null; load().then(loadDevices).catch(() => {}); }, 500);
        };
        ctx.onEvent(ev => {
                if (ev.name === 'tether/campaign/' + c.id || (ev.name.startsWith('tether/ota/') && eventJSON(ev).package === c.package))
                        refresh();
        });
        const timer = setInterval(() => {
                if (c.state === 'running' || c.state === 'paused')
                        refresh();
        }, 3000);
        ctx.onLeave(() => { clearInterval(timer); clearTimeout(t); });
}
