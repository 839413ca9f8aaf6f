"""The approval page: plain HTML with one form per waiting request, no JavaScript needed.

Served by the Jupyter Server extension (``/kernel-sandbox/approvals``, behind the server's
login and XSRF check) and by ``kernel-sandbox mcp``'s approval listener (behind its approver
cookie). It refreshes itself every few seconds while requests wait.
"""

from __future__ import annotations

from html import escape

from kernel_sandbox.approvals.store import Request

__all__ = ["render"]

STYLE = """
body{font:15px/1.45 system-ui,sans-serif;margin:2em auto;max-width:52em;padding:0 1em;color:#222}
h1{font-size:1.3em} .req{border:1px solid #bbb;border-radius:6px;padding:.8em 1em;margin:1em 0}
.req.focus{border:2px solid #c60} .target{font:bold 1.25em monospace}
dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em;margin:.6em 0}
dt{color:#555} dd{margin:0;font-family:monospace;word-break:break-all}
button{font-size:1em;margin-right:.6em;padding:.35em .9em;cursor:pointer}
.msg{background:#eef6ee;border:1px solid #9c9;padding:.5em 1em}
.err{background:#fbeaea;border-color:#d99}
"""


def _request(request: Request, action: str, hidden: dict[str, str], focus: str | None) -> str:
    rows = [
        ("host", request.host),
        ("port", str(request.port)),
        ("kernel", request.kernel_id + (f" ({request.kernel_name})" * bool(request.kernel_name))),
    ]
    if request.notebook:
        rows.append(("notebook", request.notebook))
    if request.reason:
        rows.append(("reason given", request.reason))
    rows.append(("waiting", f"{request.waiting} connection(s), {request.seconds_left:.0f} s left"))
    fields = "".join(
        f'<input type="hidden" name="{escape(k)}" value="{escape(v)}">'
        for k, v in {**hidden, "kernel_id": request.kernel_id, "target": request.target}.items()
    )
    facts = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in rows)
    css = "req focus" if focus in (request.id, request.target) else "req"
    return (
        f'<section class="{css}" id="r-{request.id}" data-request="{request.id}">'
        f'<div class="target">{escape(request.target)}</div><dl>{facts}</dl>'
        f'<form method="post" action="{escape(action)}">{fields}'
        '<button name="decision" value="once">Approve once</button>'
        '<button name="decision" value="kernel">Approve for this kernel</button>'
        '<button name="decision" value="deny">Deny</button></form></section>'
    )


def render(
    requests: list[Request],
    action: str,
    hidden: dict[str, str] | None = None,
    message: str | None = None,
    error: bool = False,
    focus: str | None = None,
    refresh: int = 5,
) -> str:
    """The whole page: ``action`` is where the forms post, ``hidden`` extra form fields (an
    XSRF token), ``message`` the outcome of the last decision, ``focus`` a request to mark."""
    body = [f'<p class="msg{" err" if error else ""}">{escape(message)}</p>'] if message else []
    if requests:
        body += [_request(r, action, hidden or {}, focus) for r in requests]
    else:
        body.append("<p>No egress request is waiting for a decision.</p>")
    return (
        "<!doctype html><html><head><meta charset=utf-8>"
        f'<meta http-equiv="refresh" content="{refresh}">'
        "<title>Egress approvals: kernel-sandbox</title>"
        f"<style>{STYLE}</style></head><body><h1>Egress requests waiting for you</h1>"
        "<p>A sandboxed kernel wants to reach a host its allowlist does not name. "
        "<b>Approve once</b> lets the waiting connection through; <b>Approve for this "
        "kernel</b> also later ones to the same host and port, until the kernel ends; "
        "<b>Deny</b> fails it. Silence denies when the time is up.</p>"
        + "".join(body)
        + "</body></html>"
    )
