"""The admin API, ``/admin/v1/...``: accounts, tiers, prices, keys, usage, the ledger and the audit log,
for admin keys (``aimichat_admin_...``). Split as ``api/chat``: routes, schemas, logic."""
