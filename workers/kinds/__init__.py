"""Stage kinds: one module per ``kind`` (a config model and ``run(ctx, config)``), see ``workers.stage``."""
