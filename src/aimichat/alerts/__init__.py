"""Usage alerts, webhooks and leaked-key reports (docs/alerts.md, docs/security.md).

- ``signing``: Standard Webhooks secrets and signatures; ``urls``: which webhook URLs are allowed (SSRF).
- ``service``: thresholds, webhook endpoints, the decision to send an alert (one unique row) and the
  deliveries it queues; plain functions over a session, shared by the pages, the CLI and the admin API.
- ``delivery``: claiming a due delivery (one replica at a time), sending it, recording how it went.
- ``watch``: what runs beside the request path: it hears of settled requests and wakes the worker.
- ``leaks``: ``POST /v1/keys/report``'s rules: revoke a reported key, tell its owner, keep the report.
"""
