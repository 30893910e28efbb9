"""The service: the stages run as a daemon.

daemon is the main loop (observers, the settle tick, retries) feeding one lane per destination,
pipeline runs one attempt of a claimed drop through reading → outcome, state keeps the durable
record in SQLite; reload applies a SIGHUP, and supervise and notify tell systemd what the daemon
is doing (READY, STATUS, watchdog).
"""
