"""One module per target group; each ``run(ctx)`` returns ``{figure key: value}``."""

__all__: list[str] = []
