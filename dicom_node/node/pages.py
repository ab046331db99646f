"""What an operator looks at in a browser: the jobs list and one page per job, with the lesions' pictures.

A PACS administrator must see what a job did to a study without exporting it: for each
lesion an oblique view along the vessel, original and derived side by side with the
restored region outlined (``pipeline/pictures.py``, made once when the job is processed
and kept in the spool), the lesion table, the timings, attempts and deliveries, and a
link to the study in the site's viewer (``viewer.url_template``).

The pages are shells: static HTML and a little JavaScript that read the same JSON API
(``/jobs``, ``/jobs/{id}``) and pictures (``/jobs/{id}/pictures/...``) any client reads, so
they keep its bearer-token rules exactly. The shells themselves hold no data, so a
browser may load them without a token; with tokens configured, the page asks for one,
keeps it for the browser tab only (``sessionStorage``), and sends it on every request.
The list refreshes its data in place every few seconds (no page reload: a reader's
scroll position and selection stay), touching only the rows that changed, so a hundred
jobs stay cheap.
"""

from __future__ import annotations

import html
import re
import string
from typing import Any
from urllib.parse import quote

PICTURE_NAME = re.compile(r"^(lesion-\d{1,5}|thumb)\.png$")
REFRESH_MS = 4000
LIST_LIMIT = 100

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.2em;color:#1d2330;background:#fafbfc}
h1{font-size:1.4em;margin:0 0 .3em} h2{font-size:1.1em;margin:1.2em 0 .4em}
table{border-collapse:collapse;width:100%;background:#fff}
td,th{padding:3px 8px;border-bottom:1px solid #e3e6ea;text-align:left;vertical-align:middle;font-size:.92em}
th{background:#eef1f4;position:sticky;top:0}
tr.failed td{background:#fff1f0} tr.done td.state{color:#17702e} tr.failed td.state{color:#b3261e}
img.thumb{width:96px;height:auto;display:block;background:#000}
.muted{color:#6b7280} .warn{color:#b3261e;font-weight:600}
#auth{display:none;padding:.6em;background:#fff7e0;border:1px solid #e6c200;margin:.6em 0}
figure{display:inline-block;margin:0 1em 1em 0;vertical-align:top} figcaption{font-size:.85em}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 12px;margin:0} dt{color:#6b7280}
"""

_SCRIPT = """
const TOKEN_KEY = 'dicom-node-token';
function token() { return sessionStorage.getItem(TOKEN_KEY) || ''; }
function askToken(why) {
  const box = document.getElementById('auth');
  box.style.display = 'block';
  document.getElementById('auth-why').textContent = why;
}
function saveToken(ev) {
  ev.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, document.getElementById('token').value.trim());
  document.getElementById('auth').style.display = 'none';
  refresh();
}
async function api(path) {
  const headers = {'Accept': 'application/json'};
  if (token()) headers['Authorization'] = 'Bearer ' + token();
  const r = await fetch(path, {headers});
  if (r.status === 401) {
    askToken(token() ? 'That token was refused.' : 'This node needs a bearer token.');
    return null;
  }
  if (!r.ok) throw new Error(path + ': HTTP ' + r.status);
  return r;
}
const blobs = new Map();  // picture URL -> object URL: each picture is fetched once per page
async function picture(img, path) {
  if (!blobs.has(path)) {
    const r = await api(path);
    if (!r) return;
    blobs.set(path, URL.createObjectURL(await r.blob()));
  }
  img.src = blobs.get(path);
}
function text(v) { return v === null || v === undefined ? '' : String(v); }
function cell(tr, v, cls) {
  const td = tr.insertCell(); td.textContent = text(v); if (cls) td.className = cls; return td;
}
function when(iso) { return iso ? iso.replace('T', ' ').replace(/\\.\\d+Z$/, 'Z') : ''; }
"""

_LIST_SCRIPT = """
const rows = new Map();  // job id -> [row, JSON it shows]
async function refresh() {
  let r;
  try { r = await api('/jobs?limit=%(limit)d'); }
  catch (e) { document.getElementById('status').textContent = e; return; }
  if (!r) return;
  const jobs = await r.json();
  const body = document.getElementById('jobs');
  const seen = new Set();
  jobs.forEach((j, i) => {
    seen.add(j.id);
    const shown = JSON.stringify(j);
    let entry = rows.get(j.id);
    if (!entry || entry[1] !== shown) {
      const tr = document.createElement('tr');
      tr.id = 'job-' + j.id;
      tr.className = j.state;
      const a = document.createElement('a');
      a.href = '/jobs/' + j.id; a.textContent = j.id;
      tr.insertCell().appendChild(a);
      const pic = tr.insertCell();
      if (j.pictures && j.pictures.length) {
        const img = document.createElement('img');
        img.className = 'thumb'; img.alt = 'lesion ' + j.pictures[0].lesion;
        pic.appendChild(img);
        picture(img, '/jobs/' + j.id + '/pictures/thumb.png');
      }
      cell(tr, j.state, 'state'); cell(tr, j.description); cell(tr, j.instances);
      cell(tr, j.lesions ? j.lesions.length : ''); cell(tr, when(j.received_at)); cell(tr, when(j.finished_at));
      cell(tr, j.reason);
      if (entry) body.replaceChild(tr, entry[0]); else body.appendChild(tr);
      entry = [tr, shown];
      rows.set(j.id, entry);
    }
    if (body.children[i] !== entry[0]) body.insertBefore(entry[0], body.children[i] || null);
  });
  for (const [id, entry] of rows) if (!seen.has(id)) { entry[0].remove(); rows.delete(id); }
  document.getElementById('status').textContent = jobs.length + ' jobs, updated ' + new Date().toLocaleTimeString();
}
refresh();
setInterval(refresh, %(refresh)d);
"""

_JOB_SCRIPT = """
const JOB = %(job)d;
let last = '';
async function refresh() {
  let r;
  try { r = await api('/jobs/' + JOB); }
  catch (e) { document.getElementById('status').textContent = e; return; }
  if (!r) return;
  const j = await r.json();
  const shown = JSON.stringify(j);
  if (shown === last) return;
  last = shown;
  document.getElementById('title').textContent = 'Job ' + j.id + ': ' + (j.description || '(no description)');
  const facts = document.getElementById('facts');
  facts.innerHTML = '';
  const fact = (k, v) => { if (v === '' || v === null || v === undefined) return;
    const dt = document.createElement('dt'); dt.textContent = k; const dd = document.createElement('dd');
    dd.textContent = text(v); facts.append(dt, dd); return dd; };
  fact('state', j.state); fact('reason', j.reason); fact('series', j.series_uid); fact('study', j.study_uid);
  fact('derived series', j.derived_series_uid); fact('instances', j.instances);
  fact('received', when(j.received_at)); fact('last instance', when(j.last_instance_at));
  fact('queued', when(j.queued_at)); fact('processing', when(j.processing_at)); fact('sending', when(j.sending_at));
  fact('finished', when(j.finished_at)); fact('processing runs', j.processing_runs);
  fact('delivery attempts', j.attempts);
  const steps = Object.entries(j.timings || {}).filter(([k]) => k !== 'total');
  if (steps.length) fact('processing steps (s)', steps.map(([k, v]) => k + ' ' + v.toFixed(2)).join(', ')
                         + '; total ' + (j.timings.total || 0).toFixed(1));
  if (j.viewer_url) {
    const dd = fact('viewer', ' ');
    const a = document.createElement('a'); a.href = j.viewer_url; a.textContent = 'open the study in the viewer';
    a.id = 'viewer-link'; dd.textContent = ''; dd.appendChild(a);
  }
  const del = document.getElementById('deliveries'); del.innerHTML = '';
  for (const [name, d] of Object.entries(j.deliveries || {})) {
    const claims = Object.entries((j.sends || {})[name] || {})
      .map(([epoch, n]) => 'claim ' + epoch + ': ' + n.stored + ' stored'
                           + (n.refused ? ', ' + n.refused + ' refused' : ''));
    const tr = del.insertRow(); cell(tr, name); cell(tr, d.state); cell(tr, when(d.at)); cell(tr, claims.join('; '));
    cell(tr, d.error || '');
  }
  const les = document.getElementById('lesions'); les.innerHTML = '';
  for (const l of j.lesions || []) {
    const tr = les.insertRow();
    cell(tr, l.lesion); cell(tr, l.region);
    cell(tr, l.position_mm ? l.position_mm.map(v => v.toFixed(1)).join(', ') : '');
    cell(tr, l.volume_mm3 !== undefined ? l.volume_mm3.toFixed(1) : '');
    cell(tr, l.peak_hu !== undefined ? Math.round(l.peak_hu) : '');
    cell(tr, l.voxels);
    const d = l.disagreement_hu;
    cell(tr, d === null || d === undefined ? 'not measured' : d + ' HU (' + (l.measure || 'flip') + ')');
    const v = l.vessel_mm;
    const lv = l.lumen_hu;
    cell(tr, (v === null || v === undefined ? 'not measured' : v.toFixed(1) + ' mm') +
             (lv === null || lv === undefined ? '' : ', lumen ' + lv + ' HU'));
    const e = l.enclosure, enclosure = e === null || e === undefined ? '' : '(enclosure ' + e.toFixed(2) + ')';
    cell(tr, [l.estimate || '', enclosure].filter(Boolean).join(' '));
    cell(tr, l.action + (l.why && l.why.length ? ': ' + l.why.join('; ') : ''), l.unsure ? 'warn' : '');
  }
  const pics = document.getElementById('pictures'); pics.innerHTML = '';
  for (const p of j.pictures || []) {
    const fig = document.createElement('figure');
    const img = document.createElement('img'); img.alt = 'lesion ' + p.lesion; img.className = 'lesion';
    const cap = document.createElement('figcaption');
    cap.textContent = 'Lesion ' + p.lesion + ': original (left) and calcium removed (right), along the vessel; ' +
                      'the restored region outlined';
    fig.append(img, cap); pics.appendChild(fig);
    picture(img, '/jobs/' + JOB + '/pictures/' + p.file);
  }
  document.getElementById('no-pictures').style.display = (j.pictures || []).length ? 'none' : 'block';
  document.getElementById('status').textContent = 'updated ' + new Date().toLocaleTimeString();
}
refresh();
setInterval(refresh, %(refresh)d);
"""

_AUTH = """<form id="auth" onsubmit="saveToken(event)"><span id="auth-why"></span>
<label> Bearer token: <input id="token" type="password" autocomplete="off" size="40"></label>
<button type="submit">Use</button> <span class="muted">(kept in this browser tab only)</span></form>"""


def _page(title: str, body: str, script: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>{_AUTH}{body}"
            f"<script>{_SCRIPT}{script}</script></body></html>")


def list_page(ae_title: str) -> str:
    """The jobs list: newest first, a thumbnail of each processed job's first lesion, a link to its page."""
    body = (f"<h1>dicom-node <span class='muted'>{html.escape(ae_title)}</span></h1>"
            "<p id='status' class='muted'>loading…</p>"
            "<table><thead><tr><th>job</th><th>lesion</th><th>state</th><th>series</th><th>instances</th>"
            "<th>lesions</th><th>received</th><th>finished</th><th>reason</th></tr></thead>"
            "<tbody id='jobs'></tbody></table>")
    return _page("dicom-node jobs", body, _LIST_SCRIPT % {"limit": LIST_LIMIT, "refresh": REFRESH_MS})


def job_page(job_id: int) -> str:
    """One job: what it is, what happened when, where it went, and what it did to each lesion."""
    body = ("<p><a href='/'>← all jobs</a></p><h1 id='title'>Job %d</h1><p id='status' class='muted'>loading…</p>"
            "<dl id='facts'></dl>"
            "<h2>Lesions</h2><table><thead><tr><th>lesion</th><th>region</th><th>position (patient, mm)</th>"
            "<th>calcium mm³</th><th>peak HU</th><th>voxels restored (region)</th><th>confidence: "
            "disagreement</th><th>vessel calibre, lumen</th><th>estimate written</th><th>done</th></tr></thead>"
            "<tbody id='lesions'></tbody></table>"
            "<h2>Pictures</h2><p id='no-pictures' class='muted'>none (not processed, or no calcium)</p>"
            "<div id='pictures'></div>"
            "<h2>Deliveries</h2><table><thead><tr><th>destination</th><th>state</th><th>at</th>"
            "<th>instances sent, per claim</th><th>error</th>"
            "</tr></thead><tbody id='deliveries'></tbody></table>").replace("%d", str(int(job_id)), 1)
    return _page(f"dicom-node job {job_id}", body, _JOB_SCRIPT % {"job": job_id, "refresh": REFRESH_MS})


def wants_html(accept: str) -> bool:
    """A browser navigating (text/html first), not an API client (JSON, or */* as curl and requests send)."""
    for part in accept.split(","):
        kind = part.split(";")[0].strip().lower()
        if kind in ("text/html", "application/xhtml+xml"):
            return True
        if kind in ("application/json", "*/*"):
            return False
    return False


VIEWER_FIELDS = ("study", "series", "derived")


def check_viewer_template(template: str) -> None:
    """Refuse, at start, a viewer.url_template with a field we cannot fill (a typo would make every link 500)."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise ValueError(f"viewer.url_template: {exc}") from None
    unknown = fields - set(VIEWER_FIELDS)
    if unknown:
        raise ValueError(f"viewer.url_template: unknown field(s) {', '.join(sorted(unknown))}; "
                         f"use {{study}}, {{series}} (the original) or {{derived}} (the derived series)")


def viewer_url(template: str, job: Any) -> str:
    """The job's study in the site's viewer: the template's fields filled with URL-quoted UIDs."""
    return template.format(study=quote(job.study_uid or "", safe=""), series=quote(job.series_uid or "", safe=""),
                           derived=quote(job.derived_series_uid or "", safe=""))
