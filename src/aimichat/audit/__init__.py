"""The audit log: who changed accounts, tiers, prices, models and keys, and when (see ``service``)."""
