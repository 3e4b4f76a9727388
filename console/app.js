// SPDX-License-Identifier: Apache-2.0
// The console's entry point: login, navigation, hash routes, error banner.

import { h, replace, clear, tickRelTimes } from './dom.js';
import * as A from './api.js';
import * as events from './events.js';
import * as fleet from './fleet.js';
import * as device from './device.js';
import * as campaigns from './campaigns.js';
import * as access from './access.js';

const main = document.getElementById('main');
const nav = document.getElementById('nav');
const navToggle = document.getElementById('nav-toggle');
const banner = document.getElementById('error');

const routes = [
        [/^#\/fleet$/, fleet.render, 'fleet'],
        [/^#\/device\/([^/]+)$/, device.render, 'fleet'],
        [/^#\/campaigns$/, campaigns.renderList, 'campaigns'],
        [/^#\/campaign\/([^/]+)$/, campaigns.renderOne, 'campaigns'],
        [/^#\/access$/, access.render, 'access'],
];

let page = null;   // { active, cleanup }

export function showError(e) {
        const msg = e instanceof Error ? e.message : String(e);
        replace(banner, h('span', { class: 'error-text' }, msg),
                h('button', { type: 'button', class: 'link', 'aria-label': 'Dismiss error',
                              onclick: hideError }, 'Dismiss'));
        banner.hidden = false;
        if (e && e.status === 401)
                logoutNow();
}

export function hideError() {
        banner.hidden = true;
        clear(banner);
}

function setReady(name) {
        document.body.dataset.ready = name;
}

function leave() {
        if (page) {
                page.active = false;
                for (const fn of page.cleanups)
                        fn();
        }
        page = null;
        delete document.body.dataset.ready;
}

function logoutNow() {
        A.logout();
        events.stop();
        leave();
        renderNav();
        renderLogin();
}

function renderNav() {
        const who = A.current();
        nav.hidden = !who;
        navToggle.hidden = !who;
        if (!who) {
                clear(nav);
                return;
        }
        const link = (name, text) => h('a', { href: '#/' + name, 'data-test': 'nav-' + name, 'data-page': name }, text);
        replace(nav,
                A.can('devices:read') ? link('fleet', 'Fleet') : null,
                A.can('ota:write') && !A.restricted() ? link('campaigns', 'Campaigns') : null,
                A.can('admin') || A.can('provision:write') ? link('access', 'Access') : null,
                h('span', { class: 'nav-who', title: 'Token ' + (who.id || '') }, who.name || who.id || 'token'),
                h('span', { class: 'stream', id: 'stream-state', role: 'status' }, ''),
                h('button', { type: 'button', 'data-test': 'logout', onclick: () => {
                        history.replaceState(null, '', '#/fleet');
                        logoutNow();
                } }, 'Log out'));
}

function renderLogin(msg) {
        document.title = 'tether console — log in';
        const input = h('input', { type: 'password', id: 'token', 'data-test': 'token-input', autocomplete: 'off',
                                   spellcheck: 'false', required: true, placeholder: 'tether_…' });
        const form = h('form', { class: 'login card', onsubmit: async e => {
                e.preventDefault();
                const t = input.value.trim();
                if (!t)
                        return;
                A.setToken(t);
                input.value = '';
                try {
                        await A.login();
                } catch (err) {
                        A.logout();
                        showError(err.status === 401 ? 'That token is not valid: ' + err.message : err);
                        input.focus();
                        return;
                }
                hideError();
                started();
        } },
                h('h1', {}, 'tether console'),
                h('label', { for: 'token' }, 'API token'),
                input,
                h('p', { class: 'hint' }, 'The token stays in this tab (sessionStorage) and is sent only in the ' +
                  'Authorization header. Log out clears it.'),
                h('button', { type: 'submit', class: 'primary', 'data-test': 'login' }, 'Log in'),
                msg ? h('p', { class: 'hint' }, msg) : null);
        replace(main, form);
        input.focus();
        setReady('login');
}

function route() {
        if (!A.current())
                return;
        leave();
        hideError();
        nav.classList.remove('open');
        navToggle.setAttribute('aria-expanded', 'false');
        const hash = location.hash || '#/fleet';
        for (const [re, fn, section] of routes) {
                const m = re.exec(hash);
                if (!m)
                        continue;
                for (const a of nav.querySelectorAll('a[data-page]'))
                        a.classList.toggle('current', a.dataset.page === section);
                page = { active: true, cleanups: [] };
                const ctx = {
                        page,
                        ready: setReady,
                        error: showError,
                        onLeave: fn => page.cleanups.push(fn),
                        onEvent: fn => page.cleanups.push(events.onEvent(fn)),
                };
                clear(main);
                document.title = 'tether — ' + section;
                const arg = m[1] !== undefined ? safeDecode(m[1]) : undefined;
                Promise.resolve(fn(main, ctx, arg)).catch(e => {
                        if (ctx.page.active)
                                showError(e);
                });
                main.focus({ preventScroll: true });
                return;
        }
        location.replace('#/' + (A.can('devices:read') ? 'fleet' : A.can('admin') || A.can('provision:write') ? 'access' : 'fleet'));
}

function safeDecode(s) {
        try {
                return decodeURIComponent(s);
        } catch {
                return s;
        }
}

function started() {
        renderNav();
        if (A.can('events:read'))
                events.start();
        const home = A.can('devices:read') || !(A.can('admin') || A.can('provision:write')) ? '#/fleet' : '#/access';
        if (!location.hash || location.hash === '#' || location.hash === '#/' || (location.hash === '#/fleet' && home !== '#/fleet'))
                history.replaceState(null, '', home);
        route();
}

events.onStatus(s => {
        const el = document.getElementById('stream-state');
        if (el) {
                el.textContent = s === 'live' ? '● live' : s === 'reconnecting' ? '○ reconnecting' : '';
                el.className = 'stream ' + s;
        }
});

navToggle.addEventListener('click', () => {
        const open = nav.classList.toggle('open');
        navToggle.setAttribute('aria-expanded', open ? 'true' : 'false');
});
window.addEventListener('hashchange', route);
setInterval(tickRelTimes, 10000);

(async () => {
        if (!A.token())
                return renderLogin();
        try {
                await A.login();
        } catch (e) {
                A.logout();
                renderLogin(e.status === 401 ? 'The saved token no longer works: ' + e.message : null);
                if (e.status !== 401)
                        showError(e);
                return;
        }
        started();
})();
