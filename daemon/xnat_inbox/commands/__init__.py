"""Commands: the `xnat-inbox` command line (cli) and what its subcommands do beyond running the
service: explain and check, retry and status, the demo, and synthetic sessions for the demo,
tests and benchmarks.
"""
