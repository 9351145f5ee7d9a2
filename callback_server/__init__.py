"""The cloud side: consume the topics, persist to MySQL/SQLite, HTTP ingest and read API."""
