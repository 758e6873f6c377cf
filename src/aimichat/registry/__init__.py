"""The models a fleet serves: kept in the database (``service``), read as a snapshot (``catalog``),
served by one engine each on every replica (``live``)."""
