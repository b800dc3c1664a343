"""How a job's trainer runs: the `Executor` protocol (base.py) and its implementations.

    local.py      trainer processes on this host, started by the control plane (the default)
    launcher.py   the small parent process each local trainer runs under (exit status, signals)

An `agent` executor (trainer hosts that claim jobs over HTTP and heartbeat) fits the same
protocol: `start` hands the job to an agent, `poll` turns missed heartbeats into exits.
"""
