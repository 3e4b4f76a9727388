// SPDX-License-Identifier: Apache-2.0
// #/device/ID: one device: its state, functions, variables, live events,
// OTA jobs, tags, name and notes, and revocation.

import { h, replace, relTime, setRelTime, tagChips, field, asText, fmtTime } from './dom.js';
import { api, enc, can, restricted, deviceNameReachable } from './api.js';
import { eventJSON } from './events.js';
import { agentVersion, osText, stateCell } from './fleet.js';

const TAIL_MAX = 200;

export async function render(main, ctx, id) {
        const path = '/v1/devices/' + enc(id);
        let d = await api('GET', path);
        if (!ctx.page.active)
                return;
        document.title = 'tether — ' + (d.name || d.id);

        const title = h('h1', {}, d.name || d.id);
        const stateBox = h('span', {});
        const heard = relTime(d.last_heard);
        const facts = h('dl', { class: 'facts' });
        const tail = h('ul', { class: 'event-tail', 'data-test': 'event-tail', 'aria-live': 'off' });
        const tailEmpty = h('p', { class: 'hint' }, can('events:read')
                ? 'Events this device publishes appear here as they arrive (newest first, at most ' + TAIL_MAX + ').'
                : 'This token may not read events (events:read).');
        const vars = new Map();   // name → value element

        function renderHeader() {
                title.textContent = d.name || d.id;
                replace(stateBox, stateCell(d.connected), d.revoked ? h('span', { class: 'badge warn' }, 'revoked') : null);
                setRelTime(heard, d.last_heard);
                const s = d.system || {};
                const rows = [
                        ['ID', h('span', { class: 'mono' }, d.id)],
                        ['State', stateBox],
                        ['Last heard', heard],
                        ['IP address', d.last_ip_address || '—'],
                        ['Agent', agentVersion(d) || '—'],
                        ['OS', osText(d) || '—'],
                        ['Kernel', s.kernel || '—'],
                        ['Certificate', d.certificate ? (d.certificate.state || '') + ', until ' + fmtTime(d.certificate.not_after) : '—'],
                        ['Registered', fmtTime(d.registered_at) + (d.registered_by ? ' by ' + d.registered_by : '')],
                ];
                if (d.revoked)
                        rows.push(['Revoked', fmtTime(d.revoked_at) + (d.revoked_reason ? ': ' + d.revoked_reason : '')]);
                const pk = Object.entries(s.packages || {});
                if (pk.length)
                        rows.push(['Packages', pk.map(([k, v]) => k + ' ' + v).join(', ')]);
                replace(facts, rows.map(([k, v]) => [h('dt', {}, k), h('dd', {}, v)]));
        }
        renderHeader();

        async function reload() {
                d = await api('GET', path);
                if (!ctx.page.active)
                        return;
                renderHeader();
                renderTags();
                renderRevocation();
        }

        // Functions: one form each.
        // A name the API keeps for itself (deviceNameReachable()): shown, not offered.
        const unreachable = name => h('small', { class: 'hint', 'data-test': 'name-unreachable' },
                ' (the API cannot reach a device\'s "' + name + '" from here)');
        function fnForm(name) {
                if (!deviceNameReachable(name, false))
                        return h('p', { class: 'fn', 'data-test': 'fn-form', 'data-name': name },
                                 h('span', { class: 'fn-name mono' }, name), unreachable(name));
                const arg = h('input', { type: 'text', 'data-test': 'fn-arg', autocomplete: 'off', 'aria-label': 'Argument for ' + name });
                const out = h('output', { 'data-test': 'call-result', class: 'result', 'aria-live': 'polite' });
                const btn = h('button', { type: 'submit', 'data-test': 'fn-call' }, 'Call');
                return h('form', { class: 'fn', 'data-test': 'fn-form', 'data-name': name, onsubmit: async e => {
                        e.preventDefault();
                        btn.disabled = true;
                        out.className = 'result busy';
                        out.textContent = 'calling…';
                        try {
                                const r = await api('POST', path + '/' + enc(name), { arg: arg.value });
                                out.className = 'result ok';
                                out.textContent = asText(r.return_value);
                        } catch (err) {
                                out.className = 'result bad';
                                out.textContent = 'Error: ' + err.message;
                        } finally {
                                btn.disabled = false;
                        }
                } }, h('span', { class: 'fn-name mono' }, name), arg, btn, out);
        }
        const fns = Array.isArray(d.functions) ? d.functions.map(String) : [];
        const fnSection = h('section', { 'aria-labelledby': 'h-fn' }, h('h2', { id: 'h-fn' }, 'Functions'),
                !fns.length ? h('p', { class: 'hint' }, 'No functions (or the device has not described itself yet).')
                : can('functions:call') ? fns.map(fnForm)
                : h('p', {}, fns.join(', '), h('span', { class: 'hint' }, ' (this token may not call functions)')));

        // Variables: value, Refresh, and live updates from tether/var/NAME.
        const live = h('input', { type: 'checkbox', 'data-test': 'var-live', checked: true });
        async function readVar(name) {
                const el = vars.get(name);
                el.classList.add('busy');
                try {
                        const r = await api('GET', path + '/' + enc(name));
                        setValue(el, asText(r.result));
                        el.classList.remove('bad');
                } catch (err) {
                        setValue(el, 'Error: ' + err.message);
                        el.classList.add('bad');
                } finally {
                        el.classList.remove('busy');
                }
        }
        // One line each (the whole value in its title): rows keep their height.
        function setValue(el, text) {
                el.textContent = text;
                el.title = text;
        }
        const varTypes = d.variables && typeof d.variables === 'object' ? d.variables : {};
        const units = d.units && typeof d.units === 'object' ? d.units : {};
        const varRows = Object.entries(varTypes).map(([name, type]) => {
                const val = h('span', { class: 'var-value mono', 'data-test': 'var-value' }, '—');
                const reachable = deviceNameReachable(name, true);
                vars.set(name, val);
                return h('tr', { 'data-test': 'var-row', 'data-name': name },
                        h('td', { 'data-label': 'Variable', class: 'mono' }, name),
                        h('td', { 'data-label': 'Type' }, asText(type) + (units[name] ? ' (' + asText(units[name]) + ')' : '')),
                        h('td', { 'data-label': 'Value' }, val),
                        h('td', {}, reachable ? h('button', { type: 'button', 'data-test': 'var-refresh', 'aria-label': 'Refresh ' + name,
                                                              onclick: () => readVar(name) }, 'Refresh')
                                             : unreachable(name)));
        });
        const varSection = h('section', { 'aria-labelledby': 'h-var' }, h('h2', { id: 'h-var' }, 'Variables'),
                varRows.length ? [h('label', { class: 'inline' }, live, ' update live from the device\'s tether/var events'),
                                  h('div', { class: 'table-wrap' }, h('table', { class: 'cards' },
                                    h('thead', {}, h('tr', {}, ['Variable', 'Type', 'Value', ''].map(t => h('th', { scope: 'col' }, t)))),
                                    h('tbody', {}, varRows)))]
                : h('p', { class: 'hint' }, 'No variables.'));

        // Tags, name and notes.
        const writable = can('devices:write');
        const tagsWritable = writable && !restricted();
        const chips = h('div', { class: 'chips' });
        async function patch(body, status) {
                const r = await api('PUT', path, body);
                d.name = r.name;
                d.notes = r.notes;
                d.tags = r.tags;
                renderHeader();
                renderTags();
                if (status)
                        status.textContent = 'Saved.';
                return r;
        }
        function renderTags() {
                replace(chips, Object.keys(d.tags || {}).length
                        ? tagChips(d.tags, tagsWritable ? k => patch({ tags: { [k]: null } }).catch(ctx.error) : null)
                        : h('span', { class: 'hint' }, 'no tags'));
        }
        renderTags();
        const tagInput = h('input', { type: 'text', 'data-test': 'tag-input', placeholder: 'name=value', autocomplete: 'off' });
        const tagForm = tagsWritable ? h('form', { class: 'row', onsubmit: e => {
                e.preventDefault();
                const t = tagInput.value.trim();
                if (!t)
                        return;
                const i = t.indexOf('=');
                const k = i < 0 ? t : t.slice(0, i);
                const v = i < 0 ? '' : t.slice(i + 1);
                patch({ tags: { [k]: v } }).then(() => { tagInput.value = ''; }, ctx.error);
        } }, field('Add tag', tagInput), h('button', { type: 'submit', 'data-test': 'tag-add' }, 'Add tag')) : null;

        const nameInput = h('input', { type: 'text', 'data-test': 'name-input', value: d.name || '', autocomplete: 'off',
                                       placeholder: 'A-Z a-z 0-9 _ . - (empty: none)' });
        const nameStatus = h('span', { class: 'hint', role: 'status' });
        const notes = writable
                ? h('textarea', { 'data-test': 'notes', rows: 4, maxlength: 4096 }, d.notes || '')
                : h('p', { 'data-test': 'notes', class: 'notes' }, d.notes || '');
        const notesStatus = h('span', { class: 'hint', role: 'status' });
        const metaSection = h('section', { 'aria-labelledby': 'h-meta' }, h('h2', { id: 'h-meta' }, 'Tags and notes'),
                chips, tagForm,
                writable ? h('form', { class: 'row', onsubmit: e => {
                        e.preventDefault();
                        nameStatus.textContent = '';
                        patch({ name: nameInput.value.trim() || null }, nameStatus).catch(ctx.error);
                } }, field('Name', nameInput), h('button', { type: 'submit', 'data-test': 'name-save' }, 'Save name'), nameStatus) : null,
                writable ? h('form', { class: 'notes-form', onsubmit: e => {
                        e.preventDefault();
                        notesStatus.textContent = '';
                        patch({ notes: notes.value || null }, notesStatus).catch(ctx.error);
                } }, field('Notes', notes),
                  h('div', { class: 'row' }, h('button', { type: 'submit', 'data-test': 'notes-save' }, 'Save notes'), notesStatus))
                : h('div', {}, h('h3', {}, 'Notes'), notes));

        // OTA jobs of this device.
        const jobsBody = h('tbody', {});
        async function loadJobs() {
                const jobs = (await api('GET', '/v1/ota/jobs')).filter(j => j.device === d.id);
                if (!ctx.page.active)
                        return;
                replace(jobsBody, jobs.length ? jobs.map(j => h('tr', { 'data-test': 'ota-row', 'data-id': j.job },
                        h('td', { 'data-label': 'Job', class: 'mono' }, j.job),
                        h('td', { 'data-label': 'Package' }, (j.package || '') + ' ' + (j.version || '')),
                        h('td', { 'data-label': 'State' }, j.state + (j.progress && j.state === 'downloading' && j.progress.total
                                ? ' ' + Math.floor(100 * j.progress.bytes / j.progress.total) + '%' : '')),
                        h('td', { 'data-label': 'Code' }, [j.code, j.reason].filter(Boolean).join(': ')),
                        h('td', { 'data-label': 'Updated' }, relTime(j.updated_at))))
                        : h('tr', {}, h('td', { colspan: 5, class: 'empty' }, 'No OTA jobs for this device.')));
        }
        const otaSection = can('ota:write') && !restricted()
                ? h('section', { 'aria-labelledby': 'h-ota' }, h('h2', { id: 'h-ota' }, 'OTA updates'),
                    h('div', { class: 'table-wrap' }, h('table', { class: 'cards' },
                      h('thead', {}, h('tr', {}, ['Job', 'Package', 'State', 'Code', 'Updated'].map(t => h('th', { scope: 'col' }, t)))),
                      jobsBody)))
                : null;

        // Revocation (admin), in the header: nothing above it changes size later.
        const revokeBtn = h('button', { type: 'button', class: 'bad', 'data-test': 'revoke', onclick: revoke }, 'Revoke device…');
        const unrevokeBtn = h('button', { type: 'button', 'data-test': 'unrevoke', onclick: unrevoke }, 'Unrevoke');
        function renderRevocation() {
                revokeBtn.hidden = !!d.revoked;
                unrevokeBtn.hidden = !d.revoked;
        }
        renderRevocation();

        async function revoke() {
                if (!window.confirm('Revoke device ' + d.id + '? It is disconnected now and refused until unrevoked.'))
                        return;
                try {
                        await api('PUT', path + '/revocation', {});
                        // The session closes within a second: follow it.
                        for (let i = 0; i < 20 && ctx.page.active; i++) {
                                await reload();
                                if (!d.connected)
                                        break;
                                await new Promise(r => setTimeout(r, 500));
                        }
                } catch (err) {
                        ctx.error(err);
                }
        }
        async function unrevoke() {
                try {
                        await api('DELETE', path + '/revocation');
                        await reload();
                } catch (err) {
                        ctx.error(err);
                }
        }

        replace(main,
                h('p', { class: 'crumbs' }, h('a', { href: '#/fleet' }, '← Fleet')),
                h('div', { class: 'title-row' }, title,
                  can('admin') ? h('div', { class: 'row', title: 'A revoked device is disconnected and refused at every later connection until it is unrevoked.' },
                    revokeBtn, unrevokeBtn) : null),
                facts,
                h('div', { class: 'device-grid' },
                  h('div', {}, fnSection, varSection),
                  h('div', {}, metaSection,
                    h('section', { 'aria-labelledby': 'h-ev' }, h('h2', { id: 'h-ev' }, 'Live events'), tailEmpty, tail),
                    otaSection)));
        ctx.ready('device');

        // Live updates.
        ctx.onEvent(ev => {
                if (ev.coreid !== d.id)
                        return;
                if (ev.name === 'tether/device/revoked' || ev.name === 'tether/device/unrevoked' || ev.name === 'tether/device/updated') {
                        reload().catch(() => {});
                } else if (!ev.name.startsWith('tether/device/')) {
                        if (!d.connected) {
                                d.connected = true;
                                renderHeader();
                        }
                        d.last_heard = ev.received_at || ev.published_at;
                        setRelTime(heard, d.last_heard);
                }
                if (ev.name.startsWith('tether/var/') && live.checked) {
                        const el = vars.get(ev.name.slice('tether/var/'.length));
                        if (el)
                                setValue(el, asText(ev.data));
                }
                if (ev.name.startsWith('tether/ota/') && otaSection)
                        loadJobs().catch(() => {});
                const when = ev.published_at || ev.received_at;
                tail.insertBefore(h('li', { 'data-test': 'event-row', class: 'event' },
                        h('span', { class: 'ev-time' }, relTime(when)),
                        h('span', { class: 'ev-name mono' }, ev.name),
                        h('span', { class: 'ev-data mono' }, asText(ev.data))), tail.firstChild);
                while (tail.children.length > TAIL_MAX)
                        tail.removeChild(tail.lastChild);
        });

        // The cloud publishes no event when a session ends: read the state again.
        const timer = setInterval(async () => {
                try {
                        const n = await api('GET', path);
                        if (!ctx.page.active || (n.connected === d.connected && n.revoked === d.revoked))
                                return;
                        Object.assign(d, { connected: n.connected, last_heard: n.last_heard, revoked: n.revoked,
                                           revoked_at: n.revoked_at, revoked_reason: n.revoked_reason,
                                           last_ip_address: n.last_ip_address });
                        renderHeader();
                        renderRevocation();
                } catch {
                        // the next round tries again; the banner is for what the user did
                }
        }, 15000);
        ctx.onLeave(() => clearInterval(timer));
        if (otaSection)
                loadJobs().catch(ctx.error);
        if (d.connected)
                for (const name of vars.keys())
                        if (deviceNameReachable(name, true))
                                readVar(name);
}
