"""Idempotent retries: a request sent again with the same ``Idempotency-Key`` gets the first answer.

- ``aimichat.api.idempotency.idempotent``: what a route calls (its docstring is the interface; it lives in
  ``api/`` because it builds HTTP answers);
- :mod:`.retries`: :class:`~.retries.Retries`, the rules (claim, wait, keep, release) and the cleaning task;
- :mod:`.records`: the ``idempotency_records`` table, where every replica's claims meet.

docs/idempotency.md says what callers get and what is kept, for how long.
"""
