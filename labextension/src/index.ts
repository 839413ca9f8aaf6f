/**
 * kernel-sandbox approvals for JupyterLab: a sandboxed kernel's egress request that waits
 * for a person (egress_mode: ask) shows as a dialog with the exact host and port, the
 * kernel and the notebook; approve once, approve for this kernel, or deny.
 *
 * The server extension (kernel_sandbox.approvals) emits an event when a request of one of
 * this server's kernels starts or stops waiting; this plugin listens on the server's event
 * stream (no polling), asks once at start for requests already waiting, and posts the
 * person's decision to the REST endpoint. The cell that waits continues or fails with it.
 */
import {
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { Dialog, Notification } from '@jupyterlab/apputils';
import { URLExt } from '@jupyterlab/coreutils';
import { Event, ServerConnection } from '@jupyterlab/services';
import { Widget } from '@lumino/widgets';

const SCHEMA_ID = 'https://events.kernel-sandbox.dev/egress-request/v1';
const API = 'kernel-sandbox/approvals/api/requests';

type Choice = 'once' | 'kernel' | 'deny';

interface IRequest {
  id: string;
  kernel_id: string;
  target: string;
  host: string;
  port: number;
  since?: number;
  expires?: number;
  waiting?: number;
  reason?: string | null;
  notebook?: string | null;
  kernel_name?: string | null;
}

const LABELS: { [key in Choice]: string } = {
  deny: 'Deny',
  once: 'Approve once',
  kernel: 'Approve for this kernel'
};

function row(list: HTMLElement, name: string, value: string): void {
  const term = document.createElement('dt');
  term.textContent = name;
  const text = document.createElement('dd');
  text.textContent = value;
  text.dataset.field = name;
  list.append(term, text);
}

function body(request: IRequest): Widget {
  const node = document.createElement('div');
  node.className = 'ks-approval';
  node.dataset.request = request.id;
  const intro = document.createElement('p');
  intro.textContent =
    'A sandboxed kernel is waiting to connect to a host its allowlist does not name.';
  const facts = document.createElement('dl');
  row(facts, 'host', request.host);
  row(facts, 'port', String(request.port));
  row(
    facts,
    'kernel',
    request.kernel_id + (request.kernel_name ? ` (${request.kernel_name})` : '')
  );
  row(facts, 'notebook', request.notebook || '(no notebook: another client)');
  if (request.reason) {
    row(facts, 'reason given', request.reason);
  }
  if (request.expires) {
    const left = Math.max(0, Math.round(request.expires - Date.now() / 1000));
    row(facts, 'time left', `${left} s (then it is denied)`);
  }
  const note = document.createElement('p');
  note.className = 'ks-approval-note';
  note.textContent =
    '"Approve for this kernel" also lets later connections to this host and port ' +
    'through, until the kernel shuts down.';
  node.append(intro, facts, note);
  return new Widget({ node });
}

class Approvals {
  constructor(private settings: ServerConnection.ISettings) {}

  /** Requests that waited before the page was opened. */
  async load(): Promise<void> {
    const url = URLExt.join(this.settings.baseUrl, API);
    const response = await ServerConnection.makeRequest(url, {}, this.settings);
    if (!response.ok) {
      return; // the server extension is not enabled: nothing to show
    }
    const data = (await response.json()) as { requests: IRequest[] };
    data.requests.forEach(request => this.waiting(request));
  }

  onEvent(event: Event.Emission): void {
    if (event.schema_id !== SCHEMA_ID) {
      return;
    }
    const request = event as unknown as IRequest & {
      action: string;
      outcome?: string;
    };
    if (request.action === 'waiting') {
      this.waiting(request);
    } else if (request.action === 'decided') {
      this.decided(request, request.outcome || 'elsewhere');
    }
  }

  private waiting(request: IRequest): void {
    if (this.known.has(request.id)) {
      return;
    }
    this.known.add(request.id);
    this.queue.push(request);
    void this.next();
  }

  private decided(request: IRequest, outcome: string): void {
    this.queue = this.queue.filter(r => r.id !== request.id);
    if (this.open && this.open.request.id === request.id) {
      const dialog = this.open.dialog;
      this.open = null;
      dialog.reject();
      if (outcome === 'expired') {
        Notification.warning(
          `Egress to ${request.target}: nobody answered in time, so it was denied.`,
          { autoClose: 8000 }
        );
      } else if (outcome === 'elsewhere') {
        Notification.info(
          `Egress to ${request.target} was decided elsewhere.`,
          { autoClose: 5000 }
        );
      }
    }
  }

  private async next(): Promise<void> {
    if (this.open || this.queue.length === 0) {
      return;
    }
    const request = this.queue.shift()!;
    const choices: Choice[] = ['deny', 'once', 'kernel'];
    const dialog = new Dialog<unknown>({
      title: `Allow network access to ${request.target}?`,
      body: body(request),
      buttons: choices.map(choice =>
        choice === 'deny'
          ? Dialog.warnButton({ label: LABELS[choice], caption: choice })
          : Dialog.okButton({ label: LABELS[choice], caption: choice })
      ),
      defaultButton: 0,
      hasClose: false
    });
    dialog.addClass('ks-approval-dialog');
    this.open = { request, dialog };
    let chosen: Choice | null = null;
    try {
      const result = await dialog.launch();
      const picked = choices.find(c => LABELS[c] === result.button.label);
      chosen = result.button.accept || picked === 'deny' ? picked || null : null;
    } catch {
      chosen = null; // closed because it was decided elsewhere
    }
    const wasOpen = this.open && this.open.request.id === request.id;
    this.open = null;
    if (chosen) {
      await this.decide(request, chosen);
    } else if (wasOpen) {
      Notification.warning(
        `Egress to ${request.target} still waits (silence denies).`,
        {
          autoClose: 10000,
          actions: [
            {
              label: 'Decide',
              callback: () => {
                this.known.delete(request.id);
                this.waiting(request);
              }
            }
          ]
        }
      );
    }
    void this.next();
  }

  private async decide(request: IRequest, choice: Choice): Promise<void> {
    const url = URLExt.join(this.settings.baseUrl, API);
    const init = {
      method: 'POST',
      body: JSON.stringify({
        kernel_id: request.kernel_id,
        target: request.target,
        decision: choice
      })
    };
    try {
      const response = await ServerConnection.makeRequest(url, init, this.settings);
      const data = await response.json();
      if (!response.ok) {
        throw new Error(data.message || response.statusText);
      }
      const done = choice === 'deny' ? 'denied' : LABELS[choice].toLowerCase().replace('approve', 'approved');
      Notification.success(`Egress to ${request.target}: ${done}.`, {
        autoClose: 5000
      });
    } catch (error) {
      Notification.error(`Egress to ${request.target}: ${error}`, {
        autoClose: 10000
      });
    }
  }

  private known = new Set<string>();
  private queue: IRequest[] = [];
  private open: { request: IRequest; dialog: Dialog<unknown> } | null = null;
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'kernel-sandbox-approvals:plugin',
  description:
    'Approve or deny a sandboxed kernel egress request (kernel-sandbox, egress_mode: ask).',
  autoStart: true,
  activate: (app: JupyterFrontEnd) => {
    const approvals = new Approvals(app.serviceManager.serverSettings);
    app.serviceManager.events.stream.connect((_, event) =>
      approvals.onEvent(event)
    );
    void app.restored.then(() => approvals.load());
  }
};

export default plugin;
