/**
 * sovereign-portal inside JupyterLab.
 *
 * - A status-bar item: the granted device, € and GPU-hours so far, energy so far, GPU
 *   utilisation and the time left before the walltime. Its tooltip says which figures
 *   are measured and which are estimated.
 * - A side panel: this server's compute sessions (state, cost so far, a Stop button),
 *   the budget balance, and a link to "My usage" on the hub.
 * - The culler's idle warnings and the budget warnings as JupyterLab notifications, each
 *   shown once per id.
 *
 * It reads only the server extension's REST API (/sovereign-portal/api/...), with the
 * server's own auth; it makes no other request. An endpoint that is missing (404) or
 * failing shows "—" and is asked again at the next refresh.
 */
import { JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { Notification } from '@jupyterlab/apputils';
import { PageConfig, URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';
import { IStatusBar } from '@jupyterlab/statusbar';
import { LabIcon } from '@jupyterlab/ui-components';
import { Widget } from '@lumino/widgets';

/** Seconds between refreshes of the status bar, the open panel and the notices. */
const REFRESH_S = 10;
const DASH = '—';
const ACTIVE = ['queued', 'starting', 'ready'];

const ICON_SVG =
  '<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">' +
  '<g class="jp-icon3" fill="#616161"><rect x="4" y="4" width="16" height="16" rx="2" ' +
  'fill="none" stroke="#616161" stroke-width="2"/><rect x="8" y="8" width="8" height="8"/>' +
  '<rect x="1" y="8" width="3" height="2"/><rect x="1" y="14" width="3" height="2"/>' +
  '<rect x="20" y="8" width="3" height="2"/><rect x="20" y="14" width="3" height="2"/></g></svg>';
const gpuIcon = new LabIcon({ name: 'sovereign-portal:gpu', svgstr: ICON_SVG });

// -- the REST API ---------------------------------------------------------------------

interface IDevice {
  label: string;
  size: string;
  gpus: number;
  gpu_fraction: number;
}
interface IBudget {
  text?: string;
  left?: number;
  unit?: string;
  warning?: number | null;
  banner?: string | null;
}
interface IStatus {
  granted: boolean;
  device: IDevice | null;
  partition: string | null;
  country: string | null;
  started_at: string | null;
  ends_at: string | null;
  seconds_left: number | null;
  eur_per_hour: number | null;
  eur_so_far: number | null;
  gpu_hours_so_far: number | null;
  estimated: boolean;
  budget: IBudget | null;
}
interface IActivityDevice {
  index: number;
  utilization_pct: number;
  memory_used_mib: number;
  power_w: number | null;
  energy_wh: number | null;
}
interface IActivity {
  devices: IActivityDevice[];
  source: 'nvml' | 'scripted' | 'none';
  measured: boolean;
  sampled_at: string | null;
}
interface INotice {
  id: string;
  kind: 'idle' | 'budget';
  level: 'info' | 'warning' | 'error';
  message: string;
  deadline: string | null;
}
interface ISession {
  id: string;
  kind: string;
  state: string;
  message: string;
  started: number | null;
  ended: number | null;
  created: number;
  grant: {
    partition?: string;
    country?: string;
    size?: { id: string; label: string };
    eur_per_hour?: number;
  };
}

/** GET or DELETE a path of the extension's API; null when it is missing or fails. */
async function api<T>(path: string, method = 'GET'): Promise<T | null> {
  const settings = ServerConnection.makeSettings();
  const url = URLExt.join(settings.baseUrl, 'sovereign-portal/api', path);
  try {
    const resp = await ServerConnection.makeRequest(url, { method }, settings);
    if (!resp.ok) {
      return null;
    }
    return (await resp.json()) as T;
  } catch (e) {
    console.warn(`sovereign-portal: ${method} ${path} failed`, e);
    return null;
  }
}

// -- formatting -------------------------------------------------------------------------

function eur(v: number | null | undefined): string {
  return v === null || v === undefined ? DASH : `€${v.toFixed(v < 10 ? 2 : 0)}`;
}

function left(seconds: number | null): string {
  if (seconds === null) {
    return DASH;
  }
  const m = Math.floor(seconds / 60);
  const h = Math.floor(m / 60);
  return h > 0 ? `${h} h ${String(m % 60).padStart(2, '0')} min left` : `${m} min left`;
}

function energyWh(a: IActivity | null): number | null {
  const known = (a?.devices ?? []).filter(d => d.energy_wh !== null);
  return known.length ? known.reduce((s, d) => s + (d.energy_wh ?? 0), 0) : null;
}

function utilisation(a: IActivity | null): number | null {
  const ds = a?.devices ?? [];
  return ds.length ? ds.reduce((s, d) => s + d.utilization_pct, 0) / ds.length : null;
}

function sourceText(a: IActivity | null): string {
  if (!a || a.source === 'none' || !a.devices.length) {
    return 'not available (no device telemetry)';
  }
  if (a.measured) {
    return `measured (${a.source === 'nvml' ? 'NVML' : a.source})`;
  }
  return a.source === 'scripted'
    ? 'not measured: a scripted test source stands in for NVML'
    : `estimated (${a.source})`;
}

/** The hub's "My usage" page ({hub base}/hub/usage), or null outside a hub. */
function usageUrl(): string | null {
  const prefix = PageConfig.getOption('hubPrefix');
  if (!prefix) {
    return null;
  }
  return PageConfig.getOption('hubHost') + URLExt.join(prefix, 'usage');
}

function el<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  cls: string,
  text = ''
): HTMLElementTagNameMap[K] {
  const e = document.createElement(tag);
  e.className = cls;
  e.textContent = text;
  return e;
}

// -- the status bar ---------------------------------------------------------------------

/** The status-bar item: one line, and a tooltip that says measured or estimated. */
class StatusItem extends Widget {
  constructor() {
    super();
    this.addClass('sp-status');
    this.node.textContent = `GPU ${DASH}`;
  }

  render(s: IStatus | null, a: IActivity | null): void {
    const util = utilisation(a);
    const wh = energyWh(a);
    const parts = [
      s?.device ? s.device.label : 'no GPU granted',
      `${eur(s?.eur_so_far)} · ${s?.gpu_hours_so_far?.toFixed(2) ?? DASH} GPU-h`,
      wh === null ? `${DASH} Wh` : `${wh.toFixed(wh < 10 ? 2 : 1)} Wh`,
      util === null ? `GPU ${DASH}` : `GPU ${Math.round(util)} %`,
      left(s?.seconds_left ?? null)
    ];
    this.node.textContent = parts.join(' | ');
    const est = s?.estimated === false ? 'measured' : 'estimated (rate × elapsed time)';
    this.node.title = [
      s?.device
        ? `Granted: ${s.device.label} on partition ${s.partition ?? DASH}`
        : 'This server holds no GPU from the portal',
      `Cost and GPU-hours so far: ${est}` +
        (s?.eur_per_hour !== null && s?.eur_per_hour !== undefined
          ? `, at ${eur(s.eur_per_hour)}/h`
          : ''),
      `Energy so far: ${wh === null ? 'not available' : sourceText(a)}`,
      `GPU utilisation: ${util === null ? 'not available' : sourceText(a)}`,
      `Walltime ends: ${s?.ends_at ?? DASH}`
    ].join('\n');
    this.node.dataset.estimated = String(s?.estimated !== false);
    this.node.dataset.measured = String(Boolean(a?.measured));
  }
}

// -- the side panel ---------------------------------------------------------------------

/** The side panel: the grant, the budget, the compute sessions and "My usage". */
class PortalPanel extends Widget {
  constructor() {
    super();
    this.id = 'sovereign-portal-panel';
    this.addClass('sp-panel');
    this.title.icon = gpuIcon;
    this.title.caption = 'GPU sessions and budget';
    const n = this.node;
    n.appendChild(el('h2', 'sp-panel-title', 'Your GPU'));
    n.appendChild(this._grant);
    n.appendChild(el('h3', 'sp-panel-heading', 'Budget'));
    n.appendChild(this._budget);
    n.appendChild(el('h3', 'sp-panel-heading', 'Compute sessions'));
    n.appendChild(this._sessions);
    const url = usageUrl();
    if (url) {
      const a = el('a', 'sp-usage-link', 'My usage');
      a.href = url;
      a.target = '_blank';
      a.rel = 'noopener';
      n.appendChild(a);
    }
  }

  protected onAfterShow(): void {
    void this.refresh();
  }

  async refresh(): Promise<void> {
    const [status, sessions] = await Promise.all([
      api<IStatus>('status'),
      api<ISession[]>('sessions')
    ]);
    this.renderGrant(status);
    this.renderSessions(sessions);
  }

  renderGrant(s: IStatus | null): void {
    this._grant.textContent = '';
    const line = (k: string, v: string) => {
      const row = el('div', 'sp-row');
      row.appendChild(el('span', 'sp-key', k));
      row.appendChild(el('span', 'sp-value', v));
      this._grant.appendChild(row);
    };
    line('Device', s?.device?.label ?? (s ? 'none' : DASH));
    line('Partition', s?.partition ?? DASH);
    line('Cost so far', `${eur(s?.eur_so_far)} (estimated)`);
    line('GPU-hours so far', `${s?.gpu_hours_so_far?.toFixed(2) ?? DASH} (estimated)`);
    line('Time left', left(s?.seconds_left ?? null));
    const b = s?.budget;
    this._budget.textContent = b?.text ?? (s ? 'No budget applies to you.' : DASH);
    this._budget.classList.toggle('sp-warning', Boolean(b?.warning));
  }

  renderSessions(list: ISession[] | null): void {
    const box = this._sessions;
    box.textContent = '';
    if (list === null) {
      box.appendChild(el('div', 'sp-empty', DASH));
      return;
    }
    if (!list.length) {
      box.appendChild(el('div', 'sp-empty', 'No compute session.'));
      return;
    }
    for (const s of list) {
      const row = el('div', 'sp-session');
      row.dataset.sessionId = s.id;
      row.dataset.state = s.state;
      const g = s.grant;
      const title = `${s.kind} · ${g.size?.id ?? DASH} · ${g.partition ?? DASH}`;
      row.appendChild(el('div', 'sp-session-title', title));
      const start = s.started ?? null;
      const end = s.ended ?? Date.now() / 1000;
      const cost =
        start !== null && g.eur_per_hour !== undefined
          ? (g.eur_per_hour * Math.max(0, end - start)) / 3600
          : start === null
            ? 0
            : null;
      row.appendChild(el('div', 'sp-session-state', `${s.state}: ${s.message}`));
      row.appendChild(el('div', 'sp-session-cost', `${eur(cost)} so far (estimated)`));
      if (ACTIVE.includes(s.state)) {
        const stop = el('button', 'jp-Button jp-mod-styled jp-mod-warn sp-stop', 'Stop');
        stop.onclick = async () => {
          stop.disabled = true;
          stop.textContent = 'Stopping…';
          const done = await api<ISession>(`sessions/${s.id}`, 'DELETE');
          if (!done) {
            Notification.error(`Could not stop session ${s.id}; try again.`);
          }
          await this.refresh();
        };
        row.appendChild(stop);
      }
      box.appendChild(row);
    }
  }

  private _grant = el('div', 'sp-grant');
  private _budget = el('div', 'sp-budget', DASH);
  private _sessions = el('div', 'sp-sessions', DASH);
}

// -- notifications ----------------------------------------------------------------------

const SEEN_KEY = 'sovereign-portal:notices-seen';

function seenIds(): Set<string> {
  try {
    return new Set(JSON.parse(window.sessionStorage.getItem(SEEN_KEY) ?? '[]') as string[]);
  } catch {
    return new Set();
  }
}

/** Show each notice once per id (also across reloads of this browser tab). */
async function showNotices(seen: Set<string>): Promise<void> {
  const data = await api<{ notices: INotice[] }>('notices');
  for (const n of data?.notices ?? []) {
    if (seen.has(n.id)) {
      continue;
    }
    seen.add(n.id);
    const title = n.kind === 'idle' ? 'Idle GPU' : 'Budget';
    const opts = { autoClose: false as const, data: { id: n.id, kind: n.kind } };
    const text = `${title}: ${n.message}`;
    if (n.level === 'error') {
      Notification.error(text, opts);
    } else if (n.level === 'warning') {
      Notification.warning(text, opts);
    } else {
      Notification.info(text, opts);
    }
  }
  try {
    window.sessionStorage.setItem(SEEN_KEY, JSON.stringify([...seen]));
  } catch {
    // storage disabled: once per page load
  }
}

// -- the plugin -------------------------------------------------------------------------

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'sovereign-portal-lab:plugin',
  description: 'sovereign-portal: GPU status bar, sessions panel and notices.',
  autoStart: true,
  optional: [IStatusBar],
  activate: (app: JupyterFrontEnd, statusBar: IStatusBar | null) => {
    const item = new StatusItem();
    const panel = new PortalPanel();
    if (statusBar) {
      statusBar.registerStatusItem('sovereign-portal-lab:status', {
        item,
        align: 'left',
        rank: 1000
      });
    }
    app.shell.add(panel, 'left', { rank: 900 });
    const seen = seenIds();
    const tick = async () => {
      const [s, a] = await Promise.all([api<IStatus>('status'), api<IActivity>('activity')]);
      item.render(s, a);
      if (panel.isVisible) {
        await panel.refresh();
      }
      await showNotices(seen);
    };
    void panel.refresh();
    void tick();
    window.setInterval(() => void tick(), REFRESH_S * 1000);
  }
};

export default plugin;
