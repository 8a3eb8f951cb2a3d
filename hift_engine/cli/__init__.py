"""The ``hift`` command: one small module per subcommand (demo, train, bench, env)."""
