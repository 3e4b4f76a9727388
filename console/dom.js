// SPDX-License-Identifier: Apache-2.0
// DOM helpers. Text only ever becomes a text node: h() appends strings with
// createTextNode and sets attributes with setAttribute, so nothing a device,
// an event or the API sends is parsed as HTML.

// h('tag', {attrs}, ...children): "class", "for" and data-* as attributes;
// on* only as functions from this code (never strings); value/checked/...
// as properties. Children: nodes, strings, numbers, arrays, null (skipped).
export function h(tag, attrs, ...children) {
        const el = document.createElement(tag);
        for (const [k, v] of Object.entries(attrs || {})) {
                if (v === null || v === undefined || v === false)
                        continue;
                if (k.startsWith('on')) {
                        if (typeof v !== 'function')
                                throw new TypeError('event handlers must be functions');
                        el.addEventListener(k.slice(2), v);
                } else if (k === 'value' || k === 'checked' || k === 'disabled' || k === 'selected' ||
                           k === 'multiple' || k === 'required' || k === 'hidden') {
                        el[k] = v;
                } else if (k === 'href') {
                        if (typeof v !== 'string' || !v.startsWith('#/'))
                                throw new TypeError('only #/ links');
                        el.setAttribute('href', v);
                } else {
                        el.setAttribute(k, v === true ? '' : String(v));
                }
        }
        append(el, children);
        return el;
}

export function append(el, children) {
        for (const c of children) {
                if (c === null || c === undefined || c === false)
                        continue;
                if (Array.isArray(c))
                        append(el, c);
                else if (c instanceof Node)
                        el.appendChild(c);
                else
                        el.appendChild(document.createTextNode(String(c)));
        }
        return el;
}

export function clear(el) {
        while (el.firstChild)
                el.removeChild(el.firstChild);
        return el;
}

export function replace(el, ...children) {
        return append(clear(el), children);
}

// A link to a device page: the only href built from data.
export function deviceLink(id, text) {
        return h('a', { href: '#/device/' + encodeURIComponent(id) }, text ?? id);
}

// "3 min ago" for an RFC 3339 time; elements made by relTime() are
// refreshed every 10 s by tickRelTimes().
export function ago(t) {
        if (!t)
                return 'never';
        const ms = Date.parse(t);
        if (Number.isNaN(ms))
                return String(t);
        const s = Math.round((Date.now() - ms) / 1000);
        if (s < 5)
                return 'just now';
        if (s < 60)
                return s + ' s ago';
        if (s < 3600)
                return Math.floor(s / 60) + ' min ago';
        if (s < 86400)
                return Math.floor(s / 3600) + ' h ago';
        return Math.floor(s / 86400) + ' d ago';
}

export function relTime(t) {
        const el = h('time', { class: 'rel' }, ago(t));
        if (t) {
                el.dataset.t = t;
                el.setAttribute('datetime', t);
                el.title = t;
        }
        return el;
}

export function setRelTime(el, t) {
        el.dataset.t = t || '';
        el.textContent = ago(t);
        if (t)
                el.title = t;
}

export function tickRelTimes() {
        for (const el of document.querySelectorAll('time.rel'))
                if (el.dataset.t)
                        el.textContent = ago(el.dataset.t);
}

export function fmtTime(t) {
        if (t === null || t === undefined || t === '')
                return '—';
        if (typeof t === 'number')
                return new Date(t * 1000).toISOString().replace('.000Z', 'Z');
        return String(t);
}

// A value as text: strings as they are, anything else as JSON.
export function asText(v) {
        if (v === null || v === undefined)
                return '';
        return typeof v === 'string' ? v : JSON.stringify(v);
}

// Tags {K: V} as chips; remove(K) adds a remove button to each.
export function tagChips(tags, remove) {
        return Object.entries(tags || {}).map(([k, v]) =>
                h('span', { class: 'chip', 'data-test': 'tag-chip', 'data-tag': k },
                  v === '' ? k : k + '=' + v,
                  remove ? h('button', { type: 'button', class: 'chip-x', 'data-test': 'tag-remove',
                                         'aria-label': 'Remove tag ' + k, title: 'Remove tag ' + k,
                                         onclick: () => remove(k) }, '×') : null));
}

// A labelled form field: label text, then the control.
export function field(label, control, hint) {
        return h('label', { class: 'field' }, h('span', { class: 'field-label' }, label), control,
                 hint ? h('small', { class: 'hint' }, hint) : null);
}
