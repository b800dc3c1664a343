"""How a job's trainer runs: the `Executor` protocol (base.py) and its implementations.

local.py      trainer processes on this host, started by the control plane (the default)
launcher.py   the small parent process each local trainer runs under (exit status, signals)
agent.py      trainers on other hosts, run by `dflash trainer-agent`s that claim jobs over
              HTTP and heartbeat (services/agent/ is the agent, control_plane/agents.py its
              counterpart here)
"""
